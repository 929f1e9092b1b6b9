"""Setup profiles: everything the twin knows about one (GPU, model, TP degree) setup.

A profile is a TOML file (shipped ones live in `throttllem/profiles/`). Every parameter is
written as `key = { value = ..., source = "..." }` so that no number enters the twin without
saying where it came from: an NVML readout, a fit to measured data, a paper, or an
explicit assumption. The loader refuses a parameter without a source.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from throttllem._errors import ConfigError

PROFILE_PACKAGE: Final = "throttllem.profiles"


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """The GPU as NVML shows it: clocks, power cap, idle draw."""

    name: str
    memory_gib: float
    clock_min_mhz: int
    clock_max_mhz: int
    clock_step_mhz: int
    default_clock_mhz: int
    idle_clock_mhz: int
    mem_clock_mhz: int
    power_cap_w: float
    idle_power_w: float
    supported_clocks_mhz: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        step = max(self.clock_step_mhz, 1)
        clocks = tuple(range(self.clock_min_mhz, self.clock_max_mhz + 1, step))
        object.__setattr__(self, "supported_clocks_mhz", clocks)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The served model's shape, enough to size weights and the KV cache."""

    name: str
    params_b: float
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_model_len: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: 2·layers·kv_heads·head_dim·dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The serving engine's scheduler limits (vLLM / TensorRT-LLM style)."""

    tp_degree: int
    max_batch: int
    block_tokens: int
    kv_blocks: int
    max_batched_tokens: int
    kv_watermark: float


@dataclass(frozen=True, slots=True)
class TimeModel:
    """Iteration time at clock f (see `clockmodel`); all `_ms` values are at the top clock."""

    weights_ms: float
    kv_ms_per_ktoken: float
    token_ms: float
    prefill_attn_ms_per_mtoken2: float
    roofline_sharpness: float
    latency_ms: float
    hbm_knee_mhz: float
    hbm_knee_sharpness: float


@dataclass(frozen=True, slots=True)
class PowerModel:
    """Board power while busy (see `clockmodel`)."""

    static_w: float
    clock_w: float
    compute_w: float
    kv_w: float
    voltage_min_ratio: float
    voltage_knee_mhz: float


@dataclass(frozen=True, slots=True)
class SetupProfile:
    """One setup: a GPU, a model, a TP degree, and the stated time and power models."""

    name: str
    description: str
    gpu: GpuSpec
    model: ModelShape
    engine: EngineLimits
    time: TimeModel
    power: PowerModel
    # "section.key" -> where the number came from.
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    path: str = ""

    def with_overrides(self, overrides: Mapping[str, Any]) -> SetupProfile:
        """A copy with `{"engine.kv_blocks": 64, ...}` changed, validated like a loaded file.

        Overridden values get the source "override" so reports never present them as fitted.
        """
        sections: dict[str, dict[str, Any]] = {}
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in _SECTIONS or key not in _SECTIONS[section][1]:
                raise ConfigError(f"unknown profile parameter {dotted!r}")
            sections.setdefault(section, {})[key] = value
        changed: dict[str, Any] = {}
        for section, values in sections.items():
            changed[section] = dataclasses.replace(getattr(self, section), **values)
        sources = dict(self.sources)
        sources.update(dict.fromkeys(overrides, "override"))
        profile = dataclasses.replace(self, sources=MappingProxyType(sources), **changed)
        _validate(profile)
        return profile


# section -> (dataclass, {key: type})
_SECTIONS: Final[dict[str, tuple[type, dict[str, type]]]] = {
    "gpu": (GpuSpec, {
        "name": str, "memory_gib": float, "clock_min_mhz": int, "clock_max_mhz": int,
        "clock_step_mhz": int, "default_clock_mhz": int, "idle_clock_mhz": int,
        "mem_clock_mhz": int, "power_cap_w": float, "idle_power_w": float,
    }),
    "model": (ModelShape, {
        "name": str, "params_b": float, "layers": int, "kv_heads": int, "head_dim": int,
        "dtype_bytes": int, "max_model_len": int,
    }),
    "engine": (EngineLimits, {
        "tp_degree": int, "max_batch": int, "block_tokens": int, "kv_blocks": int,
        "max_batched_tokens": int, "kv_watermark": float,
    }),
    "time": (TimeModel, {
        "weights_ms": float, "kv_ms_per_ktoken": float, "token_ms": float,
        "prefill_attn_ms_per_mtoken2": float, "roofline_sharpness": float, "latency_ms": float,
        "hbm_knee_mhz": float, "hbm_knee_sharpness": float,
    }),
    "power": (PowerModel, {
        "static_w": float, "clock_w": float, "compute_w": float, "kv_w": float,
        "voltage_min_ratio": float, "voltage_knee_mhz": float,
    }),
}
# Parameters that only need to be >= 0 (all other numbers must be > 0).
_MAY_BE_ZERO: Final = frozenset({
    "time.latency_ms", "time.prefill_attn_ms_per_mtoken2", "time.kv_ms_per_ktoken",
    "power.clock_w", "power.compute_w", "power.kv_w", "engine.kv_watermark",
})


def available_profiles() -> list[str]:
    """Names of the profiles shipped inside the package."""
    root = resources.files(PROFILE_PACKAGE)
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir()
                  if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> SetupProfile:
    """Load a shipped profile by name (`"h100-llama3-8b-tp1"`) or any profile file by path."""
    text, where = _read(name_or_path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"profile {where} is not valid TOML: {e}") from e
    return _parse(doc, where)


def _read(name_or_path: str | Path) -> tuple[str, str]:
    as_text = str(name_or_path)
    looks_like_path = (isinstance(name_or_path, Path) or as_text.endswith(".toml")
                       or "/" in as_text or "\\" in as_text)
    if looks_like_path:
        path = Path(name_or_path)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise ConfigError(f"cannot read profile file {path}: {e.strerror or e}") from e
    resource = resources.files(PROFILE_PACKAGE) / f"{as_text}.toml"
    if not resource.is_file():
        known = ", ".join(available_profiles()) or "none"
        raise ConfigError(f"no profile named {as_text!r} (shipped profiles: {known}); "
                          "pass a path to a .toml file for your own")
    return resource.read_text(encoding="utf-8"), f"{PROFILE_PACKAGE}/{as_text}.toml"


def _parse(doc: dict[str, Any], where: str) -> SetupProfile:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"profile {where}: top-level `name` (a non-empty string) is missing")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"profile {where}: `description` must be a string")
    sources: dict[str, str] = {}
    built: dict[str, Any] = {}
    for section, (cls, keys) in _SECTIONS.items():
        table = doc.get(section)
        if not isinstance(table, dict):
            raise ConfigError(f"profile {where}: section [{section}] is missing")
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ConfigError(f"profile {where}: unknown key(s) in [{section}]: "
                              + ", ".join(unknown))
        values: dict[str, Any] = {}
        for key, typ in keys.items():
            dotted = f"{section}.{key}"
            entry = table.get(key)
            if entry is None:
                raise ConfigError(f"profile {where}: parameter {dotted} is missing")
            if not isinstance(entry, dict) or "value" not in entry:
                raise ConfigError(f"profile {where}: {dotted} must be "
                                  "`{ value = ..., source = \"...\" }`")
            source = entry.get("source")
            if not isinstance(source, str) or not source.strip():
                raise ConfigError(f"profile {where}: {dotted} has no `source` saying where "
                                  "its value comes from")
            values[key] = _coerce(entry["value"], typ, dotted, where)
            sources[dotted] = source.strip()
        built[section] = cls(**values)
    profile = SetupProfile(name=name, description=description, sources=MappingProxyType(sources),
                           path=where, **built)
    _validate(profile)
    return profile


def _coerce(value: object, typ: type, dotted: str, where: str) -> object:
    if typ is str:
        if isinstance(value, str) and value:
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value)):
        return float(value)
    raise ConfigError(f"profile {where}: {dotted} must be a {typ.__name__}, not {value!r}")


def _validate(p: SetupProfile) -> None:
    """Range and consistency checks, with messages that name the parameter."""
    where = p.path or p.name
    for section in _SECTIONS:
        obj = getattr(p, section)
        for key, typ in _SECTIONS[section][1].items():
            if typ is str:
                continue
            dotted = f"{section}.{key}"
            value = getattr(obj, key)
            low_ok = value >= 0 if dotted in _MAY_BE_ZERO else value > 0
            if not low_ok:
                bound = ">= 0" if dotted in _MAY_BE_ZERO else "> 0"
                raise ConfigError(f"profile {where}: {dotted} = {value} must be {bound}")
    g = p.gpu
    if g.clock_min_mhz > g.clock_max_mhz:
        raise ConfigError(f"profile {where}: gpu.clock_min_mhz > gpu.clock_max_mhz")
    if (g.clock_max_mhz - g.clock_min_mhz) % g.clock_step_mhz:
        raise ConfigError(f"profile {where}: the clock range {g.clock_min_mhz}-"
                          f"{g.clock_max_mhz} MHz is not a whole number of "
                          f"{g.clock_step_mhz} MHz steps")
    for key in ("default_clock_mhz", "idle_clock_mhz"):
        if getattr(g, key) not in g.supported_clocks_mhz:
            raise ConfigError(f"profile {where}: gpu.{key} = {getattr(g, key)} is not a "
                              "supported clock")
    if g.idle_power_w >= g.power_cap_w:
        raise ConfigError(f"profile {where}: gpu.idle_power_w must be below gpu.power_cap_w")
    e = p.engine
    if e.kv_watermark >= 1:
        raise ConfigError(f"profile {where}: engine.kv_watermark is a fraction below 1")
    if e.max_batched_tokens < e.max_batch:
        raise ConfigError(f"profile {where}: engine.max_batched_tokens must be at least "
                          "engine.max_batch (every running sequence decodes one token)")
    pw = p.power
    if not 0 < pw.voltage_min_ratio <= 1:
        raise ConfigError(f"profile {where}: power.voltage_min_ratio must be in (0, 1]")
    if pw.voltage_knee_mhz >= g.clock_max_mhz:
        raise ConfigError(f"profile {where}: power.voltage_knee_mhz must be below the top clock")
    if pw.static_w >= g.power_cap_w:
        raise ConfigError(f"profile {where}: power.static_w must be below gpu.power_cap_w")

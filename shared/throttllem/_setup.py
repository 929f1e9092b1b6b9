"""What a serving setup is: one (GPU, model, tensor-parallel degree, engine) combination.

Every part of throttLL'eM that reasons about a real deployment (the controller's clocks and
engine limits, the performance model's trainer, the gateway's context window, engine
adapters) learns it here, loaded once into a `Setup` that travels. The serving twin adds its
own time and power models on top (`throttllem._twin.profile`); it does not define what a
setup is.

A setup file is TOML (shipped ones live in `throttllem/profiles/`). Every parameter is
written as `key = { value = ..., source = "..." }` so that no number enters without saying
where it came from: an NVML readout, a fit to measured data, a paper, or an explicit
assumption. The loader refuses a parameter without a source.
"""

from __future__ import annotations

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
# The setup every command uses unless told otherwise (the one the shipped models serve).
DEFAULT_SETUP: Final = "h100-llama3-8b-tp1"


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
class ControllerLimits:
    """What the controller must respect on this setup beyond the GPU's own clock table."""

    # The lowest clock the controller may choose: the setup's most energy-efficient clock
    # (below it a slower pass costs more static energy per token than the clock saves).
    floor_mhz: int


@dataclass(frozen=True, slots=True)
class Setup:
    """One serving setup: the GPU, the model, the engine's limits."""

    name: str
    description: str
    gpu: GpuSpec
    model: ModelShape
    engine: EngineLimits
    controller: ControllerLimits
    # "section.key" -> where the number came from.
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    path: str = ""

    @property
    def supported_clocks_mhz(self) -> tuple[int, ...]:
        return self.gpu.supported_clocks_mhz


# section -> (dataclass, {key: type})
Sections = Mapping[str, tuple[type, Mapping[str, type]]]
SETUP_SECTIONS: Final[Sections] = {
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
    "controller": (ControllerLimits, {"floor_mhz": int}),
}


def available_setups() -> list[str]:
    """Names of the setup files shipped inside the package."""
    root = resources.files(PROFILE_PACKAGE)
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir()
                  if p.name.endswith(".toml"))


def load_setup(name_or_path: str | Path) -> Setup:
    """Load a shipped setup by name (`DEFAULT_SETUP`) or any setup file by path; sections
    other than the setup's own (the twin's `[time]` and `[power]`) are left to their readers."""
    doc, where = read_document(name_or_path)
    name, description = document_header(doc, where)
    built, sources = parse_sections(doc, where, SETUP_SECTIONS)
    setup = Setup(name=name, description=description, sources=MappingProxyType(sources),
                  path=where, **built)
    validate_setup(setup, where, may_be_zero=frozenset({"engine.kv_watermark"}))
    return setup


def read_document(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The TOML document of a shipped setup name or a file path, and where it came from."""
    text, where = _read(name_or_path)
    try:
        return tomllib.loads(text), where
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"profile {where} is not valid TOML: {e}") from e


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
        known = ", ".join(available_setups()) or "none"
        raise ConfigError(f"no profile named {as_text!r} (shipped profiles: {known}); "
                          "pass a path to a .toml file for your own")
    return resource.read_text(encoding="utf-8"), f"{PROFILE_PACKAGE}/{as_text}.toml"


def document_header(doc: Mapping[str, Any], where: str) -> tuple[str, str]:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"profile {where}: top-level `name` (a non-empty string) is missing")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"profile {where}: `description` must be a string")
    return name, description


def parse_sections(doc: Mapping[str, Any], where: str, sections: Sections,
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """Build each section's dataclass from `{ value, source }` entries: (objects, sources)."""
    sources: dict[str, str] = {}
    built: dict[str, Any] = {}
    for section, (cls, keys) in sections.items():
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
    return built, sources


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


def check_ranges(obj_of: Mapping[str, object], sections: Sections, where: str,
                 may_be_zero: frozenset[str]) -> None:
    """Every number > 0, or >= 0 where `may_be_zero` names it."""
    for section, (_, keys) in sections.items():
        obj = obj_of[section]
        for key, typ in keys.items():
            if typ is str:
                continue
            dotted = f"{section}.{key}"
            value = getattr(obj, key)
            low_ok = value >= 0 if dotted in may_be_zero else value > 0
            if not low_ok:
                bound = ">= 0" if dotted in may_be_zero else "> 0"
                raise ConfigError(f"profile {where}: {dotted} = {value} must be {bound}")


def validate_setup(s: Setup | Any, where: str, *, may_be_zero: frozenset[str]) -> None:
    """Range and consistency checks of the gpu, model and engine sections of `s` (a `Setup`
    or anything with those three attributes), with messages that name the parameter."""
    check_ranges({k: getattr(s, k) for k in SETUP_SECTIONS}, SETUP_SECTIONS, where,
                 may_be_zero)
    g = s.gpu
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
    e = s.engine
    if e.kv_watermark >= 1:
        raise ConfigError(f"profile {where}: engine.kv_watermark is a fraction below 1")
    if e.max_batched_tokens < e.max_batch:
        raise ConfigError(f"profile {where}: engine.max_batched_tokens must be at least "
                          "engine.max_batch (every running sequence decodes one token)")
    if s.controller.floor_mhz not in g.supported_clocks_mhz:
        raise ConfigError(f"profile {where}: controller.floor_mhz = {s.controller.floor_mhz} "
                          "is not a supported clock")

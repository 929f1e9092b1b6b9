"""The twin's profile of a setup: the setup itself (`throttllem._setup`) plus the twin's
stated time and power models, read from the same file (`[time]`, `[power]`), each parameter
with its source.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from throttllem._core.switching import interpolate_idle_w
from throttllem._errors import ConfigError
from throttllem._setup import (
    SETUP_SECTIONS,
    ControllerLimits,
    EngineLimits,
    GpuSpec,
    ModelShape,
    Sections,
    Setup,
    available_setups,
    check_ranges,
    document_header,
    parse_sections,
    read_document,
    validate_setup,
)


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
class ClockingModel:
    """What holding and changing a clock costs (see `GpuTwin`).

    `locked_idle_w`: idle power per GPU while a clock is locked, as "MHz:W" points (linear in
    between, the first value below the first point, the last segment extended above the last
    point), or "flat" for the idle power of `[gpu] idle_power_w` whatever the lock (the older
    twin). `switch_latency_s`: seconds from a lock (or its release) being asked for to the
    new clock taking effect; passes started before then run at the old clock."""

    locked_idle_w: str
    switch_latency_s: float

    @property
    def locked_idle_points(self) -> tuple[tuple[float, float], ...] | None:
        """((MHz, W), ...) ascending, or None for a flat idle power."""
        return parse_idle_points(self.locked_idle_w)


def parse_idle_points(text: str) -> tuple[tuple[float, float], ...] | None:
    """"360:80 570:85.5 ..." → ((360.0, 80.0), (570.0, 85.5), ...); "flat" → None."""
    if text.strip().lower() == "flat":
        return None
    points: list[tuple[float, float]] = []
    for part in text.replace(",", " ").split():
        mhz, sep, watts = part.partition(":")
        try:
            point = (float(mhz), float(watts))
        except ValueError:
            point = (math.nan, math.nan)
        if not sep or not all(math.isfinite(v) and v > 0 for v in point):
            raise ConfigError(f"clocking.locked_idle_w: {part!r} is not MHz:W (positive "
                              "numbers), e.g. \"360:80 1830:160\", or \"flat\"")
        points.append(point)
    if len(points) < 2 or any(b[0] <= a[0] for a, b in itertools.pairwise(points)):
        raise ConfigError("clocking.locked_idle_w needs at least two MHz:W points with "
                          "strictly ascending clocks, or \"flat\"")
    return tuple(points)


def locked_idle_power_w(points: tuple[tuple[float, float], ...], clock_mhz: float) -> float:
    """Idle power at a locked clock (the controller's own interpolation, one formula)."""
    return interpolate_idle_w(points, clock_mhz)


@dataclass(frozen=True, slots=True)
class SetupProfile:
    """A setup and the twin's stated time and power models of it."""

    setup: Setup
    time: TimeModel
    power: PowerModel
    clocking: ClockingModel
    # "section.key" -> where the number came from, every section's.
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def name(self) -> str:
        return self.setup.name

    @property
    def description(self) -> str:
        return self.setup.description

    @property
    def path(self) -> str:
        return self.setup.path

    @property
    def gpu(self) -> GpuSpec:
        return self.setup.gpu

    @property
    def model(self) -> ModelShape:
        return self.setup.model

    @property
    def engine(self) -> EngineLimits:
        return self.setup.engine

    @property
    def controller(self) -> ControllerLimits:
        return self.setup.controller

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
        setup = dataclasses.replace(
            self.setup, sources=MappingProxyType({k: v for k, v in sources.items()
                                                  if k.partition(".")[0] in SETUP_SECTIONS}),
            **{k: v for k, v in changed.items() if k in SETUP_SECTIONS})
        profile = dataclasses.replace(
            self, setup=setup, sources=MappingProxyType(sources),
            **{k: v for k, v in changed.items() if k not in SETUP_SECTIONS})
        _validate(profile)
        return profile


# section -> (dataclass, {key: type}): the setup's sections, then the twin's own.
_SECTIONS: Final[Sections] = {
    **SETUP_SECTIONS,
    "time": (TimeModel, {
        "weights_ms": float, "kv_ms_per_ktoken": float, "token_ms": float,
        "prefill_attn_ms_per_mtoken2": float, "roofline_sharpness": float, "latency_ms": float,
        "hbm_knee_mhz": float, "hbm_knee_sharpness": float,
    }),
    "power": (PowerModel, {
        "static_w": float, "clock_w": float, "compute_w": float, "kv_w": float,
        "voltage_min_ratio": float, "voltage_knee_mhz": float,
    }),
    "clocking": (ClockingModel, {"locked_idle_w": str, "switch_latency_s": float}),
}
# Parameters that only need to be >= 0 (all other numbers must be > 0).
_MAY_BE_ZERO: Final = frozenset({
    "time.latency_ms", "time.prefill_attn_ms_per_mtoken2", "time.kv_ms_per_ktoken",
    "power.clock_w", "power.compute_w", "power.kv_w", "engine.kv_watermark",
    "clocking.switch_latency_s",
})

# Kept under the twin's name for the tools that list what the twin can simulate.
available_profiles = available_setups


def load_profile(name_or_path: str | Path) -> SetupProfile:
    """Load a shipped profile by name (`DEFAULT_SETUP`) or any profile file by path."""
    doc, where = read_document(name_or_path)
    name, description = document_header(doc, where)
    built, sources = parse_sections(doc, where, _SECTIONS)
    setup = Setup(name=name, description=description, path=where,
                  sources=MappingProxyType({k: v for k, v in sources.items()
                                            if k.partition(".")[0] in SETUP_SECTIONS}),
                  **{k: v for k, v in built.items() if k in SETUP_SECTIONS})
    profile = SetupProfile(setup=setup, time=built["time"], power=built["power"],
                           clocking=built["clocking"], sources=MappingProxyType(sources))
    _validate(profile)
    return profile


def _validate(p: SetupProfile) -> None:
    """Range and consistency checks, with messages that name the parameter."""
    where = p.path or p.name
    validate_setup(p, where, may_be_zero=_MAY_BE_ZERO)
    check_ranges({k: getattr(p, k) for k in ("time", "power", "clocking")},
                 {k: _SECTIONS[k] for k in ("time", "power", "clocking")}, where, _MAY_BE_ZERO)
    p.clocking.locked_idle_points  # noqa: B018 - parses (raises ConfigError when malformed)
    g = p.gpu
    pw = p.power
    if not 0 < pw.voltage_min_ratio <= 1:
        raise ConfigError(f"profile {where}: power.voltage_min_ratio must be in (0, 1]")
    if pw.voltage_knee_mhz >= g.clock_max_mhz:
        raise ConfigError(f"profile {where}: power.voltage_knee_mhz must be below the top clock")
    if pw.static_w >= g.power_cap_w:
        raise ConfigError(f"profile {where}: power.static_w must be below gpu.power_cap_w")

"""SLO classes and the check of a finished request against its class.

Per request, as the paper sets them, bounds scale with the request's own size:
- TTFT bound  = ttft_base_ms + ttft_ms_per_prompt_token × prompt tokens
- TBT bound   = tbt_ms on the request's mean time between tokens
- E2E bound   = TTFT bound + tbt_ms × (generated tokens − 1)
The defaults are ours (≈3–5× the H100's top-clock decode step at typical batch sizes); set
your own per class in a TOML file (`--slo-config`, `parse_slo_classes`).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from throttllem._errors import ConfigError
from throttllem._events import RequestCompleted


class SloClass(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    tbt_ms: float = 50.0
    ttft_base_ms: float = 500.0
    ttft_ms_per_prompt_token: float = 0.25

    def ttft_bound_ms(self, prompt_tokens: int) -> float:
        return self.ttft_base_ms + self.ttft_ms_per_prompt_token * prompt_tokens

    def e2e_bound_ms(self, prompt_tokens: int, generated_tokens: int) -> float:
        return self.ttft_bound_ms(prompt_tokens) + self.tbt_ms * max(generated_tokens - 1, 0)


DEFAULT_SLO_CLASSES: Mapping[str, SloClass] = {
    "standard": SloClass(name="standard"),
    "interactive": SloClass(name="interactive", tbt_ms=30.0, ttft_base_ms=300.0),
    "batch": SloClass(name="batch", tbt_ms=200.0, ttft_base_ms=5000.0,
                      ttft_ms_per_prompt_token=1.0),
}


def tightened(slo: SloClass, *, prompt_tokens: int, ttft_ms: float | None,
              tbt_ms: float | None) -> SloClass:
    """A request's own latency bounds (llm-d's `x-slo-ttft-ms`, `x-slo-tpot-ms`) on top of
    its class: each may only tighten the class's bound, never loosen it."""
    if ttft_ms is None and tbt_ms is None:
        return slo
    tighter = slo
    if tbt_ms is not None and tbt_ms < slo.tbt_ms:
        tighter = msgspec.structs.replace(tighter, tbt_ms=tbt_ms)
    if ttft_ms is not None and ttft_ms < slo.ttft_bound_ms(prompt_tokens):
        tighter = msgspec.structs.replace(tighter, ttft_base_ms=ttft_ms,
                                          ttft_ms_per_prompt_token=0.0)
    return tighter


_SLO_KEYS = ("tbt_ms", "ttft_base_ms", "ttft_ms_per_prompt_token")


def parse_slo_classes(text: str, *, source: str = "SLO config") -> dict[str, SloClass]:
    """SLO classes from a TOML document (pure): one table per class, e.g.

        [standard]
        tbt_ms = 40.0
        [premium]
        tbt_ms = 25.0
        ttft_base_ms = 250.0

    A class in the file replaces the built-in class of that name; keys it leaves out keep the
    built-in class's value (or the `standard` defaults for a new class). Built-in classes the
    file does not name stay. Unknown keys, non-numbers and non-positive bounds are refused:
    a typo must not silently leave a class at its default."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    classes = dict(DEFAULT_SLO_CLASSES)
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name!r} must be a table ([{name}]) of "
                              f"{', '.join(_SLO_KEYS)}")
        unknown = sorted(set(table) - set(_SLO_KEYS))
        if unknown:
            raise ConfigError(f"{source}: [{name}] has unknown key(s) {unknown}; "
                              f"known: {list(_SLO_KEYS)}")
        values: dict[str, float] = {}
        for key, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{source}: [{name}] {key} must be a number, not {value!r}")
            if not math.isfinite(value) or value < 0 or (key == "tbt_ms" and value == 0):
                raise ConfigError(f"{source}: [{name}] {key} = {value} is out of range "
                                  f"({'> 0' if key == 'tbt_ms' else '>= 0'}, finite)")
            values[key] = float(value)
        base = DEFAULT_SLO_CLASSES.get(name, SloClass(name=name))
        classes[name] = msgspec.structs.replace(base, name=name, **values)
    return classes


def require_slo_class(name: str, classes: Mapping[str, SloClass]) -> SloClass:
    """The class `name`, or a clear error naming the known ones."""
    slo = classes.get(name)
    if slo is None:
        raise ConfigError(f"unknown SLO class {name!r}; known: {sorted(classes)} (define it "
                          f"in the --slo-config file)")
    return slo


def load_slo_classes(path: Path | None) -> dict[str, SloClass]:
    """The SLO classes of a TOML file (None: the built-in ones)."""
    if path is None:
        return dict(DEFAULT_SLO_CLASSES)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the SLO config {path}: {e.strerror or e}") from e
    return parse_slo_classes(text, source=str(path))


class SloOutcome(msgspec.Struct, frozen=True, kw_only=True):
    ttft_ok: bool
    tbt_ok: bool
    e2e_ok: bool

    @property
    def all_ok(self) -> bool:
        return self.ttft_ok and self.tbt_ok and self.e2e_ok


def check_slo(done: RequestCompleted,
              classes: Mapping[str, SloClass] = DEFAULT_SLO_CLASSES) -> SloOutcome:
    slo = require_slo_class(done.slo_class, classes)
    return SloOutcome(
        ttft_ok=done.ttft_ms <= slo.ttft_bound_ms(done.prompt_tokens),
        tbt_ok=done.tbt_mean_ms <= slo.tbt_ms,
        e2e_ok=done.e2e_ms <= slo.e2e_bound_ms(done.prompt_tokens, done.generated_tokens),
    )

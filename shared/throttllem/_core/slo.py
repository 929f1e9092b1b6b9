"""SLO classes and the check of a finished request against its class.

Per request, as the paper sets them, bounds scale with the request's own size:
- TTFT bound  = ttft_base_ms + ttft_ms_per_prompt_token × prompt tokens
- TBT bound   = tbt_ms on the request's mean time between tokens
- E2E bound   = TTFT bound + tbt_ms × (generated tokens − 1)
The defaults are ours (≈3–5× the H100's top-clock decode step at typical batch sizes); set
your own per class in the config.
"""

from __future__ import annotations

from collections.abc import Mapping

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


class SloOutcome(msgspec.Struct, frozen=True, kw_only=True):
    ttft_ok: bool
    tbt_ok: bool
    e2e_ok: bool

    @property
    def all_ok(self) -> bool:
        return self.ttft_ok and self.tbt_ok and self.e2e_ok


def check_slo(done: RequestCompleted,
              classes: Mapping[str, SloClass] = DEFAULT_SLO_CLASSES) -> SloOutcome:
    slo = classes.get(done.slo_class)
    if slo is None:
        raise ConfigError(f"unknown SLO class {done.slo_class!r}; known: {sorted(classes)}")
    return SloOutcome(
        ttft_ok=done.ttft_ms <= slo.ttft_bound_ms(done.prompt_tokens),
        tbt_ok=done.tbt_mean_ms <= slo.tbt_ms,
        e2e_ok=done.e2e_ms <= slo.e2e_bound_ms(done.prompt_tokens, done.generated_tokens),
    )

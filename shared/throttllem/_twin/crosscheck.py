"""The twin's power model against published clock-locked H100 figures it was not fitted to.

Source: arrays in a public vLLM fork's frequency-modulator code (the GPU inferred from its
1830 MHz top clock and ~694 W busy power, so an H100 SXM): power of a 2048-token prefill at a
locked clock, given here as ratios to the 1830 MHz value. The twin was fitted to our own
measured table (all at the card's own clock) and its clock dependence is stated assumptions,
so this is an independent check of those assumptions, not a calibration.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from throttllem._twin.clockmodel import estimate
from throttllem._twin.profile import SetupProfile

PREFILL_TOKENS: Final = 2048
REFERENCE_MHZ: Final = 1830
# clock (MHz) -> (low, high) published prefill-power ratio to the 1830 MHz value.
PUBLISHED_PREFILL_RATIOS: Final[dict[int, tuple[float, float]]] = {
    1080: (0.49, 0.71),
    1380: (0.69, 0.95),
}


class PrefillRatio(NamedTuple):
    clock_mhz: int
    twin_power_w: float
    twin_ratio: float
    published_low: float
    published_high: float

    @property
    def verdict(self) -> str:
        if self.twin_ratio < self.published_low:
            return "below the published range"
        if self.twin_ratio > self.published_high:
            return "above the published range"
        return "within the published range"


def prefill_power_ratios(profile: SetupProfile) -> list[PrefillRatio]:
    """The twin's power for one 2048-token prefill (one sequence) at each published clock,
    and its ratio to the twin's power at 1830 MHz (the clock the card settles on under its
    power cap, as the twin GPU would run it)."""

    def power_at(clock_mhz: int) -> float:
        est = estimate(profile, batch=0, kv_tokens=0, prefill_tokens=PREFILL_TOKENS,
                       requested_clock_mhz=clock_mhz,
                       prefill_attn_tokens2=float(PREFILL_TOKENS) ** 2)
        return float(est.power_w)

    reference = power_at(REFERENCE_MHZ)
    out = []
    for clock, (low, high) in PUBLISHED_PREFILL_RATIOS.items():
        watts = power_at(clock)
        out.append(PrefillRatio(clock, watts, watts / reference, low, high))
    return out

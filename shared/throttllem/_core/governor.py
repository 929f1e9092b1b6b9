"""A reactive DVFS governor (the "retail-like" baseline, `--policy retail`).

It stands for the utilization-driven governors the paper compares against: it sees only what
an NVML-style monitor sees (busy fraction and the pass times it measured over a period),
never predictions. It reacts once the pass time has drifted toward the TBT bound, and creeps
down while there is room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from throttllem._core.clock_search import SupportedClocks


@dataclass(frozen=True, slots=True)
class ReactiveGovernor:
    """Every `period_s` the governor steps the clock from what it measured:

    - busy fraction below `idle_below`: the floor clock (nothing to serve);
    - mean pass time ≥ `jump_at` × TBT bound: the top clock (QoS at risk);
    - ≥ `raise_at` × TBT bound: `raise_steps` supported clocks up;
    - < `lower_below` × TBT bound: one step down, never below the floor clock.
    """

    period_s: float = 1.0
    idle_below: float = 0.05
    jump_at: float = 0.9
    raise_at: float = 0.7
    lower_below: float = 0.5
    raise_steps: int = 4


@dataclass(slots=True)
class Measured:
    """What a monitor saw of one instance since the governor's last period."""

    busy_s: float = 0.0
    pass_ms_sum: float = 0.0
    passes: int = 0

    def add_pass(self, duration_ms: float) -> None:
        self.busy_s += duration_ms / 1e3
        self.pass_ms_sum += duration_ms
        self.passes += 1

    @property
    def mean_pass_ms(self) -> float:
        return self.pass_ms_sum / self.passes if self.passes else math.nan


def reactive_clock(gov: ReactiveGovernor, clocks: SupportedClocks, floor_mhz: int,
                   current_mhz: int, *, busy_fraction: float, mean_pass_ms: float,
                   tbt_bound_ms: float) -> int:
    """The governor's next clock from what it measured (a pure function)."""
    mhz = clocks.mhz
    if busy_fraction < gov.idle_below or math.isnan(mean_pass_ms):
        return floor_mhz
    k = clocks.index(current_mhz)
    if mean_pass_ms >= gov.jump_at * tbt_bound_ms:
        return mhz[-1]
    if mean_pass_ms >= gov.raise_at * tbt_bound_ms:
        return mhz[min(k + gov.raise_steps, len(mhz) - 1)]
    if mean_pass_ms < gov.lower_below * tbt_bound_ms and current_mhz > floor_mhz:
        return max(mhz[k - 1], floor_mhz)
    return current_mhz

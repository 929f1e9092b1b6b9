"""What holding and changing an SM clock costs, as the controller sees it.

Two published effects (sources in the setup profile's `[clocking]` section): a GPU locked at a
clock draws more while idle than one left unlocked, more the higher the lock; and a clock
change takes a while to complete (the old clock holds meanwhile). The controller uses them
for two decisions, both pure functions here:

- **release the lock when idle** (ski rental): an idle instance's lock costs
  `locked_w(f) − unlocked_w` every second; releasing it costs, when work returns, one switch
  latency of passes at the default (top) clock instead of the locked one, about
  `relock_penalty_w × switch_latency_s`. Waiting that break-even time before releasing is the
  deterministic rule that never pays more than twice the best choice in hindsight, whatever
  the idle gaps;
- **no lowering step that cannot pay off**: a lower clock saves only once its switch
  completes, so the dwell before a lowering step is at least one switch latency, and it
  doubles (up to `MAX_BACKOFF` times) after each lowering that was undone within one switch
  latency (it saved nothing and cost a switch), back to normal once a lowering holds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from throttllem._errors import ConfigError


def interpolate_idle_w(points: tuple[tuple[float, float], ...], clock_mhz: float) -> float:
    """Idle power at a locked clock from (MHz, W) points: linear in between, the first value
    below the first point, the last segment's slope above the last point."""
    if clock_mhz <= points[0][0]:
        return points[0][1]
    for (f0, w0), (f1, w1) in itertools.pairwise(points):
        if clock_mhz <= f1:
            return w0 + (w1 - w0) * (clock_mhz - f0) / (f1 - f0)
    (f0, w0), (f1, w1) = points[-2], points[-1]
    return w1 + (w1 - w0) * (clock_mhz - f1) / (f1 - f0)


@dataclass(frozen=True, slots=True)
class IdlePower:
    """Idle power of one GPU unlocked and locked, and the busy-power cost of re-locking."""

    unlocked_w: float
    # (MHz, W) ascending: idle power while locked at that clock.
    locked_points: tuple[tuple[float, float], ...]
    # Extra busy power of a pass at the default clock instead of the locked one (W): what the
    # passes run during a re-lock's switch latency cost.
    relock_penalty_w: float

    def __post_init__(self) -> None:
        if len(self.locked_points) < 2 or self.unlocked_w <= 0 or self.relock_penalty_w < 0:
            raise ConfigError("IdlePower needs two locked points, unlocked_w > 0 and "
                              "relock_penalty_w >= 0")

    def locked_w(self, clock_mhz: float) -> float:
        return interpolate_idle_w(self.locked_points, clock_mhz)

    def release_after_s(self, clock_mhz: float, switch_latency_s: float) -> float | None:
        """Seconds of idling after which releasing a lock at `clock_mhz` pays (the break-even
        of the ski-rental rule); None: an unlocked GPU idles no cheaper, never release."""
        saving_w = self.locked_w(clock_mhz) - self.unlocked_w
        if saving_w <= 0:
            return None
        return switch_latency_s * self.relock_penalty_w / saving_w


MAX_BACKOFF = 6  # at most 2**6 times the dwell


def lowering_dwell_s(min_dwell_s: float, switch_latency_s: float, backoff: int) -> float:
    """Seconds a clock must have held before it may be lowered."""
    return max(min_dwell_s, switch_latency_s) * 2.0 ** backoff


def next_backoff(backoff: int, lowered_held_s: float, switch_latency_s: float) -> int:
    """The back-off after the last lowering held `lowered_held_s` before the next change."""
    if lowered_held_s < switch_latency_s:
        return min(backoff + 1, MAX_BACKOFF)
    return 0

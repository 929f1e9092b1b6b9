"""The controller's view of clock costs (`_core.switching`) from a twin profile's
`[clocking]` section and power model, for the evaluator and the live forecaster alike."""

from __future__ import annotations

from throttllem._core.switching import IdlePower
from throttllem._twin.clockmodel import estimate
from throttllem._twin.profile import SetupProfile


def controller_idle_power(profile: SetupProfile) -> IdlePower | None:
    """Unlocked and locked idle power per GPU, and what re-locking costs: the extra busy power
    of a typical decode pass (batch 32, 1k-token contexts: the pass the clock floor is chosen
    on) at the default clock over the floor clock. None: the profile's idle power is flat
    (releasing a lock saves nothing)."""
    points = profile.clocking.locked_idle_points
    if points is None:
        return None
    g = profile.gpu
    at = estimate(profile, batch=32, kv_tokens=32 * 1024, prefill_tokens=0,
                  requested_clock_mhz=[g.default_clock_mhz, profile.controller.floor_mhz])
    penalty_w = max(float(at.power_w[0] - at.power_w[1]), 0.0)
    return IdlePower(unlocked_w=g.idle_power_w, locked_points=points,
                     relock_penalty_w=penalty_w)

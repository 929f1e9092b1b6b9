"""What the frequency actuator does with a clock target: pure decisions, time passed in.

Fail-safe rules (the GPU must never be left stuck slow):
- a target is honoured for its lease; with no fresh target by then, clocks go back to the
  GPU's default (fast) — so a dead or partitioned controller costs energy, never SLOs;
- an unsupported clock is refused, never rounded silently: the controller's search runs over
  the supported list, so an off-list value is a bug to surface;
- on shutdown clocks are reset (the shell does that, shielded from cancellation);
- a lock or reset that failed leaves the clocks unknown: a reset is retried every
  `RESET_RETRY_S` until one succeeds (`reset_pending`), and a default target then resets too.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import msgspec

from throttllem._errors import ClockOutOfRangeError
from throttllem._events import FreqTarget

# Seconds between retries of a reset that failed (NVML permission or driver errors repeat,
# so retrying on every tick would only flood the log).
RESET_RETRY_S = 5.0


class Action(Enum):
    LOCK = "lock"
    RESET = "reset"
    NONE = "none"


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    action: Action
    clock_mhz: int | None
    reason: str


class LeaseState(msgspec.Struct, frozen=True, kw_only=True):
    """What is applied now and until when it holds (event time)."""

    clock_mhz: int | None = None  # None: GPU default clocks
    expires_s: float | None = None
    # A lock or reset failed: the clocks may be stuck; reset again from this instant on.
    reset_pending: bool = False
    retry_at_s: float = 0.0


def after_failure(now_s: float, retry_s: float = RESET_RETRY_S) -> LeaseState:
    """The state once applying a decision failed: clocks unknown, retry a reset later."""
    return LeaseState(reset_pending=True, retry_at_s=now_s + retry_s)


def validate_clock(clock_mhz: float, supported_mhz: Sequence[int]) -> int:
    """The clock as an int, or ClockOutOfRangeError naming the valid range."""
    as_int = round(clock_mhz)
    if abs(clock_mhz - as_int) > 1e-6 or as_int not in supported_mhz:
        raise ClockOutOfRangeError(
            f"{clock_mhz:g} MHz is not a supported SM clock (supported: "
            f"{min(supported_mhz)}–{max(supported_mhz)} MHz, {len(supported_mhz)} values)")
    return as_int


def on_target(state: LeaseState, target: FreqTarget, now_s: float,
              supported_mhz: Sequence[int]) -> tuple[LeaseState, Decision]:
    """Apply a fresh target. Raises ClockOutOfRangeError for an unsupported clock."""
    if target.lease_s <= 0:
        raise ClockOutOfRangeError(f"lease must be positive, got {target.lease_s}")
    if target.clock_mhz is None:
        action = (Action.NONE if state.clock_mhz is None and not state.reset_pending
                  else Action.RESET)
        return (LeaseState(clock_mhz=None, expires_s=None),
                Decision(action=action, clock_mhz=None, reason=target.reason or "default"))
    clock = validate_clock(target.clock_mhz, supported_mhz)
    action = Action.NONE if clock == state.clock_mhz else Action.LOCK
    return (LeaseState(clock_mhz=clock, expires_s=now_s + target.lease_s),
            Decision(action=action, clock_mhz=clock, reason=target.reason))


def on_tick(state: LeaseState, now_s: float) -> tuple[LeaseState, Decision]:
    """Called periodically: reset to default clocks once the lease has run out, or retry a
    reset that failed."""
    if state.reset_pending and now_s >= state.retry_at_s:
        return (LeaseState(), Decision(action=Action.RESET, clock_mhz=None,
                                       reason="retrying a reset after a failed change"))
    if state.clock_mhz is not None and state.expires_s is not None and now_s >= state.expires_s:
        return (LeaseState(), Decision(action=Action.RESET, clock_mhz=None,
                                       reason="lease expired: no fresh target from the controller"))
    return state, Decision(action=Action.NONE, clock_mhz=state.clock_mhz, reason="")

"""The autoscaler: how many engine instances of a setup to run, by load thresholds.

Pure decisions with time passed in; the `scaler` service only wires subjects to them.
The paper scales the number of instances coarsely with predetermined load thresholds and
leaves fine control to frequency scaling; this module is that coarse loop.

Load `L` and per-instance capacity `C` share one unit (requests/s or tokens/s: the caller
picks, the formulas do not care). `C` is what one instance of the setup sustains within its
SLOs, measured offline for the (GPU, model, TP) setup and passed in (`ScalingPolicy`).

Instances are in one of three phases:
- **warming** (`W` of them): ordered, drawing idle power, serving nothing for `warmup_s`;
- **active** (`A`): serving;
- **draining** (`D`): chosen for scale-in, admitted nothing new, finishing what it holds.

`provisioned = A + W + D` is what runs (and draws power): it is the `instances` of the
orchestrator-neutral `scale.target` event. Serving capacity is `C × A` only: warming and
draining instances never count as capacity.

Each `decide()` call first does housekeeping, then at most one scaling decision:

1. a warming instance whose `warmup_s` has passed becomes active (`ready`);
2. a draining instance with no outstanding request is removed (`remove`); with
   `drain_timeout_s` set, also one that has drained that long without finishing;
3. **scale out** when `L > out_threshold × C × (A + W)` and `A + W < max_instances`:
   a draining instance, if any, is taken back at once (`undrain`: it is warm already),
   else a new one is ordered (`scale-out`, warming). Warming instances count as *coming*
   here, so one that is still warming is not ordered twice for the same load;
4. **scale in** when `L < in_threshold × C × (A − 1)`, `A > min_instances`, nothing is
   warming and nothing is draining: the active instance with the fewest outstanding requests
   (ties: the last in order) starts draining (`drain`); it is removed by rule 2 later, never
   in the decision that picked it, so the controller gets at least one tick to stop
   admitting to it;
5. below `min_instances` active-or-coming (start-up, or instances lost), instances are
   ordered regardless of load; no decision is made within `cooldown_s` of the last scaling
   decision (3, 4, 5; housekeeping is not a decision and runs every call).

Hysteresis: with `in_threshold < out_threshold` (enforced) a constant load cannot flap. After
scale-out to `n` instances, `L > out × C × (n − 1)`; scaling back in needs
`L < in × C × (n − 1)`, which contradicts it; symmetrically after scale-in to `n`,
`L < in × C × n < out × C × n`, so no scale-out follows. Bounds: `A + W ≤ max_instances` and
`A ≥ min_instances` once reached; `provisioned` may exceed `max_instances` only while
instances drain and never by more than the draining ones.

The load estimate (`LoadEstimator`) is the weighted count of arrivals in the sliding window
`(now − window_s, now]` divided by `window_s` (weights 1 for requests/s, token counts for
tokens/s). During the first window after the scaler starts it would under-estimate and
drain instances that the load needs (a cold start of the scaler, not of the load), so
`LoadEstimator.rate_if_known` answers None then, and `decide` with `load_rps=None` makes no
load-based decision (it still enforces `min_instances` and does the housekeeping).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Final, NamedTuple

import msgspec

from throttllem._errors import ConfigError
from throttllem._events import ScaleTarget

# How often the scaler decides, and the window its load estimate spans (seconds, event time):
# the live scaler's and the evaluator's defaults.
SCALE_TICK_S: Final = 1.0
LOAD_WINDOW_S: Final = 10.0


class ScalingPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Thresholds and limits for one setup. `capacity_per_instance` is in the load's unit."""

    capacity_per_instance: float
    out_threshold: float = 0.8
    in_threshold: float = 0.5
    min_instances: int = 1
    max_instances: int = 8
    warmup_s: float = 60.0
    cooldown_s: float = 30.0
    # None: a draining instance is removed only once it holds no request (the default).
    drain_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.capacity_per_instance > 0:
            raise ConfigError(f"capacity_per_instance must be > 0, not "
                              f"{self.capacity_per_instance}")
        if not 0 < self.in_threshold < self.out_threshold:
            raise ConfigError(
                f"need 0 < in_threshold < out_threshold (hysteresis), got "
                f"{self.in_threshold} and {self.out_threshold}")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ConfigError(f"need 1 <= min_instances <= max_instances, got "
                              f"{self.min_instances} and {self.max_instances}")
        if self.warmup_s < 0 or self.cooldown_s < 0:
            raise ConfigError("warmup_s and cooldown_s must be >= 0")
        if self.drain_timeout_s is not None and self.drain_timeout_s < 0:
            raise ConfigError("drain_timeout_s must be >= 0 or None")


class Phase(Enum):
    WARMING = "warming"
    ACTIVE = "active"
    DRAINING = "draining"


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    phase: Phase
    since_s: float  # when it entered `phase` (event time)


class ScalerState(msgspec.Struct, frozen=True, kw_only=True):
    """The instances of one setup and when the last scaling decision was made."""

    instances: tuple[Instance, ...] = ()
    last_decision_s: float | None = None
    name_prefix: str = "i"

    @classmethod
    def initial(cls, names: Iterable[str], now_s: float, *,
                name_prefix: str = "i") -> ScalerState:
        """Instances already running (and serving) when the scaler starts."""
        names = list(names)
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate instance names: {names}")
        return cls(instances=tuple(Instance(name=n, phase=Phase.ACTIVE, since_s=now_s)
                                   for n in names), name_prefix=name_prefix)

    def names(self, phase: Phase | None = None) -> list[str]:
        return [i.name for i in self.instances if phase is None or i.phase is phase]

    def count(self, phase: Phase) -> int:
        return sum(1 for i in self.instances if i.phase is phase)

    @property
    def provisioned(self) -> int:
        """Instances that exist and draw power: what `scale.target` asks the orchestrator for."""
        return len(self.instances)

    @property
    def serving(self) -> int:
        return self.count(Phase.ACTIVE)

    def serving_capacity(self, policy: ScalingPolicy) -> float:
        """Capacity that serves load now: active instances only."""
        return policy.capacity_per_instance * self.serving

    def next_name(self) -> str:
        """The smallest `<prefix><k>` not in use (ordinal names, as a StatefulSet has)."""
        used = set(self.names())
        k = 0
        while f"{self.name_prefix}{k}" in used:
            k += 1
        return f"{self.name_prefix}{k}"


class Action(Enum):
    READY = "ready"          # warm-up over: the instance serves now
    REMOVE = "remove"        # a drained instance goes away
    SCALE_OUT = "scale-out"  # a new instance is ordered (warming)
    UNDRAIN = "undrain"      # a draining instance serves again (scale-out without warm-up)
    DRAIN = "drain"          # scale-in starts: admit nothing new to this instance


class Change(msgspec.Struct, frozen=True, kw_only=True):
    action: Action
    instance: str
    reason: str


class ScaleDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The new state, and what changed (nothing: publish nothing)."""

    state: ScalerState
    changes: tuple[Change, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def instances(self) -> int:
        return self.state.provisioned

    @property
    def reason(self) -> str:
        """One line, machine-readable: `<action> <instance>: <why>; ...`."""
        return "; ".join(f"{c.action.value} {c.instance}: {c.reason}" for c in self.changes)


def _replace(state: ScalerState, name: str, phase: Phase | None, now_s: float) -> ScalerState:
    """`name` moved to `phase` (None: removed)."""
    out: list[Instance] = []
    for inst in state.instances:
        if inst.name != name:
            out.append(inst)
        elif phase is not None:
            out.append(Instance(name=name, phase=phase, since_s=now_s))
    return msgspec.structs.replace(state, instances=tuple(out))


def decide(state: ScalerState, load_rps: float | None, now_s: float, policy: ScalingPolicy, *,
           outstanding: Mapping[str, int] | None = None) -> ScaleDecision:
    """One step of the autoscaler (formulas in the module docstring).

    `load_rps` is the estimated load in the unit of `policy.capacity_per_instance` (None:
    not known yet, so no load-based decision);
    `outstanding` maps instance names to requests admitted and not completed (a missing
    name counts as 0).
    """
    held = outstanding or {}
    cap = policy.capacity_per_instance
    changes: list[Change] = []

    # -- housekeeping: warm-up ends, drains finish
    for inst in state.instances:
        if inst.phase is Phase.WARMING and now_s - inst.since_s >= policy.warmup_s:
            state = _replace(state, inst.name, Phase.ACTIVE, now_s)
            changes.append(Change(action=Action.READY, instance=inst.name,
                                  reason=f"warm-up of {policy.warmup_s:g} s over"))
        elif inst.phase is Phase.DRAINING and now_s > inst.since_s:
            left = max(0, held.get(inst.name, 0))
            timed_out = (policy.drain_timeout_s is not None
                         and now_s - inst.since_s >= policy.drain_timeout_s)
            if left == 0 or timed_out:
                state = _replace(state, inst.name, None, now_s)
                why = "drained" if left == 0 else (
                    f"drain timed out after {policy.drain_timeout_s:g} s with {left} left")
                changes.append(Change(action=Action.REMOVE, instance=inst.name, reason=why))

    # -- at most one scaling decision, outside the cool-down
    cooling = (state.last_decision_s is not None
               and now_s - state.last_decision_s < policy.cooldown_s)
    if not cooling:
        active = state.count(Phase.ACTIVE)
        warming = state.count(Phase.WARMING)
        draining = state.names(Phase.DRAINING)
        coming = active + warming
        change: Change | None = None
        if coming < policy.max_instances and (
                coming < policy.min_instances
                or (load_rps is not None and load_rps > policy.out_threshold * cap * coming)):
            why = (f"below min_instances={policy.min_instances}"
                   if coming < policy.min_instances else
                   f"load {load_rps:.3g} > {policy.out_threshold:g} × {cap:g} × {coming}")
            if draining:
                name = draining[-1]
                state = _replace(state, name, Phase.ACTIVE, now_s)
                change = Change(action=Action.UNDRAIN, instance=name, reason=why)
            else:
                name = state.next_name()
                state = msgspec.structs.replace(state, instances=(
                    *state.instances, Instance(name=name, phase=Phase.WARMING, since_s=now_s)))
                change = Change(action=Action.SCALE_OUT, instance=name,
                                reason=f"{why}, warming {policy.warmup_s:g} s")
        elif (load_rps is not None and active > policy.min_instances and warming == 0
              and not draining and load_rps < policy.in_threshold * cap * (active - 1)):
            candidates = [i for i in state.instances if i.phase is Phase.ACTIVE]
            # fewest outstanding; ties: the last (the newest ordinal), as a StatefulSet would
            victim = min(reversed(candidates), key=lambda i: max(0, held.get(i.name, 0)))
            state = _replace(state, victim.name, Phase.DRAINING, now_s)
            change = Change(
                action=Action.DRAIN, instance=victim.name,
                reason=(f"load {load_rps:.3g} < {policy.in_threshold:g} × {cap:g} × "
                        f"{active - 1}; {max(0, held.get(victim.name, 0))} outstanding"))
        if change is not None:
            changes.append(change)
            state = msgspec.structs.replace(state, last_decision_s=now_s)
    return ScaleDecision(state=state, changes=tuple(changes))


class LoadEstimator:
    """Load over a sliding window: weighted arrivals in `(now − window_s, now]` / `window_s`.

    Deterministic: the result depends only on the observed (time, weight) pairs and `now_s`,
    not on the order they were observed in (arrivals may come slightly out of order).
    """

    def __init__(self, window_s: float = 10.0, *, started_s: float | None = None) -> None:
        if not window_s > 0:
            raise ConfigError(f"window_s must be > 0, not {window_s}")
        self.window_s = window_s
        self.started_s = started_s  # when observing began (None: long ago)
        self._times: list[float] = []
        self._weights: list[float] = []

    def observe(self, t_s: float, weight: float = 1.0) -> None:
        k = bisect.bisect_right(self._times, t_s)
        self._times.insert(k, t_s)
        self._weights.insert(k, weight)

    def _prune(self, now_s: float) -> None:
        k = bisect.bisect_right(self._times, now_s - self.window_s)
        if k:
            del self._times[:k]
            del self._weights[:k]

    def rate(self, now_s: float) -> float:
        """The load at `now_s`; forgets arrivals older than the window."""
        self._prune(now_s)
        hi = bisect.bisect_right(self._times, now_s)
        return sum(self._weights[:hi]) / self.window_s

    def rate_if_known(self, now_s: float) -> float | None:
        """`rate`, or None while less than one window has been observed since `started_s`."""
        if self.started_s is not None and now_s - self.started_s < self.window_s:
            return None
        return self.rate(now_s)

    def __len__(self) -> int:
        return len(self._times)


class Phases(NamedTuple):
    warming: list[str]
    active: list[str]
    draining: list[str]


def phases_of(target: ScaleTarget) -> Phases | None:
    """The instances of a `scale.target` by phase; None when the publisher did not say."""
    if len(target.warming) + len(target.active) + len(target.draining) != target.instances:
        return None
    return Phases(list(target.warming), list(target.active), list(target.draining))

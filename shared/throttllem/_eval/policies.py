"""The evaluator's policies: the live services' decisions, called in simulated time.

Every policy is one `ComposedPolicy`: an admission rule, a clock rule and (optionally) the
autoscaler, each calling the same core functions as the live services.

| policy | admission | clocks | instances |
| --- | --- | --- | --- |
| `default` | join-shortest-queue, at once | GPU default (the top clock) | fixed, sized for peak |
| `autoscale` | join-shortest-queue over serving instances | GPU default | `scaling.decide` |
| `freq` | `place` (lowest feasible clock), FCFS deferral | `retune` + `next_clock` | fixed |
| `throttllem` | `place`, FCFS deferral | `retune` + `next_clock` | `scaling.decide` |
| `retail` | join-shortest-queue | reactive governor (`reactive_clock`) | fixed |
| `static` | join-shortest-queue | one clock: the lowest meeting the SLOs at peak | fixed |

`default` is the live `--policy default`; `freq` is the live `--policy throttllem` (the demo
runs a fixed instance count); `throttllem` adds the `scaler` service's decisions, as the
paper's full system does. `retail` stands for the reactive, utilization-driven DVFS governors
the paper compares against: it sees only what an NVML-style monitor sees (busy fraction and
the pass times it measured), never predictions. `static` is what an operator would set by
hand after profiling: the clock search of `static_clock` runs the peak minutes of the very
window at fixed clocks and keeps the lowest that meets the attainment target.

The scaler's rules, thresholds and state are `throttllem._core.scaling`'s; here it acts on
the simulation directly: `scale-out` adds an instance (it draws idle power through its
warm-up and serves only once `ready`), `drain` stops routing to it, `remove` deletes it once
it holds nothing.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from throttllem._core.clock_search import SupportedClocks, next_clock
from throttllem._core.controller import (
    EngineShape,
    InstanceTracker,
    Policy,
    never_fits,
    place,
    planned_lengths,
    retune,
)
from throttllem._core.forecast import Candidate
from throttllem._core.routing import least_loaded
from throttllem._core.scaling import (
    Action,
    LoadEstimator,
    Phase,
    ScalerState,
    ScalingPolicy,
    decide,
)
from throttllem._core.slo import DEFAULT_SLO_CLASSES, SloClass, require_slo_class
from throttllem._core.slo_check import RequestSlo
from throttllem._errors import ConfigError
from throttllem._events import EngineIteration, RequestArrived, RequestCompleted

if TYPE_CHECKING:
    from throttllem._eval.sim import Simulation

Admission = Literal["jsq", "place"]
ClockRule = Literal["top", "predictive", "reactive", "static"]


@dataclass(frozen=True, slots=True)
class PolicySpec:
    admission: Admission
    clocks: ClockRule
    scaling: bool


POLICY_SPECS: Mapping[str, PolicySpec] = {
    "default": PolicySpec(admission="jsq", clocks="top", scaling=False),
    "autoscale": PolicySpec(admission="jsq", clocks="top", scaling=True),
    "freq": PolicySpec(admission="place", clocks="predictive", scaling=False),
    "throttllem": PolicySpec(admission="place", clocks="predictive", scaling=True),
    "retail": PolicySpec(admission="jsq", clocks="reactive", scaling=False),
    "static": PolicySpec(admission="jsq", clocks="static", scaling=False),
}
POLICIES = tuple(POLICY_SPECS)
# Policies whose decisions use length predictions (and so depend on the length error).
PREDICTIVE = tuple(n for n, s in POLICY_SPECS.items() if s.admission == "place")


def _live_default(cls: type, name: str) -> float:
    """A live service's default for a knob, so the evaluator and the service cannot drift."""
    value = inspect.signature(cls.__init__).parameters[name].default  # type: ignore[misc]
    if not isinstance(value, int | float):
        raise TypeError(f"{cls.__name__}.{name} has no numeric default")
    return float(value)


def forecaster_default(name: str) -> float:
    from throttllem._services.forecaster import ForecasterService  # noqa: PLC0415

    return _live_default(ForecasterService, name)


def scaler_default(name: str) -> float:
    from throttllem._services.scaler import ScalerService  # noqa: PLC0415

    return _live_default(ScalerService, name)


# --------------------------------------------------------------------------- reactive governor


@dataclass(frozen=True, slots=True)
class ReactiveGovernor:
    """A reactive DVFS governor (the "retail-like" baseline): every `period_s` it looks at
    what a monitor measured over the period, the busy fraction and the mean pass time, and
    steps the clock. It never predicts: it reacts once the pass time has drifted toward the
    TBT bound, and creeps down while there is room.

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


# --------------------------------------------------------------------------- the policy


class SimPolicy:
    """Hooks the simulation calls; the base does nothing and wants no ticks."""

    name = "base"
    tick_s: float | None = None
    deferred = 0

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        raise NotImplementedError

    def on_iteration(self, sim: Simulation, it: EngineIteration) -> None:
        return None

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        return None

    def on_tick(self, sim: Simulation) -> None:
        return None


@dataclass(slots=True)
class _Measured:
    """What a monitor saw of one instance since the governor's last period."""

    busy_s: float = 0.0
    pass_ms_sum: float = 0.0
    passes: int = 0


class ComposedPolicy(SimPolicy):
    """One admission rule, one clock rule, optionally the autoscaler (see the module table)."""

    def __init__(self, name: str, instances: Sequence[str], *, spec: PolicySpec,
                 policy: Policy | None = None, shape: EngineShape | None = None,
                 predictions: Mapping[str, tuple[float, float]] | None = None,
                 scaling: ScalingPolicy | None = None, static_clock_mhz: int | None = None,
                 governor: ReactiveGovernor | None = None, tick_s: float = 0.1,
                 scale_tick_s: float | None = None, load_window_s: float | None = None,
                 slo_classes: Mapping[str, SloClass] | None = None) -> None:
        needs_controller = spec.admission == "place" or spec.clocks in ("predictive", "reactive")
        if needs_controller and (policy is None or shape is None):
            raise ConfigError(f"policy {name!r} needs the controller's policy and shape")
        if spec.admission == "place" and predictions is None:
            raise ConfigError(f"policy {name!r} needs length predictions")
        if spec.scaling and scaling is None:
            raise ConfigError(f"policy {name!r} needs a scaling policy (capacity per instance)")
        if spec.clocks == "static" and static_clock_mhz is None:
            raise ConfigError(f"policy {name!r} needs its static clock")
        self.name = name
        self.spec = spec
        self.policy = policy
        self.shape = shape
        self.predictions = predictions or {}
        self.slo_classes = dict(slo_classes or DEFAULT_SLO_CLASSES)
        self.static_clock_mhz = static_clock_mhz
        self.governor = governor or ReactiveGovernor()
        ticking = spec.clocks in ("predictive", "reactive") or spec.scaling
        self.tick_s = tick_s if ticking else None
        self.min_dwell_s = forecaster_default("min_dwell_s")
        self.down_margin_steps = int(forecaster_default("down_margin_steps"))
        self.trackers: dict[str, InstanceTracker] = {}
        self.outstanding: dict[str, int] = {}
        self.clock_mhz: dict[str, int] = {}
        self.changed_s: dict[str, float] = {}
        self.measured: dict[str, _Measured] = {}
        self.pending: deque[RequestArrived] = deque()
        self.deferred = 0
        self._governed_s = 0.0
        # The governor honours the tightest TBT bound of the classes it has served.
        self._governed_tbt_ms = math.inf
        # autoscaler
        self.scaling = scaling if spec.scaling else None
        self.scale_tick_s = (scaler_default("tick_s") if scale_tick_s is None
                             else scale_tick_s)
        self.load = LoadEstimator(scaler_default("window_s") if load_window_s is None
                                  else load_window_s, started_s=0.0)
        self.scaler_state: ScalerState | None = None
        self._scaled_s = -math.inf
        self.scale_log: list[tuple[float, str]] = []
        self._initial = list(instances)
        self._started = False

    # ------------------------------------------------------------------ instances

    def _start(self, sim: Simulation) -> None:
        if self._started:
            return
        self._started = True
        for name in self._initial:
            self._instance_added(sim, name)
        if self.scaling is not None:
            self.scaler_state = ScalerState.initial(self._initial, sim.now_s)

    def _instance_added(self, sim: Simulation, name: str) -> None:
        self.outstanding[name] = 0
        self.measured[name] = _Measured()
        if self.shape is not None:
            self.trackers[name] = InstanceTracker(name, self.shape)
        if self.spec.clocks == "static":
            assert self.static_clock_mhz is not None
            sim.set_clock(name, self.static_clock_mhz)
        elif self.spec.clocks != "top":
            assert self.policy is not None
            self.clock_mhz[name] = self.policy.clocks.mhz[-1]
            self.changed_s[name] = -math.inf

    def _instance_removed(self, name: str) -> None:
        for table in (self.outstanding, self.measured, self.trackers, self.clock_mhz,
                      self.changed_s):
            table.pop(name, None)

    def serving(self) -> list[str]:
        """Where new requests may go: every instance, or the scaler's active ones."""
        if self.scaler_state is None:
            return list(self.outstanding)
        return self.scaler_state.names(Phase.ACTIVE)

    # ------------------------------------------------------------------ clocks

    def _slo(self, request: RequestArrived) -> SloClass:
        return require_slo_class(request.slo_class, self.slo_classes)

    def _set_clock(self, sim: Simulation, instance: str, proposed_mhz: int) -> None:
        """Through the live forecaster's hysteresis (`next_clock`)."""
        assert self.policy is not None
        step = next_clock(self.clock_mhz[instance], self.changed_s[instance], proposed_mhz,
                          sim.now_s, min_dwell_s=self.min_dwell_s,
                          down_margin_steps=self.down_margin_steps, clocks=self.policy.clocks)
        self.clock_mhz[instance], self.changed_s[instance] = step.clock_mhz, step.changed_s
        sim.set_clock(instance, step.clock_mhz)

    def _retune_all(self, sim: Simulation) -> None:
        assert self.policy is not None
        for instance, tracker in self.trackers.items():
            self._set_clock(sim, instance, retune(tracker, self.policy, now_s=sim.now_s))

    def _govern(self, sim: Simulation) -> None:
        assert self.policy is not None
        period = sim.now_s - self._governed_s
        if period < self.governor.period_s:
            return
        self._governed_s = sim.now_s
        tbt_bound_ms = (self._governed_tbt_ms if math.isfinite(self._governed_tbt_ms)
                        else self.slo_classes["standard"].tbt_ms)
        for instance, seen in self.measured.items():
            mean_ms = seen.pass_ms_sum / seen.passes if seen.passes else math.nan
            clock = reactive_clock(self.governor, self.policy.clocks, self.policy.floor_mhz,
                                   self.clock_mhz[instance],
                                   busy_fraction=min(seen.busy_s / period, 1.0),
                                   mean_pass_ms=mean_ms, tbt_bound_ms=tbt_bound_ms)
            self.clock_mhz[instance] = clock
            sim.set_clock(instance, clock)
            self.measured[instance] = _Measured()

    # ------------------------------------------------------------------ admission

    def _lengths(self, request: RequestArrived) -> tuple[float, float]:
        """(median, upper) to plan with: the prediction, clipped as the live forecaster does."""
        assert self.shape is not None
        median, upper = self.predictions[request.id]
        return planned_lengths(self.shape, prompt_tokens=request.prompt_tokens,
                               max_tokens=request.max_tokens, predicted_tokens=median,
                               upper_tokens=upper)

    def _track(self, request: RequestArrived, instance: str) -> None:
        tracker = self.trackers.get(instance)
        if tracker is None or request.id not in self.predictions:
            return
        median, upper = self._lengths(request)
        tracker.admitted(request.id, prompt_tokens=request.prompt_tokens,
                         predicted_tokens=median, upper_tokens=upper,
                         arrival_s=request.arrival_s, slo=self._slo(request))

    def _admit(self, sim: Simulation, request: RequestArrived, instance: str) -> bool:
        self._track(request, instance)
        if not sim.admit(instance, request):
            if instance in self.trackers:
                self.trackers[instance].completed(request.id)  # refused: no ghost pins clocks
            return False
        self.outstanding[instance] += 1
        return True

    def _try_place(self, sim: Simulation, request: RequestArrived) -> bool:
        """Place and admit (or refuse for good, as the live forecaster); False: deferred
        (nothing changed)."""
        assert self.policy is not None
        assert self.shape is not None
        why = never_fits(self.shape, request.prompt_tokens)
        if why is not None:
            sim.refuse(request.id, f"controller: {why}")
            return True
        median, upper = self._lengths(request)
        candidate = Candidate(prompt_tokens=request.prompt_tokens, predicted_tokens=median,
                              upper_tokens=upper)
        candidate_slo = RequestSlo.for_request(self._slo(request),
                                               prompt_tokens=request.prompt_tokens,
                                               arrival_s=request.arrival_s)
        serving = {n: self.trackers[n] for n in self.serving()}
        if not serving:
            return False
        placement = place(serving, candidate, candidate_slo, self.policy, now_s=sim.now_s)
        if placement is None:
            return False
        # Raise the clock first if the new request needs it, then admit (as the service).
        self._set_clock(sim, placement.instance, placement.clock_mhz)
        self._admit(sim, request, placement.instance)
        return True

    def _jsq(self, sim: Simulation, request: RequestArrived) -> bool:
        serving = self.serving()
        if not serving:
            return False
        self._admit(sim, request, least_loaded({n: self.outstanding[n] for n in serving}))
        return True

    def _try(self, sim: Simulation, request: RequestArrived) -> bool:
        if self.spec.admission == "place":
            return self._try_place(sim, request)
        return self._jsq(sim, request)

    def _drain_pending(self, sim: Simulation) -> None:
        while self.pending and self._try(sim, self.pending[0]):
            self.pending.popleft()

    # ------------------------------------------------------------------ hooks

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        self._start(sim)
        self.load.observe(request.arrival_s)
        if self.spec.clocks == "reactive":
            self._governed_tbt_ms = min(self._governed_tbt_ms, self._slo(request).tbt_ms)
        if self.pending:  # FCFS: nothing jumps ahead of a deferred request
            self.pending.append(request)
            self._drain_pending(sim)
            return
        if not self._try(sim, request):
            self.pending.append(request)
            self.deferred += 1

    def on_iteration(self, sim: Simulation, it: EngineIteration) -> None:
        end_s = it.start_s + it.duration_ms / 1e3
        tracker = self.trackers.get(it.instance)
        if tracker is not None:
            tracker.iteration(it.request_ids, end_s)
        seen = self.measured.get(it.instance)
        if seen is not None:
            seen.busy_s += it.duration_ms / 1e3
            seen.pass_ms_sum += it.duration_ms
            seen.passes += 1

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        if done.instance in self.outstanding:
            self.outstanding[done.instance] = max(self.outstanding[done.instance] - 1, 0)
        tracker = self.trackers.get(done.instance)
        if tracker is not None:
            tracker.completed(done.id)
        if self.pending:
            self._drain_pending(sim)

    def on_tick(self, sim: Simulation) -> None:
        self._start(sim)
        if self.scaling is not None and sim.now_s - self._scaled_s >= self.scale_tick_s:
            self._scaled_s = sim.now_s
            self._scale(sim)
        if self.spec.clocks == "predictive":
            self._retune_all(sim)
        elif self.spec.clocks == "reactive":
            self._govern(sim)
        if self.pending:
            self._drain_pending(sim)

    # ------------------------------------------------------------------ autoscaler

    def _scale(self, sim: Simulation) -> None:
        assert self.scaling is not None
        assert self.scaler_state is not None
        now_s = sim.now_s
        decision = decide(self.scaler_state, self.load.rate_if_known(now_s), now_s, self.scaling,
                          outstanding={n: sim.outstanding(n) for n in sim.instances})
        self.scaler_state = decision.state
        for change in decision.changes:
            if change.action is Action.SCALE_OUT:
                sim.add_instance(change.instance)
                self._instance_added(sim, change.instance)
            elif change.action is Action.REMOVE:
                sim.remove_instance(change.instance)
                self._instance_removed(change.instance)
        if decision.changed:
            self.scale_log.append((now_s, decision.reason))


# --------------------------------------------------------------------------- construction


def oracle_predictions(requests: Sequence[RequestArrived], length_error: float | str,
                       seed: int, *, key_prefix: str = "throttllem-",
                       ) -> dict[str, tuple[float, float]]:
    """(median, upper) per request id from the oracle length predictor, as the live
    length-predictor service computes them (keyed by request id; `key_prefix` is the demo's
    run tag, so the noise drawn per request is the very same as in `throttllem demo`)."""
    from throttllem._length.oracle import OraclePredictor  # noqa: PLC0415

    oracle = OraclePredictor(length_error, seed=seed)  # type: ignore[arg-type]
    if not requests:
        return {}
    median, upper = oracle.predict(
        np.asarray([r.true_output_tokens or 0 for r in requests], dtype=np.float64),
        keys=[key_prefix + r.id for r in requests])
    return {r.id: (m, u) for r, m, u in zip(requests, median.tolist(), upper.tolist(),
                                            strict=True)}


def make_policy(name: str, instances: Sequence[str], *, policy: Policy | None = None,
                shape: EngineShape | None = None,
                predictions: Mapping[str, tuple[float, float]] | None = None,
                scaling: ScalingPolicy | None = None, static_clock_mhz: int | None = None,
                tick_s: float = 0.1, label: str | None = None,
                slo_classes: Mapping[str, SloClass] | None = None) -> ComposedPolicy:
    """The policy `name` (one of `POLICIES`); `label` names it in reports (default: name)."""
    spec = POLICY_SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return ComposedPolicy(label or name, instances, spec=spec, policy=policy, shape=shape,
                          predictions=predictions, scaling=scaling,
                          static_clock_mhz=static_clock_mhz, tick_s=tick_s,
                          slo_classes=slo_classes)


def lowest_passing_clock(clocks: Sequence[int], passes: Callable[[int], bool]) -> int | None:
    """The lowest of `clocks` (ascending) for which `passes` holds, by bisection: assumes a
    clock that passes keeps passing above it (the attainment of a fixed-clock run rises
    with the clock). None: not even the top clock passes."""
    lo, hi = 0, len(clocks) - 1
    if not passes(clocks[hi]):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(clocks[mid]):
            hi = mid
        else:
            lo = mid + 1
    return clocks[lo]

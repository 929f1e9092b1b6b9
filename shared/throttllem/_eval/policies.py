"""The evaluator's policies: the live controller and scaler, applied to the simulation.

Every policy is the controller (`throttllem._core.controller.Controller`, the very object the
live forecaster drives) with one admission rule and one clock rule, optionally with the
scaler's decisions (`throttllem._core.scaling.decide`, as the live `scaler` service makes
them). This module only applies their decisions to the simulated engines.

| policy | admission | clocks | instances |
| --- | --- | --- | --- |
| `default` | join-shortest-queue, at once | GPU default (the top clock) | fixed, sized for peak |
| `autoscale` | join-shortest-queue over serving instances | GPU default | `scaling.decide` |
| `freq` | `place` (lowest feasible clock), FCFS deferral | `retune` + `next_clock` | fixed |
| `throttllem` | `place`, FCFS deferral | `retune` + `next_clock` | `scaling.decide` |
| `retail` | join-shortest-queue | reactive governor (`reactive_clock`) | fixed |
| `static` | join-shortest-queue | one clock: the lowest meeting the SLOs at peak | fixed |
| `agft` | join-shortest-queue | AGFT's contextual bandit (`peers.AgftBandit`) | fixed |
| `voltana` | join-shortest-queue | VoltanaLLM's EcoFreq (`peers.VoltanaEcoFreq`) | fixed |
| `freq-pack` | `place`, packing ties (`Policy.pack`), FCFS deferral | as `freq` | fixed |
| `throttllem-pack` | as `freq-pack` | as `freq` | `scaling.decide` |

`default`, `retail`, `freq` and `freq-pack` are the live `--policy default`, `retail`,
`throttllem` and `throttllem-pack` (the demo runs a fixed instance count); `throttllem` adds
the scaler, as the paper's full system does. `static` is what an operator would set by hand
after profiling: the clock search of `static_clock_mhz` runs the peak minutes of the very
window at fixed clocks and keeps the lowest that meets the attainment target.

The scaler acts on the simulation directly: `scale-out` adds an instance (it draws idle power
through its warm-up and serves only once `ready`), `drain` stops routing to it, `remove`
deletes it once it holds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from throttllem._core.controller import (
    AdmissionRule,
    Admit,
    ClockRule,
    Controller,
    ControllerConfig,
    Decision,
    Defer,
    Refuse,
    SetClock,
)
from throttllem._core.placement import EngineShape, Policy
from throttllem._core.scaling import (
    LOAD_WINDOW_S,
    SCALE_TICK_S,
    Action,
    LoadEstimator,
    Phase,
    ScalerState,
    ScalingPolicy,
    decide,
)
from throttllem._core.slo import SloClass
from throttllem._core.switching import IdlePower
from throttllem._errors import ConfigError
from throttllem._eval.sim import SimPolicy, Simulation
from throttllem._events import EngineIteration, RequestArrived, RequestCompleted


@dataclass(frozen=True, slots=True)
class PolicySpec:
    admission: AdmissionRule
    clocks: ClockRule
    scaling: bool
    # Among instances that take a request at the same clock, the busiest first (`place`).
    pack: bool = False


POLICY_SPECS: Mapping[str, PolicySpec] = {
    "default": PolicySpec(admission="jsq", clocks="top", scaling=False),
    "autoscale": PolicySpec(admission="jsq", clocks="top", scaling=True),
    "freq": PolicySpec(admission="place", clocks="predictive", scaling=False),
    "throttllem": PolicySpec(admission="place", clocks="predictive", scaling=True),
    "retail": PolicySpec(admission="jsq", clocks="reactive", scaling=False),
    "static": PolicySpec(admission="jsq", clocks="static", scaling=False),
    # Published peers' clock rules, on the same engines and requests (`_core/peers.py`).
    "agft": PolicySpec(admission="jsq", clocks="agft", scaling=False),
    "voltana": PolicySpec(admission="jsq", clocks="voltana", scaling=False),
    # Admission that lets batches grow within the SLOs (`placement.admission_order`).
    "freq-pack": PolicySpec(admission="place", clocks="predictive", scaling=False, pack=True),
    "throttllem-pack": PolicySpec(admission="place", clocks="predictive", scaling=True,
                                  pack=True),
}
POLICIES = tuple(POLICY_SPECS)
# What an evaluation runs unless told otherwise: the variants (`pack`) only on request.
DEFAULT_POLICIES = tuple(n for n, s in POLICY_SPECS.items() if not s.pack)
# Policies whose decisions use length predictions (and so depend on the length error).
PREDICTIVE = tuple(n for n, s in POLICY_SPECS.items() if s.admission == "place")


class ControlledPolicy(SimPolicy):
    """The controller (and optionally the scaler) driving the simulation."""

    def __init__(self, name: str, instances: Sequence[str], *, spec: PolicySpec,
                 shape: EngineShape, policy: Policy | None = None,
                 predictions: Mapping[str, tuple[float, float]] | None = None,
                 scaling: ScalingPolicy | None = None, static_clock_mhz: int | None = None,
                 tick_s: float = 0.1, slo_classes: Mapping[str, SloClass] | None = None,
                 idle_power: IdlePower | None = None, switch_latency_s: float = 0.0,
                 ) -> None:
        if spec.admission == "place" and predictions is None:
            raise ConfigError(f"policy {name!r} needs length predictions")
        if spec.scaling and scaling is None:
            raise ConfigError(f"policy {name!r} needs a scaling policy (capacity per instance)")
        if spec.clocks == "static" and static_clock_mhz is None:
            raise ConfigError(f"policy {name!r} needs its static clock")
        self.name = name
        self.spec = spec
        self.controller = Controller(
            ControllerConfig(admission=spec.admission, clocks=spec.clocks,
                             static_clock_mhz=static_clock_mhz, idle_power=idle_power,
                             switch_latency_s=switch_latency_s, pack=spec.pack),
            shape=shape, policy=policy, slo_classes=slo_classes)
        self.predictions = predictions or {}
        ticking = spec.clocks in ("predictive", "reactive", "agft", "voltana") or spec.scaling
        self.tick_s = tick_s if ticking else None
        self.scaling = scaling if spec.scaling else None
        self.scale_tick_s = SCALE_TICK_S
        self.load = LoadEstimator(LOAD_WINDOW_S, started_s=0.0)
        self.scaler_state: ScalerState | None = None
        self._scaled_s = -math.inf
        self.scale_log: list[tuple[float, str]] = []
        self._initial = list(instances)
        self._started = False

    @property
    def deferred(self) -> int:  # type: ignore[override]
        return self.controller.deferred

    # ------------------------------------------------------------------ decisions out

    def _apply(self, sim: Simulation, decisions: list[Decision]) -> None:
        for d in decisions:
            match d:
                case SetClock():
                    sim.set_clock(d.instance, d.clock_mhz)
                case Admit():
                    if not sim.admit(d.instance, d.request):  # the engine refused it
                        self._apply(sim, self.controller.forget(d.request.id, sim.now_s))
                case Refuse():
                    sim.refuse(d.request_id, d.reason)
                case Defer():
                    pass

    # ------------------------------------------------------------------ instances

    def _start(self, sim: Simulation) -> None:
        if self._started:
            return
        self._started = True
        for name in self._initial:
            self._apply(sim, self.controller.add_instance(name))
        if self.scaling is not None:
            self.scaler_state = ScalerState.initial(self._initial, sim.now_s)
            self.controller.set_serving(self.scaler_state.names(Phase.ACTIVE))

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
                self._apply(sim, self.controller.add_instance(change.instance))
            elif change.action is Action.REMOVE:
                sim.remove_instance(change.instance)
                self.controller.remove_instance(change.instance)
        self.controller.set_serving(self.scaler_state.names(Phase.ACTIVE))
        if decision.changed:
            self.scale_log.append((now_s, decision.reason))

    # ------------------------------------------------------------------ hooks

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        self._start(sim)
        self.load.observe(request.arrival_s)
        lengths = self.predictions.get(request.id) if self.predictions else None
        self._apply(sim, self.controller.offer(request, lengths, sim.now_s))

    def on_iteration(self, sim: Simulation, it: EngineIteration) -> None:
        self.controller.iteration(it.instance, it.request_ids,
                                  it.start_s + it.duration_ms / 1e3, it.duration_ms, engine=it)

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        self._apply(sim, self.controller.completed(done.id, done.instance, sim.now_s))

    def on_tick(self, sim: Simulation) -> None:
        self._start(sim)
        if self.scaling is not None and sim.now_s - self._scaled_s >= self.scale_tick_s:
            self._scaled_s = sim.now_s
            self._scale(sim)
        self._apply(sim, self.controller.tick(sim.now_s))


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


def make_policy(name: str, instances: Sequence[str], *, shape: EngineShape,
                policy: Policy | None = None,
                predictions: Mapping[str, tuple[float, float]] | None = None,
                scaling: ScalingPolicy | None = None, static_clock_mhz: int | None = None,
                tick_s: float = 0.1, label: str | None = None,
                slo_classes: Mapping[str, SloClass] | None = None,
                idle_power: IdlePower | None = None,
                switch_latency_s: float = 0.0) -> ControlledPolicy:
    """The policy `name` (one of `POLICIES`); `label` names it in reports (default: name).
    `idle_power` and `switch_latency_s`: the clock costs the controller knows of."""
    spec = POLICY_SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return ControlledPolicy(label or name, instances, spec=spec, shape=shape, policy=policy,
                            predictions=predictions, scaling=scaling,
                            static_clock_mhz=static_clock_mhz, tick_s=tick_s,
                            slo_classes=slo_classes, idle_power=idle_power,
                            switch_latency_s=switch_latency_s)


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

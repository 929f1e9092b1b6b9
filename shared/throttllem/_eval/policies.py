"""The evaluator's policies: the live forecaster's decisions, called in simulated time.

- `default`: join-shortest-queue routing (`least_loaded`), admit at once, clocks left at the
  GPU default (1980 MHz on the H100, its top clock), as the live `--policy default`.
- `freq`: clock control only. Routing as `default` (no placement, no deferral), but every
  instance's requests are tracked (`InstanceTracker`) with their predicted lengths, and its
  clock is retuned (`retune` + `next_clock` hysteresis) on every admission and every tick.
- `throttllem`: the live `--policy throttllem`: `place` on each predicted arrival (deferred
  requests wait in a FCFS queue retried on completions and ticks), `retune` + `next_clock`
  on every tick.

A policy is a `SimPolicy`: hooks called by `Simulation` (arrival, iteration, completion,
tick) that act through `Simulation.admit` and `Simulation.set_clock`. A scaling policy plugs
in the same way (its `on_tick` decides the instance count; the simulation would need
`add_instance`/`drain_instance`, not built yet).
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from throttllem._core.clock_search import next_clock
from throttllem._core.controller import EngineShape, InstanceTracker, Policy, place, retune
from throttllem._core.forecast import Candidate
from throttllem._core.routing import least_loaded
from throttllem._core.slo import DEFAULT_SLO_CLASSES, SloClass
from throttllem._core.slo_check import RequestSlo
from throttllem._errors import ConfigError
from throttllem._events import EngineIteration, RequestArrived, RequestCompleted

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from throttllem._eval.sim import Simulation

POLICIES = ("default", "freq", "throttllem")


def _forecaster_default(name: str) -> float:
    """The live forecaster's default for a knob, so the two cannot drift apart."""
    from throttllem._services.forecaster import ForecasterService  # noqa: PLC0415

    value = inspect.signature(ForecasterService.__init__).parameters[name].default
    assert isinstance(value, int | float)
    return float(value)


class SimPolicy:
    """Hooks the simulation calls; the base does nothing and wants no ticks."""

    name = "base"
    tick_s: float | None = None

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        raise NotImplementedError

    def on_iteration(self, sim: Simulation, it: EngineIteration) -> None:
        return None

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        return None

    def on_tick(self, sim: Simulation) -> None:
        return None


class DefaultPolicy(SimPolicy):
    name = "default"

    def __init__(self, instances: Sequence[str]) -> None:
        self.outstanding = dict.fromkeys(instances, 0)

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        instance = least_loaded(self.outstanding)
        if sim.admit(instance, request):
            self.outstanding[instance] += 1

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        self.outstanding[done.instance] = max(self.outstanding[done.instance] - 1, 0)


class ClockControlPolicy(SimPolicy):
    """`freq`: least-loaded routing, admit at once, retune every instance's clock."""

    name = "freq"

    def __init__(self, instances: Sequence[str], policy: Policy, shape: EngineShape,
                 predictions: Mapping[str, tuple[float, float]], *, tick_s: float = 0.1,
                 min_dwell_s: float | None = None, down_margin_steps: int | None = None,
                 slo_classes: Mapping[str, SloClass] | None = None) -> None:
        self.policy = policy
        self.predictions = predictions
        self.tick_s = tick_s
        self.min_dwell_s = (_forecaster_default("min_dwell_s") if min_dwell_s is None
                            else min_dwell_s)
        self.down_margin_steps = (int(_forecaster_default("down_margin_steps"))
                                  if down_margin_steps is None else down_margin_steps)
        self.slo_classes = dict(slo_classes or DEFAULT_SLO_CLASSES)
        self.outstanding = dict.fromkeys(instances, 0)
        self.trackers = {i: InstanceTracker(i, shape) for i in instances}
        top = policy.clocks.mhz[-1]
        self.clock_mhz = dict.fromkeys(instances, top)
        self.changed_s = dict.fromkeys(instances, -math.inf)
        self.pending: deque[RequestArrived] = deque()  # throttllem's deferrals
        self.deferred = 0

    def _slo(self, request: RequestArrived) -> SloClass:
        slo = self.slo_classes.get(request.slo_class)
        if slo is None:
            raise ConfigError(f"unknown SLO class {request.slo_class!r}")
        return slo

    def _set_clock(self, sim: Simulation, instance: str, proposed_mhz: int) -> None:
        step = next_clock(self.clock_mhz[instance], self.changed_s[instance], proposed_mhz,
                          sim.now_s, min_dwell_s=self.min_dwell_s,
                          down_margin_steps=self.down_margin_steps, clocks=self.policy.clocks)
        self.clock_mhz[instance], self.changed_s[instance] = step.clock_mhz, step.changed_s
        sim.set_clock(instance, step.clock_mhz)

    def _admit(self, sim: Simulation, request: RequestArrived, instance: str) -> bool:
        median, upper = self.predictions[request.id]
        tracker = self.trackers[instance]
        tracker.admitted(request.id, prompt_tokens=request.prompt_tokens,
                         predicted_tokens=median, upper_tokens=upper,
                         arrival_s=request.arrival_s, slo=self._slo(request))
        if not sim.admit(instance, request):
            tracker.completed(request.id)  # refused for good: no ghost pins the clock
            return False
        self.outstanding[instance] += 1
        return True

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        instance = least_loaded(self.outstanding)
        if self._admit(sim, request, instance):
            self._set_clock(sim, instance,
                            retune(self.trackers[instance], self.policy, now_s=sim.now_s))

    def on_iteration(self, sim: Simulation, it: EngineIteration) -> None:
        self.trackers[it.instance].iteration(it.request_ids, it.start_s + it.duration_ms / 1e3)

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        self.outstanding[done.instance] = max(self.outstanding[done.instance] - 1, 0)
        self.trackers[done.instance].completed(done.id)

    def on_tick(self, sim: Simulation) -> None:
        for instance, tracker in self.trackers.items():
            self._set_clock(sim, instance, retune(tracker, self.policy, now_s=sim.now_s))


class ThrottllemPolicy(ClockControlPolicy):
    """Placement (`place`) with FCFS deferral, plus clock control."""

    name = "throttllem"

    def _try(self, sim: Simulation, request: RequestArrived) -> bool:
        """Place and admit; False: deferred (nothing changed)."""
        median, upper = self.predictions[request.id]
        slo = self._slo(request)
        candidate = Candidate(prompt_tokens=request.prompt_tokens, predicted_tokens=median,
                              upper_tokens=max(upper, median))
        candidate_slo = RequestSlo.for_request(slo, prompt_tokens=request.prompt_tokens,
                                               arrival_s=request.arrival_s)
        placement = place(self.trackers, candidate, candidate_slo, self.policy,
                          now_s=sim.now_s)
        if placement is None:
            return False
        # Raise the clock first if the new request needs it, then admit (as the service).
        self._set_clock(sim, placement.instance, placement.clock_mhz)
        self._admit(sim, request, placement.instance)
        return True

    def _drain(self, sim: Simulation) -> None:
        while self.pending and self._try(sim, self.pending[0]):
            self.pending.popleft()

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        if self.pending:  # FCFS: nothing jumps ahead of a deferred request
            self.pending.append(request)
            self._drain(sim)
            return
        if not self._try(sim, request):
            self.pending.append(request)
            self.deferred += 1

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        super().on_completed(sim, done)
        self._drain(sim)

    def on_tick(self, sim: Simulation) -> None:
        super().on_tick(sim)
        self._drain(sim)


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
                tick_s: float = 0.1) -> SimPolicy:
    if name == "default":
        return DefaultPolicy(instances)
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    if policy is None or shape is None or predictions is None:
        raise ConfigError(f"policy {name!r} needs a controller policy, shape and predictions")
    cls = ThrottllemPolicy if name == "throttllem" else ClockControlPolicy
    return cls(instances, policy, shape, predictions, tick_s=tick_s)

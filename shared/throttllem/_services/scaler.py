"""The autoscaler: decides how many engine instances of a setup should run and publishes
`tllm.v1.scale.target`, the orchestrator-neutral event a Kubernetes/podman adapter acts on.

It watches the load (`request.arrived`, core subscription: it only needs the rate) and each
instance's outstanding requests (`request.admitted.*` adds, `request.completed` removes,
`engine.iteration.*` adds what it sees running, so a scaler started late still knows), and
every `tick_s` runs the pure `decide()` of `throttllem._core.scaling`. It publishes a
`ScaleTarget` when something changed (the reason says what: `scale-out i2: ...`,
`drain i1: ...`, `remove i1: drained`, ...) and otherwise only re-announces the current target
every `reannounce_s` of event time, so that an orchestrator (re)started later catches up.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import anyio
import anyio.abc
import structlog

from throttllem import _metrics as m
from throttllem._bus import Bus
from throttllem._core.scaling import (
    LOAD_WINDOW_S,
    SCALE_TICK_S,
    Action,
    LoadEstimator,
    Phase,
    ScaleDecision,
    ScalerState,
    ScalingPolicy,
    decide,
)
from throttllem._errors import ConfigError
from throttllem._events import (
    ENGINE_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
    ScaleTarget,
)
from throttllem._runtime import Clock
from throttllem._subjects import (
    ENGINE_ITERATION_ALL,
    REQUEST_ABORTED,
    REQUEST_ADMITTED_ALL,
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    SCALE_TARGET,
    token,
)

log = structlog.get_logger("throttllem.scaler")

LoadUnit = Literal["requests", "prompt_tokens"]


class ScalerService:
    name = "scaler"

    def __init__(self, *, setup: str, policy: ScalingPolicy, instances: list[str],
                 unit: LoadUnit = "requests", window_s: float = LOAD_WINDOW_S,
                 tick_s: float = SCALE_TICK_S,
                 reannounce_s: float = 30.0, name_prefix: str = "i",
                 remember_completed: int = 100_000, max_outstanding: int = 100_000) -> None:
        """`policy.capacity_per_instance` is in `unit` per second (requests/s, or prompt
        tokens/s); `instances` are those running when the scaler starts (all serving).
        `max_outstanding`: ids tracked per instance at most (an id that never completes,
        e.g. one named only by an iteration, is forgotten first once the bound is hit)."""
        if unit not in ("requests", "prompt_tokens"):
            raise ConfigError(f"unit must be 'requests' or 'prompt_tokens', not {unit!r}")
        if tick_s <= 0 or reannounce_s <= 0:
            raise ConfigError("tick_s and reannounce_s must be > 0")
        self.setup = setup
        self.policy = policy
        self.initial_instances = [token(i) for i in instances]
        self.unit: LoadUnit = unit
        self.tick_s = tick_s
        self.reannounce_s = reannounce_s
        self.name_prefix = token(name_prefix)
        self.estimator = LoadEstimator(window_s)
        self.state = ScalerState(name_prefix=self.name_prefix)
        # instance -> ids admitted there and not completed
        # (a dict as an ordered set: the oldest id goes first when the bound is hit)
        self.outstanding: dict[str, dict[str, None]] = {}
        self.max_outstanding = max_outstanding
        self.forgotten = 0  # ids dropped by that bound
        self._completed: set[str] = set()
        self._completed_order: deque[str] = deque()
        self._remember = remember_completed
        self.published: list[ScaleTarget] = []
        self._last_announce_s: float | None = None
        self.load = 0.0
        self.metrics = m.ServiceMetrics(self.name)
        self._target = self.metrics.gauge(m.SCALE_TARGET).labels(setup)
        self._phases = self.metrics.gauge(m.SCALE_PHASE)
        self._load = self.metrics.gauge(m.SCALE_LOAD).labels(setup, unit)
        self._decisions = self.metrics.counter(m.SCALE_DECISIONS)

    # ------------------------------------------------------------------ observations

    def _hold(self, instance: str, request_id: str) -> None:
        if request_id in self._completed:
            return
        ids = self.outstanding.setdefault(instance, {})
        ids[request_id] = None
        while len(ids) > self.max_outstanding:
            del ids[next(iter(ids))]
            self.forgotten += 1

    def _done(self, request_id: str) -> None:
        for ids in self.outstanding.values():
            ids.pop(request_id, None)
        if request_id not in self._completed:
            self._completed.add(request_id)
            self._completed_order.append(request_id)
            while len(self._completed_order) > self._remember:
                self._completed.discard(self._completed_order.popleft())

    async def _on_request(self, event: RequestEvent) -> None:
        if isinstance(event, RequestArrived):
            weight = 1.0 if self.unit == "requests" else float(event.prompt_tokens)
            self.estimator.observe(event.arrival_s, weight)
        elif isinstance(event, RequestAdmitted):
            self._hold(event.instance, event.request.id)
        elif isinstance(event, RequestCompleted | RequestAborted) or (
                isinstance(event, RequestDeferred) and event.final):
            self._done(event.id)  # a request ended without completing holds nothing either

    async def _on_iteration(self, event: EngineIteration) -> None:
        for request_id in event.request_ids:
            self._hold(event.instance, request_id)

    def outstanding_counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.outstanding.items()}

    def health_metrics(self) -> dict[str, float]:
        return {"load": self.load, "instances": float(self.state.provisioned),
                "serving": float(self.state.serving),
                "warming": float(self.state.count(Phase.WARMING)),
                "draining": float(self.state.count(Phase.DRAINING)),
                "ids_forgotten": float(self.forgotten)}

    # ------------------------------------------------------------------ deciding

    def step(self, now_s: float) -> ScaleDecision:
        """One decision at `now_s` (the shell's tick; also callable directly)."""
        load = self.estimator.rate_if_known(now_s)
        self.load = -1.0 if load is None else load  # heartbeat: -1 while not known yet
        decision = decide(self.state, load, now_s, self.policy,
                          outstanding=self.outstanding_counts())
        self.state = decision.state
        for change in decision.changes:
            if change.action is Action.REMOVE:
                self.outstanding.pop(change.instance, None)
            self._decisions.labels(self.setup, change.action.value).inc()
        self._observe_state()
        return decision

    def _observe_state(self) -> None:
        self._load.set(self.load)
        for phase in Phase:
            self._phases.labels(self.setup, phase.value).set(self.state.count(phase))

    async def _announce(self, bus: Bus, now_s: float, reason: str) -> None:
        state = self.state
        target = ScaleTarget(setup=self.setup, instances=state.provisioned,
                             decided_s=now_s, reason=reason,
                             warming=state.names(Phase.WARMING),
                             active=state.names(Phase.ACTIVE),
                             draining=state.names(Phase.DRAINING))
        self.published.append(target)
        self._target.set(target.instances)
        self._last_announce_s = now_s
        await bus.publish(SCALE_TARGET, target)
        bus.counters["scale_targets"] += 1

    def _summary(self) -> str:
        parts = [f"{phase.value}={','.join(self.state.names(phase)) or '-'}" for phase in Phase]
        return " ".join(parts)

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        now_s = clock.now_s()
        self.estimator.started_s = now_s
        self.state = ScalerState.initial(self.initial_instances, now_s,
                                         name_prefix=self.name_prefix)
        await bus.subscribe(REQUEST_ARRIVED, REQUEST_CODEC, self._on_request)
        await bus.subscribe(REQUEST_ADMITTED_ALL, REQUEST_CODEC, self._on_request)
        await bus.subscribe(REQUEST_COMPLETED, REQUEST_CODEC, self._on_request)
        await bus.subscribe(REQUEST_ABORTED, REQUEST_CODEC, self._on_request)
        await bus.subscribe(REQUEST_DEFERRED, REQUEST_CODEC, self._on_request)
        await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, self._on_iteration)
        log.info("scaler.started", setup=self.setup, instances=self.initial_instances,
                 capacity=self.policy.capacity_per_instance, unit=self.unit)
        self._observe_state()
        await self._announce(bus, now_s, f"start: {self._summary()}")
        task_status.started()
        while True:
            await anyio.sleep(self.tick_s)
            now_s = clock.now_s()
            decision = self.step(now_s)
            if decision.changed:
                log.info("scaler.decided", setup=self.setup, instances=decision.instances,
                         load=round(self.load, 3), reason=decision.reason)
                await self._announce(bus, now_s, f"{decision.reason}; {self._summary()}")
            elif (self._last_announce_s is not None
                  and now_s - self._last_announce_s >= self.reannounce_s):
                await self._announce(bus, now_s, f"re-announce: {self._summary()}")


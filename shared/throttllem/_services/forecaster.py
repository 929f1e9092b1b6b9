"""The forecaster / SLO checker service: the controller (`throttllem._core.controller`) on the
bus. It decodes events, calls the controller, and publishes its decisions; it decides nothing.

- Requests come from `request.predicted` for policies that plan with length predictions
  (`throttllem`) and from `request.arrived` for the rest (`default`, `retail`), through a
  durable JetStream consumer per policy, so a restarted forecaster resumes where it stopped.
- `engine.iteration.*`, `request.completed`, final `request.deferred` (refused by an engine)
  and `request.aborted` (gateway: client gone, engine failed, queue timeout) update the
  controller's view; `scale.target` tells it which instances serve.
- Every `tick_wall_s` the controller retunes clocks and retries deferred requests.
- A request event that failed processing too often anywhere (dead-lettered on `dead.request`,
  durable consumer `forecaster-dead-letters`) gets a final `request.deferred` if it was not
  served yet: a request never ends in silence.
- Decisions go out as durable `request.admitted.<instance>` and `request.deferred` (message
  ids make a redelivered input decide once) and as `freq.target.<instance>` leases.
"""

from __future__ import annotations

import time
from functools import partial

import anyio
import anyio.abc
import structlog

from throttllem import _metrics as m
from throttllem._bus import Bus
from throttllem._core.controller import (
    POLICIES,
    Admit,
    Controller,
    ControllerConfig,
    Decision,
    Defer,
    Refuse,
    SetClock,
)
from throttllem._core.perf import AnyArray, PerfModel
from throttllem._core.placement import EngineShape, clock_policy
from throttllem._core.scaling import phases_of
from throttllem._core.slo import SloClass
from throttllem._errors import ConfigError
from throttllem._events import (
    ENGINE_CODEC,
    REQUEST_CODEC,
    SCALE_CODEC,
    EngineIteration,
    FreqTarget,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
    RequestPredicted,
    ScaleEvent,
    ScaleTarget,
)
from throttllem._runtime import Clock
from throttllem._setup import Setup
from throttllem._subjects import (
    DEAD_REQUEST,
    ENGINE_ITERATION_ALL,
    FORECASTER_DEAD_LETTERS_DURABLE,
    REQUEST_ABORTED,
    REQUEST_ALL,
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    REQUEST_PREDICTED,
    SCALE_TARGET,
    forecaster_durable,
    freq_target,
    request_admitted,
    token,
)

log = structlog.get_logger("throttllem.forecaster")


class ForecasterService:
    name = "forecaster"

    def __init__(self, *, instances: list[str], setup: Setup, policy: str = "default",
                 perf: PerfModel | None = None, use_upper: bool = True,
                 config: ControllerConfig | None = None,
                 slo_classes: dict[str, SloClass] | None = None, tick_wall_s: float = 0.1,
                 rebuild_window_s: float = 900.0) -> None:
        """`config` overrides the named `policy`'s controller configuration (tests)."""
        if policy not in POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        if not instances:
            raise ConfigError("the forecaster needs at least one engine instance (--instances)")
        cfg = config or POLICIES[policy]
        if cfg.needs_perf and perf is None:
            raise ConfigError(f"policy {policy!r} needs a performance model")
        self.policy_name = policy
        self.instances = [token(i) for i in instances]
        self.tick_wall_s = tick_wall_s
        self.rebuild_window_s = rebuild_window_s
        clocks = (clock_policy(setup, perf, use_upper=use_upper)
                  if perf is not None and cfg.needs_clocks else None)
        if clocks is None and cfg.needs_clocks:  # the governor needs clocks, not predictions
            clocks = clock_policy(setup, _NoPerfModel(), use_upper=use_upper)
        self.controller = Controller(cfg, shape=EngineShape.of(setup), policy=clocks,
                                     slo_classes=slo_classes)
        self._instances_added = False
        self.metrics = m.ServiceMetrics(self.name)
        self._admissions = self.metrics.counter(m.ADMISSIONS)
        self._deferrals = self.metrics.counter(m.DEFERRALS)
        self._refusals = self.metrics.counter(m.REFUSALS)
        self._decision_s = self.metrics.histogram(m.DECISION_LATENCY)
        self._clock_target = self.metrics.gauge(m.CLOCK_TARGET)
        log.info("forecaster.policy", policy=policy, setup=setup.name,
                 perf_model=getattr(perf, "name", None),
                 floor_mhz=clocks.floor_mhz if clocks else None, use_upper=use_upper)

    # ------------------------------------------------------------------ decisions out

    async def _publish(self, bus: Bus, now_s: float, decisions: list[Decision]) -> None:
        lease_s = self.controller.config.lease_s
        for d in decisions:
            match d:
                case SetClock():
                    # 0: the lock released (default clocks)
                    self._clock_target.labels(d.instance).set(d.clock_mhz or 0)
                    await bus.publish(freq_target(d.instance), FreqTarget(
                        instance=d.instance, clock_mhz=d.clock_mhz, lease_s=lease_s,
                        reason=d.reason, decided_s=now_s))
                case Admit():
                    bus.counters["admitted"] += 1
                    self._admissions.labels(d.instance).inc()
                    # The msg id makes a redelivered input (after a crash before its ack)
                    # admit once.
                    await bus.publish_durable(request_admitted(d.instance), RequestAdmitted(
                        request=d.request, instance=d.instance, decided_s=now_s,
                        reason=d.reason, predicted_tokens=d.predicted_tokens,
                        upper_tokens=d.upper_tokens), msg_id=f"admit-{d.request.id}")
                case Defer():
                    bus.counters["deferred"] += 1
                    self._deferrals.labels("no_instance_meets_slos").inc()
                    await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                        id=d.request_id, decided_s=now_s, reason=d.reason),
                        msg_id=f"deferred-{d.request_id}")
                case Refuse():
                    bus.counters[f"requests_rejected.{d.cause}"] += 1
                    self._refusals.labels(d.cause).inc()
                    log.warning("forecaster.request_rejected", id=d.request_id,
                                reason=d.reason)
                    await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                        id=d.request_id, decided_s=now_s, reason=d.reason, final=True,
                        retry_after_s=d.retry_after_s),
                        msg_id=f"forecaster-rejected-{d.request_id}")

    # ------------------------------------------------------------------ events in

    async def _on_request(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        """A new request to place: `request.arrived` or `request.predicted` (by policy)."""
        now_s = clock.now_s()
        started = time.perf_counter()
        match event:
            case RequestPredicted(request=RequestArrived() as request):
                decisions = self.controller.offer(
                    request, (event.predicted_tokens, event.upper_tokens), now_s)
            case RequestArrived() if not self.controller.config.needs_predictions:
                decisions = self.controller.offer(event, None, now_s)
            case _:
                return
        self._decision_s.observe(time.perf_counter() - started)
        bus.counters["events.request"] += 1
        await self._publish(bus, now_s, decisions)

    async def _on_done(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        now_s = clock.now_s()
        match event:
            case RequestCompleted():
                decisions = self.controller.completed(event.id, event.instance, now_s)
                bus.counters["events.completed"] += 1
            case RequestDeferred(final=True) | RequestAborted():
                # Refused by an engine, or ended by the gateway: forget it, or it would sit
                # in the projections for ever and pin its instance's clock up.
                if event.id in self.controller.placed:
                    log.info("forecaster.forgotten", id=event.id, by=type(event).__name__)
                decisions = self.controller.forget(event.id, now_s)
                bus.counters["events.forgotten"] += 1
            case _:
                return
        await self._publish(bus, now_s, decisions)

    async def _on_dead_letter(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        """A request event some service failed to process `DEAD_LETTER_AFTER` times: a
        request not served yet gets a final deferral (its client learns it failed, and every
        service forgets it); completions and endings are kept for an operator, counted."""
        match event:
            case RequestArrived(id=request_id) | RequestPredicted(
                    request=RequestArrived(id=request_id)) | RequestAdmitted(
                    request=RequestArrived(id=request_id)):
                bus.counters["dead_requests_deferred"] += 1
                self._refusals.labels("dead_letter").inc()
                log.error("forecaster.dead_request_deferred", id=request_id,
                          kind=type(event).__name__)
                await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                    id=request_id, decided_s=clock.now_s(), final=True,
                    reason=f"{type(event).__name__} failed processing repeatedly "
                           "(dead-lettered); not served"), msg_id=f"dead-{request_id}")
            case _:
                bus.counters["dead_events_kept"] += 1

    async def _on_iteration(self, bus: Bus, it: EngineIteration) -> None:
        self.controller.iteration(it.instance, it.request_ids,
                                  it.start_s + it.duration_ms / 1e3, it.duration_ms, engine=it)
        bus.counters["events.iteration"] += 1

    async def _on_scale(self, bus: Bus, event: ScaleEvent) -> None:
        """The scaler's phases: admit only to active instances; track ordered ones."""
        if not isinstance(event, ScaleTarget):
            return
        phases = phases_of(event)
        if phases is None:
            return
        ctl = self.controller
        for name in (*phases.warming, *phases.active, *phases.draining):
            if name not in ctl.outstanding:
                ctl.add_instance(token(name))
        ctl.set_serving(phases.active)
        bus.counters["events.scale"] += 1

    async def _tick_forever(self, bus: Bus, clock: Clock) -> None:
        while True:
            now_s = clock.now_s()
            await self._publish(bus, now_s, self.controller.tick(now_s))
            bus.counters["ticks"] += 1
            await anyio.sleep(self.tick_wall_s)

    # ------------------------------------------------------------------ wiring

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        ctl = self.controller
        if not self._instances_added:
            self._instances_added = True
            for name in self.instances:
                await self._publish(bus, clock.now_s(), ctl.add_instance(name))
        # A restart loses no request: rebuild the controller from the stream (the last
        # `rebuild_window_s` of wall time) before consuming again.
        history = await bus.history(REQUEST_ALL, REQUEST_CODEC,
                                    since_wall_s=time.time() - self.rebuild_window_s)
        await self._publish(bus, clock.now_s(), ctl.restore(history))
        log.info("forecaster.rebuilt", events=len(history), pending=len(ctl.pending),
                 placed=len(ctl.placed))
        on_done = partial(self._on_done, bus, clock)
        for subject in (REQUEST_COMPLETED, REQUEST_DEFERRED, REQUEST_ABORTED):
            await bus.subscribe(subject, REQUEST_CODEC, on_done)
        await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, partial(self._on_iteration, bus))
        await bus.subscribe(SCALE_TARGET, SCALE_CODEC, partial(self._on_scale, bus))
        predicted = ctl.config.needs_predictions
        async with anyio.create_task_group() as tg:
            await tg.start(partial(
                bus.consume, durable=forecaster_durable(self.policy_name),
                subject=REQUEST_PREDICTED if predicted else REQUEST_ARRIVED,
                deliver_new_only=True, codec=REQUEST_CODEC,
                handler=partial(self._on_request, bus, clock)))
            await tg.start(partial(
                bus.consume, durable=FORECASTER_DEAD_LETTERS_DURABLE, subject=DEAD_REQUEST,
                codec=REQUEST_CODEC, handler=partial(self._on_dead_letter, bus, clock)))
            tg.start_soon(self._tick_forever, bus, clock)
            log.info("forecaster.started", policy=self.policy_name, instances=self.instances)
            task_status.started()


class _NoPerfModel:
    """The reactive governor needs the setup's clocks and floor, never a prediction."""

    name = "none"

    def iteration_time_s(self, batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                         clock_mhz: AnyArray) -> AnyArray:  # pragma: no cover - never called
        raise AssertionError("the reactive governor never queries a performance model")

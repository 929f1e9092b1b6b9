"""The forecaster / SLO checker service: decides where each request runs and at what clock.

Policies:
- `default`: admit at once to the least-loaded instance, leave clocks at the GPU default, as
  an engine shipped without throttLL'eM does. Consumes `request.arrived`.
- `throttllem`: consumes `request.predicted` (the length predictor's median and upper
  quantile). On each prediction it projects every instance's future iterations with the
  request added, checks every running request's SLOs and admits to the instance that can
  run at the lowest clock, or defers the request (retried as requests complete). Every
  `retune` period it searches each instance's lowest feasible clock for what it runs now
  and publishes `freq.target.<instance>` with a lease (the actuator falls back to default
  clocks when leases stop coming). Clock changes pass a hysteresis (raise at once, lower only
  after a dwell time and by a margin) so clocks do not flap.
"""

from __future__ import annotations

import math
import time
from collections import deque
from functools import partial

import anyio
import anyio.abc
import msgspec
import structlog

from throttllem._bus import Bus
from throttllem._core.clock_search import Strategy, SupportedClocks, next_clock
from throttllem._core.controller import (
    EngineShape,
    InstanceTracker,
    Placement,
    Policy,
    never_fits,
    place,
    planned_lengths,
    retune,
)
from throttllem._core.forecast import Candidate
from throttllem._core.perf import AnyArray, FunctionPerfModel, PerfModel
from throttllem._core.routing import least_loaded
from throttllem._core.slo import DEFAULT_SLO_CLASSES, SloClass, require_slo_class
from throttllem._core.slo_check import RequestSlo
from throttllem._errors import ConfigError
from throttllem._events import (
    ENGINE_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    FreqTarget,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
    RequestPredicted,
)
from throttllem._runtime import Clock
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import (
    ENGINE_ITERATION_ALL,
    REQUEST_ALL,
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    REQUEST_PREDICTED,
    freq_target,
    request_admitted,
    token,
)

log = structlog.get_logger("throttllem.forecaster")

POLICIES = ("default", "throttllem")


def twin_perf_model(setup: str) -> PerfModel:
    """The twin's own timing formula as the controller's performance model. This is an
    oracle (the model the twin runs on); the trained ONNX model replaces it where present."""
    from throttllem._twin.clockmodel import iteration_time_s  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    profile = load_profile(setup)

    def fn(batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
           clock_mhz: AnyArray) -> AnyArray:
        return iteration_time_s(profile, batch=batch, kv_tokens=kv_tokens,
                                prefill_tokens=prefill_tokens, clock_mhz=clock_mhz)

    return FunctionPerfModel(fn, name=f"twin-oracle:{setup}")


def load_perf_model(setup: str, spec: str | None) -> PerfModel:
    """`spec`: a model folder or shipped model name, `twin` for the twin's own formula (an
    oracle, for ablations), or None: the shipped model trained on the setup's profile."""
    if spec == "twin":
        return twin_perf_model(setup)
    from throttllem._perf.runtime import PerfRuntime  # noqa: PLC0415 - onnxruntime on demand

    runtime = PerfRuntime.load(spec or setup)
    return FunctionPerfModel(runtime.iteration_time_s, name=f"onnx-grid:{spec or setup}")


def setup_policy(setup: str, perf: PerfModel | None = None, *,
                 use_upper: bool = True) -> tuple[Policy, EngineShape]:
    """The controller's knobs for a serving setup, from its profile.

    The clock floor is the most energy-efficient clock of a typical decode pass (batch 32,
    1k-token contexts) under the profile's power model: going lower saves power but costs
    more static energy per token than it saves.
    """
    from throttllem._twin.clockmodel import efficient_clock_mhz  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    profile = load_profile(setup)
    mhz = tuple(int(c) for c in profile.gpu.supported_clocks_mhz)
    floor_mhz = efficient_clock_mhz(profile)
    engine = profile.engine
    shape = EngineShape(kv_block_tokens=engine.block_tokens, kv_blocks_total=engine.kv_blocks,
                        max_batch=engine.max_batch, max_batched_tokens=engine.max_batched_tokens,
                        kv_watermark_blocks=int(engine.kv_watermark * engine.kv_blocks),
                        max_model_len=profile.model.max_model_len)
    model = perf or twin_perf_model(setup)
    # "auto": the secant search for a model monotone in the clock (the compiled grid is, by
    # construction), the full scan otherwise. With the grid a query's cost grows with the
    # clocks asked for (it gathers only those columns, and never calls ONNX, inside the grid
    # or beyond it), so a few probed clocks beat one scan of all 110: secant and k-ary tie,
    # the scan costs ~1.7x (benchmarks/bench_controller.py, "onnx grid" rows).
    strategy: Strategy = "auto"
    policy = Policy(perf=model, clocks=SupportedClocks(mhz), floor_mhz=floor_mhz,
                    use_upper=use_upper, strategy=strategy)
    return policy, shape


def rebuild_state(history: list[RequestEvent], trackers: dict[str, InstanceTracker],
                  slo_classes: dict[str, SloClass]) -> deque[RequestPredicted]:
    """Rebuild the throttLL'eM policy's state from the request stream after a restart (pure).

    Admitted and not yet completed requests go back into their instance's tracker (with no
    tokens counted yet: until the next iterations arrive they look queued, which makes the
    first projections cautious, never optimistic); deferred requests never admitted are
    returned, in their order, as the pending queue. Nothing acknowledged is lost.
    """
    predicted: dict[str, RequestPredicted] = {}
    admitted: dict[str, RequestAdmitted] = {}
    deferred: list[str] = []
    done: set[str] = set()
    for event in history:
        match event:
            case RequestPredicted():
                predicted[event.id] = event
            case RequestAdmitted():
                admitted[event.request.id] = event
            case RequestDeferred(final=False):
                deferred.append(event.id)
            case RequestDeferred(final=True):  # refused for good, by an engine or by us
                done.add(event.id)
            case RequestCompleted():
                done.add(event.id)
            case _:
                pass
    for request_id, adm in admitted.items():
        tracker = trackers.get(adm.instance)
        if request_id in done or tracker is None:
            continue
        request = adm.request
        median = adm.predicted_tokens if adm.predicted_tokens is not None else 1.0
        tracker.admitted(request_id, prompt_tokens=request.prompt_tokens,
                         predicted_tokens=median,
                         upper_tokens=adm.upper_tokens if adm.upper_tokens is not None
                         else median,
                         arrival_s=request.arrival_s,
                         # a class no longer configured (restart with another config):
                         # planned as `standard`, since the request is already running
                         slo=slo_classes.get(request.slo_class, DEFAULT_SLO_CLASSES["standard"]))
    return deque(predicted[i] for i in dict.fromkeys(deferred)
                 if i in predicted and i not in admitted and i not in done)


class ForecasterService:
    name = "forecaster"

    def __init__(self, *, instances: list[str], policy: str = "default",
                 setup: str = DEFAULT_SETUP, perf: PerfModel | None = None,
                 use_upper: bool = True, lease_s: float = 3.0, retune_wall_s: float = 0.1,
                 min_dwell_s: float = 1.0, down_margin_steps: int = 2,
                 slo_classes: dict[str, SloClass] | None = None,
                 rebuild_window_s: float = 900.0) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; known: {POLICIES}")
        if not instances:
            raise ConfigError("the forecaster needs at least one engine instance (--instances)")
        self.instances = [token(i) for i in instances]
        self.policy_name = policy
        # Soft state of the default policy: admitted and not yet completed, per instance.
        self.outstanding = dict.fromkeys(self.instances, 0)
        self.placed: dict[str, str] = {}  # admitted, not yet completed: request id → instance
        self.slo_classes = dict(slo_classes or DEFAULT_SLO_CLASSES)
        self.lease_s = lease_s
        self.retune_wall_s = retune_wall_s
        self.min_dwell_s = min_dwell_s
        self.down_margin_steps = down_margin_steps
        self.rebuild_window_s = rebuild_window_s
        if policy == "throttllem":
            self.policy, shape = setup_policy(setup, perf, use_upper=use_upper)
            self.shape = shape
            self.trackers = {i: InstanceTracker(i, shape) for i in self.instances}
            top = self.policy.clocks.mhz[-1]
            self.clock_mhz = dict.fromkeys(self.instances, top)
            self.changed_s = dict.fromkeys(self.instances, -math.inf)
            self.sent_s = dict.fromkeys(self.instances, -math.inf)
            self.pending: deque[RequestPredicted] = deque()
            log.info("forecaster.policy", policy=policy, perf_model=getattr(
                self.policy.perf, "name", type(self.policy.perf).__name__),
                floor_mhz=self.policy.floor_mhz, use_upper=use_upper)

    # ------------------------------------------------------------------ default policy

    async def _default_on_arrived(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        if not isinstance(event, RequestArrived):
            return
        instance = least_loaded(self.outstanding)
        admitted = RequestAdmitted(request=event, instance=instance, decided_s=clock.now_s(),
                                   reason="policy=default: least outstanding")
        # The msg id makes a redelivered arrival (after a crash before its ack) admit once.
        await bus.publish_durable(request_admitted(instance), admitted, msg_id=f"admit-{event.id}")
        self._placed_on(instance, event.id)

    async def _on_completed(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        if not isinstance(event, RequestCompleted) or event.instance not in self.outstanding:
            return
        self.placed.pop(event.id, None)
        await self._release(bus, clock, event.instance, event.id)

    async def _on_deferred(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        """An engine refused a request it was given (it can never fit): forget it, or it
        would sit in the instance's projections for ever and pin its clock up."""
        if not isinstance(event, RequestDeferred) or not event.final:
            return
        instance = self.placed.pop(event.id, None)
        if instance is None:  # not one this forecaster placed (or a deferral of its own)
            return
        log.info("forecaster.refused_by_engine", id=event.id, instance=instance,
                 reason=event.reason)
        await self._release(bus, clock, instance, event.id)

    def _placed_on(self, instance: str, request_id: str) -> None:
        self.outstanding[instance] += 1
        self.placed[request_id] = instance

    async def _release(self, bus: Bus, clock: Clock, instance: str, request_id: str) -> None:
        self.outstanding[instance] = max(self.outstanding[instance] - 1, 0)
        if self.policy_name == "throttllem":
            self.trackers[instance].completed(request_id)
            await self._drain_pending(bus, clock)

    # ------------------------------------------------------------------ throttllem policy

    def _slo(self, request: RequestArrived) -> SloClass:
        return require_slo_class(request.slo_class, self.slo_classes)

    def _try_place(self, prediction: RequestPredicted, now_s: float) -> Placement | None:
        request = prediction.request
        assert request is not None
        slo = self._slo(request)
        candidate = Candidate(prompt_tokens=request.prompt_tokens,
                              predicted_tokens=prediction.predicted_tokens,
                              upper_tokens=max(prediction.upper_tokens,
                                               prediction.predicted_tokens))
        candidate_slo = RequestSlo.for_request(slo, prompt_tokens=request.prompt_tokens,
                                               arrival_s=request.arrival_s)
        return place(self.trackers, candidate, candidate_slo, self.policy, now_s=now_s)

    async def _admit(self, bus: Bus, clock: Clock, prediction: RequestPredicted,
                     placement: Placement) -> None:
        request = prediction.request
        assert request is not None
        now_s = clock.now_s()
        self.trackers[placement.instance].admitted(
            request.id, prompt_tokens=request.prompt_tokens,
            predicted_tokens=prediction.predicted_tokens, upper_tokens=prediction.upper_tokens,
            arrival_s=request.arrival_s, slo=self._slo(request))
        self._placed_on(placement.instance, request.id)
        # Raise the clock first if the new request needs it, then admit.
        await self._set_clock(bus, placement.instance, placement.clock_mhz, now_s,
                              reason=f"admit {request.id}")
        await bus.publish_durable(request_admitted(placement.instance), RequestAdmitted(
            request=request, instance=placement.instance, decided_s=now_s,
            reason=placement.reason, predicted_tokens=prediction.predicted_tokens,
            upper_tokens=prediction.upper_tokens), msg_id=f"admit-{request.id}")

    def _planned(self, prediction: RequestPredicted) -> RequestPredicted:
        """The prediction clipped to what the engine can generate for the request."""
        request = prediction.request
        assert request is not None
        median, upper = planned_lengths(
            self.shape, prompt_tokens=request.prompt_tokens, max_tokens=request.max_tokens,
            predicted_tokens=prediction.predicted_tokens, upper_tokens=prediction.upper_tokens)
        if (median, upper) == (prediction.predicted_tokens, prediction.upper_tokens):
            return prediction
        return msgspec.structs.replace(prediction, predicted_tokens=median, upper_tokens=upper)

    async def _rejected(self, bus: Bus, clock: Clock, prediction: RequestPredicted) -> bool:
        """Refuse, for good and with a reason on `request.deferred`, a request of an SLO class
        this forecaster does not know (guessing a class could break the SLO the client asked
        for, and raising would redeliver it for ever) or one no instance can ever hold
        (deferred, it would hold up every request behind it)."""
        request = prediction.request
        assert request is not None
        why: str | None
        try:
            require_slo_class(request.slo_class, self.slo_classes)
        except ConfigError as e:
            counter, why = "unknown_slo_class", str(e)
        else:
            counter, why = "never_fits", never_fits(self.shape, request.prompt_tokens)
        if why is None:
            return False
        bus.counters[f"requests_rejected.{counter}"] += 1
        reason = f"forecaster: {why}"
        log.warning("forecaster.request_rejected", id=request.id, reason=reason)
        await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
            id=request.id, decided_s=clock.now_s(), reason=reason, final=True),
            msg_id=f"forecaster-rejected-{request.id}")
        return True

    async def _on_predicted(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        if not isinstance(event, RequestPredicted) or event.request is None:
            return
        if await self._rejected(bus, clock, event):
            return
        event = self._planned(event)
        if self.pending:  # keep FCFS: nothing jumps ahead of a deferred request
            self.pending.append(event)
            await self._drain_pending(bus, clock)
            return
        placement = self._try_place(event, clock.now_s())
        if placement is None:
            self.pending.append(event)
            bus.counters["deferred"] += 1
            await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                id=event.id, decided_s=clock.now_s(),
                reason="no instance meets every SLO with it; retried as requests complete"),
                msg_id=f"deferred-{event.id}")
            return
        await self._admit(bus, clock, event, placement)

    async def _drain_pending(self, bus: Bus, clock: Clock) -> None:
        while self.pending:
            placement = self._try_place(self.pending[0], clock.now_s())
            if placement is None:
                return
            await self._admit(bus, clock, self.pending.popleft(), placement)

    async def _on_iteration(self, it: EngineIteration) -> None:
        tracker = self.trackers.get(it.instance)
        if tracker is not None:
            tracker.iteration(it.request_ids, it.start_s + it.duration_ms / 1e3)

    async def _set_clock(self, bus: Bus, instance: str, proposed_mhz: int, now_s: float, *,
                         reason: str) -> None:
        step = next_clock(self.clock_mhz[instance], self.changed_s[instance], proposed_mhz,
                          now_s, min_dwell_s=self.min_dwell_s,
                          down_margin_steps=self.down_margin_steps, clocks=self.policy.clocks)
        changed = step.clock_mhz != self.clock_mhz[instance]
        self.clock_mhz[instance], self.changed_s[instance] = step.clock_mhz, step.changed_s
        # Renew the lease well before it runs out; send at once on a change.
        if changed or now_s - self.sent_s[instance] >= self.lease_s / 3:
            self.sent_s[instance] = now_s
            await bus.publish(freq_target(instance), FreqTarget(
                instance=instance, clock_mhz=step.clock_mhz, lease_s=self.lease_s,
                reason=f"{reason} ({step.reason})", decided_s=now_s))

    async def _retune_forever(self, bus: Bus, clock: Clock) -> None:
        while True:
            now_s = clock.now_s()
            for instance, tracker in self.trackers.items():
                proposed = retune(tracker, self.policy, now_s=now_s)
                await self._set_clock(bus, instance, proposed, now_s, reason="retune")
            await self._drain_pending(bus, clock)
            await anyio.sleep(self.retune_wall_s)

    # ------------------------------------------------------------------ wiring

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        await bus.subscribe(REQUEST_COMPLETED, REQUEST_CODEC,
                            partial(self._on_completed, bus, clock))
        await bus.subscribe(REQUEST_DEFERRED, REQUEST_CODEC,
                            partial(self._on_deferred, bus, clock))
        async with anyio.create_task_group() as tg:
            if self.policy_name == "default":
                await tg.start(partial(
                    bus.consume, durable="forecaster", subject=REQUEST_ARRIVED,
                    deliver_new_only=True, codec=REQUEST_CODEC,
                    handler=partial(self._default_on_arrived, bus, clock)))
            else:
                # A restart loses no request: rebuild trackers and deferrals from the stream
                # (the last `rebuild_window_s` of wall time) before consuming again.
                history = await bus.history(REQUEST_ALL, REQUEST_CODEC,
                                            since_wall_s=time.time() - self.rebuild_window_s)
                self.pending = rebuild_state(history, self.trackers, self.slo_classes)
                # A restart with another --slo-config may leave deferrals of unknown classes.
                self.pending = deque([self._planned(p) for p in self.pending
                                      if not await self._rejected(bus, clock, p)])
                for instance, tracker in self.trackers.items():
                    self.outstanding[instance] = len(tracker)
                    self.placed.update(dict.fromkeys(tracker.requests, instance))
                log.info("forecaster.rebuilt", events=len(history), pending=len(self.pending),
                         tracked={i: len(t) for i, t in self.trackers.items()})
                await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, self._on_iteration)
                await tg.start(partial(
                    bus.consume, durable="forecaster-throttllem", subject=REQUEST_PREDICTED,
                    deliver_new_only=True, codec=REQUEST_CODEC,
                    handler=partial(self._on_predicted, bus, clock)))
                tg.start_soon(self._retune_forever, bus, clock)
            log.info("forecaster.started", policy=self.policy_name, instances=self.instances)
            task_status.started()

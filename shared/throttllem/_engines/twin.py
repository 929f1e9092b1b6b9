"""The twin engine adapter: one simulated engine instance (and its GPUs) on the bus.

It keeps the engine contract (`throttllem._engines.contract`) for an `EngineTwin`: it runs
iteration-level inflight batching in event time paced to the shared clock, and answers
NVML-shaped calls for its twin GPU on `twin.gpu.<instance>.read` (the collector) and
`.control` (the actuator) (twin only, not part of the contract).

Admissions and aborts reach the serving loop through one inbox, so every change to the
engine's state happens in that loop, between passes.

An admission is acknowledged only once its request is done (completed and stored, refused,
or aborted); meanwhile it is kept alive. An engine that crashes leaves its unfinished
admissions unacknowledged, and JetStream hands them to the restarted engine (same durable)
within `ADMISSION_ACK_WAIT_S`, which serves them from the start: nothing accepted is lost,
and a completion that was already stored is not stored twice (its message id).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from throttllem._bus import Bus, Delivery
from throttllem._engines.contract import (
    ENGINE_SERVICE,
    REMEMBERED_IDS,
    EngineAdapter,
    aborts_durable,
    acts_on_abort,
    admissions_durable,
    completion_msg_id,
    refusal_msg_id,
)
from throttllem._errors import ConfigError, RequestRejectedError
from throttllem._events import (
    REQUEST_CODEC,
    RequestAborted,
    RequestAdmitted,
    RequestDeferred,
    RequestEvent,
)
from throttllem._gpu.leases import LockLeases
from throttllem._gpu.remote import serve_gpu
from throttllem._runtime import Clock
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import (
    REQUEST_ABORTED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    engine_iteration,
    request_admitted,
    token,
    twin_gpu,
)
from throttllem._twin.engine import EngineTwin
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import load_profile

log = structlog.get_logger("throttllem.engine")

# While idle, how often (wall seconds) the loop wakes to let idle energy accrue.
_IDLE_POLL_WALL_S = 0.25
# Wall seconds after which an admission held by a dead engine goes to its successor; those
# being served are kept alive three times as often.
ADMISSION_ACK_WAIT_S = 6.0

_InboxItem = RequestAdmitted | RequestAborted


class EngineTwinService:
    name = ENGINE_SERVICE

    def __init__(self, *, instance: str, setup: str = DEFAULT_SETUP,
                 slack_wall_s: float = 0.05) -> None:
        """`slack_wall_s`: how far (wall seconds) the engine's time trails the shared clock, so
        that an admission delayed on the bus by less than that still starts at its own decision
        time; without it, bus latency would be magnified by --speed. Keep it near the bus
        latency: the controller sees the engine's state this much late, and a larger slack
        makes it plan for a busier engine than there is (it raises clocks for nothing)."""
        if slack_wall_s < 0:
            raise ConfigError("--slack must be non-negative")
        self.slack_wall_s = slack_wall_s
        self.instance = token(instance)
        self.profile = load_profile(setup)
        self.gpu = GpuTwin(self.profile)
        # Locks taken over the bus hold only while their actuator renews them (wall seconds).
        self.gpu_leases = LockLeases(self.gpu)
        self.engine = EngineTwin(self.profile, self.instance, self.gpu)
        # Ids accepted and not finished (waiting for their decision time, or in the engine).
        self._held: set[str] = set()
        # Ids finished, aborted or refused lately: a late duplicate admission is dropped.
        self._finished: OrderedDict[str, None] = OrderedDict()
        # The unacknowledged admission of each accepted id, acked once the id is done.
        self._deliveries: dict[str, Delivery] = {}
        self._done: list[str] = []  # ids done since the last acks

    def health_metrics(self) -> dict[str, float]:
        """Heartbeat metrics: requests in the batch, accepted ones not in it yet, passes."""
        running = self.engine.running_count
        return {"running": float(running), "waiting": float(len(self._held) - running),
                "iterations": float(self.engine.iterations)}

    # ------------------------------------------------------------------ consumers

    async def _on_admitted(self, bus: Bus, event: RequestEvent) -> None:
        if isinstance(event, RequestAdmitted) and event.instance == self.instance:
            rid = event.request.id
            if rid not in self._finished:  # a late duplicate of a done one: ack it now
                self._deliveries[rid] = bus.hold_delivery()
            await self._inbox_send.send(event)

    async def _on_aborted(self, event: RequestEvent) -> None:
        if isinstance(event, RequestAborted) and acts_on_abort(self.instance, event):
            await self._inbox_send.send(event)

    # ------------------------------------------------------------------ state changes

    def _forget(self, request_id: str) -> None:
        self._done.append(request_id)
        self._held.discard(request_id)
        self._finished[request_id] = None
        self._finished.move_to_end(request_id)
        if len(self._finished) > REMEMBERED_IDS:
            self._finished.popitem(last=False)

    def _take(self, bus: Bus, item: _InboxItem, pending: list[RequestAdmitted]) -> None:
        """Accept an admission into `pending` (unless it is a duplicate), or act on an abort."""
        if isinstance(item, RequestAborted):
            rid = item.id
            if rid in self._held:
                before = len(pending)
                pending[:] = [a for a in pending if a.request.id != rid]
                if len(pending) < before or self.engine.abort(rid):
                    bus.counters["requests_aborted"] += 1
                    log.info("engine.request_aborted", instance=self.instance, id=rid,
                             cause=item.cause)
            self._forget(rid)
            return
        rid = item.request.id
        if rid in self._held or rid in self._finished:
            bus.counters["admissions_duplicate"] += 1
            log.info("engine.duplicate_admission", instance=self.instance, id=rid)
            return
        self._held.add(rid)
        pending.append(item)

    async def _admit(self, bus: Bus, admission: RequestAdmitted, admitted_s: float) -> None:
        request = admission.request
        try:
            self.engine.admit(request, admitted_s=admitted_s)
        except RequestRejectedError as e:
            self._forget(request.id)
            bus.counters["requests_rejected"] += 1
            log.warning("engine.request_rejected", instance=self.instance, id=request.id,
                        error=str(e))
            await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                id=request.id, decided_s=admitted_s, reason=f"{self.instance}: {e}",
                final=True), msg_id=refusal_msg_id(request.id))

    async def _ack_done(self) -> None:
        """Acknowledge the admissions of ids that are done (their outcome is stored)."""
        done, self._done = self._done, []
        for rid in done:
            delivery = self._deliveries.pop(rid, None)
            if delivery is not None:
                await delivery.ack()

    async def _keep_admissions_alive(self) -> None:
        while True:
            await anyio.sleep(ADMISSION_ACK_WAIT_S / 3)
            for delivery in list(self._deliveries.values()):
                await delivery.keep_alive()

    # ------------------------------------------------------------------ serving loop

    async def _loop(self, bus: Bus, clock: Clock) -> None:
        iteration_subject = engine_iteration(self.instance)
        # Admissions not yet due in engine time (the engine may run a little behind the wall).
        pending: list[RequestAdmitted] = []
        slack_s = self.slack_wall_s * clock.speed  # in event seconds
        now_s = clock.now_s() - slack_s
        self.gpu.idle_until(now_s)
        while True:
            while True:
                try:
                    self._take(bus, self._inbox.receive_nowait(), pending)
                except anyio.WouldBlock:
                    break
            if pending:
                pending.sort(key=lambda a: a.decided_s)
                due = [a for a in pending if a.decided_s <= now_s]
                pending = pending[len(due):]
                for admission in due:
                    await self._admit(bus, admission, max(now_s, admission.decided_s))
            await self._ack_done()  # refusals and aborts (their outcome is out)
            outcome = self.engine.step(now_s)
            if outcome is None:
                if pending:  # nothing runnable until the next admission is due
                    now_s = max(now_s, pending[0].decided_s)
                    self.gpu.idle_until(now_s)
                    continue
                with anyio.move_on_after(_IDLE_POLL_WALL_S):
                    self._take(bus, await self._inbox.receive(), pending)
                now_s = max(now_s, clock.now_s() - slack_s)
                self.gpu.idle_until(now_s)
                continue
            it = outcome.iteration
            now_s = it.start_s + it.duration_ms / 1e3
            await bus.publish(iteration_subject, it)
            for done in outcome.completed:
                self._forget(done.id)
                await bus.publish_durable(REQUEST_COMPLETED, done,
                                          msg_id=completion_msg_id(done.id))
            await self._ack_done()  # completions stored: their admissions are done
            await clock.sleep_until(now_s + slack_s)
            # An engine running behind the clock does not sleep: let the consumers hand over
            # admissions and aborts anyway.
            await anyio.lowlevel.checkpoint()

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        await serve_gpu(bus, twin_gpu(self.instance), self.gpu, self.gpu_leases)
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[_InboxItem](
            max_buffer_size=math.inf)
        with self._inbox_send, self._inbox:
            await self._serve(bus, clock, task_status)

    async def _serve(self, bus: Bus, clock: Clock, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(partial(
                bus.consume, durable=admissions_durable(self.instance), deliver_new_only=True,
                subject=request_admitted(self.instance), codec=REQUEST_CODEC,
                ack_wait_s=ADMISSION_ACK_WAIT_S, handler=partial(self._on_admitted, bus)))
            await tg.start(partial(
                bus.consume, durable=aborts_durable(self.instance), deliver_new_only=True,
                subject=REQUEST_ABORTED, codec=REQUEST_CODEC, handler=self._on_aborted))
            tg.start_soon(self._loop, bus, clock)
            tg.start_soon(self._keep_admissions_alive)
            tg.start_soon(self.gpu_leases.enforce)  # a lock dies with its actuator
            log.info("engine.started", instance=self.instance, setup=self.profile.name)
            task_status.started()


_KEEPS_THE_CONTRACT: type[EngineAdapter] = EngineTwinService  # checked by mypy

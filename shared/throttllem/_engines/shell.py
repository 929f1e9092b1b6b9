"""The engine shell: the engine contract's bus side, written once for every adapter whose
scheduler is `EngineTwin` (iteration-level inflight batching).

The shell consumes admissions and aborts, drops duplicates, admits each request no earlier
than its decision time, refuses what can never be served, publishes one iteration per pass
and one completion per finished request, and acknowledges an admission only once its request
is done (completion stored, final refusal stored, or abort acted on), keeping it alive
meanwhile. An engine process that dies thus leaves its unfinished admissions unacknowledged,
and JetStream hands them to its restart (same durable) within `ADMISSION_ACK_WAIT_S`, which
serves them from the start; a completion stored before the crash is not stored twice (its
message id).

What differs between engines is only how a pass runs and how the engine's time relates to
the shared clock: a `PassDriver`. The twin's passes are simulated and its time runs ahead of
the wall, paced to it; the GPU engine's passes really run and its time is the clock's.

Admissions and aborts reach the serving loop through one inbox, so every change to the
engine's state happens in that loop, between passes.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from throttllem._bus import Bus, Delivery
from throttllem._engines.contract import (
    ADMISSION_ACK_WAIT_S,
    REMEMBERED_IDS,
    acts_on_abort,
    completion_msg_id,
    refusal_msg_id,
)
from throttllem._errors import RequestRejectedError
from throttllem._events import (
    REQUEST_CODEC,
    EngineIteration,
    RequestAborted,
    RequestAdmitted,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
)
from throttllem._runtime import Clock
from throttllem._subjects import (
    REQUEST_ABORTED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    engine_aborts_durable,
    engine_admissions_durable,
    engine_iteration,
    request_admitted,
)
from throttllem._twin.engine import EngineTwin, IterationOutcome

log = structlog.get_logger("throttllem.engine")

# While idle, how often (wall seconds) the loop wakes (the twin's idle energy accrues then).
IDLE_POLL_WALL_S: Final = 0.25
# How long the loop waits when the engine holds work but could not run a pass.
_RETRY_WALL_S: Final = 0.001

_InboxItem = RequestAdmitted | RequestAborted


class PassDriver(Protocol):
    """How one engine's passes run and how its time relates to the shared clock."""

    @property
    def engine(self) -> EngineTwin:
        """The scheduler the shell admits to, aborts in and steps."""
        ...

    @property
    def simulated_time(self) -> bool:
        """True: the engine's time is its own (passes take no wall time to compute; it leaps
        to the next due admission and sleeps until each pass ends). False: its time is the
        clock's, read before every pass."""
        ...

    @property
    def lag_wall_s(self) -> float:
        """How far (wall seconds) the engine's time trails the clock (0 for real passes)."""
        ...

    async def run_pass(self, now_s: float) -> IterationOutcome | None:
        """The engine's next pass, starting no earlier than `now_s`."""
        ...

    def idle(self, now_s: float) -> None:
        """Nothing runs until `now_s` (a simulated GPU accrues idle energy; a real one's
        energy meter stops chaining passes)."""
        ...

    def passed(self, iteration: EngineIteration) -> None:
        """A pass ended and was published (record it, attribute its energy)."""
        ...

    def completed(self, done: RequestCompleted) -> RequestCompleted:
        """A request finished: free what it held; the completion to publish."""
        ...

    def aborted(self, request_id: str) -> None:
        """A request left the engine by an abort: free what it held."""
        ...


class EngineShell:
    """One engine instance on the bus around a `PassDriver`; see the module docstring."""

    def __init__(self, instance: str, driver: PassDriver) -> None:
        self.instance = instance
        self.driver = driver
        # Ids accepted and not finished (waiting for their decision time, or in the engine).
        self._held: set[str] = set()
        # Ids finished, aborted or refused lately: a late duplicate admission is dropped.
        self._finished: OrderedDict[str, None] = OrderedDict()
        # The unacknowledged admissions of each accepted id (a duplicate adds one), acked
        # once the id is done.
        self._deliveries: dict[str, list[Delivery]] = {}
        self._done: list[str] = []  # ids done since the last acks
        # Accepted admissions not yet due in engine time, by decision time.
        self._pending: list[RequestAdmitted] = []

    def health_metrics(self) -> dict[str, float]:
        """Requests in the batch, accepted ones not in it yet, passes."""
        engine = self.driver.engine
        running = engine.running_count
        return {"running": float(running), "waiting": float(len(self._held) - running),
                "iterations": float(engine.iterations)}

    # ------------------------------------------------------------------ consumers

    async def _on_admitted(self, bus: Bus, event: RequestEvent) -> None:
        if isinstance(event, RequestAdmitted) and event.instance == self.instance:
            rid = event.request.id
            if rid not in self._finished:  # a late duplicate of a done one: ack it now
                self._deliveries.setdefault(rid, []).append(bus.hold_delivery())
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

    def _take(self, bus: Bus, item: _InboxItem) -> None:
        """Accept an admission into the pending ones (unless it is a duplicate), or act on
        an abort."""
        if isinstance(item, RequestAborted):
            rid = item.id
            if rid in self._held:
                before = len(self._pending)
                self._pending = [a for a in self._pending if a.request.id != rid]
                if len(self._pending) < before or self.driver.engine.abort(rid):
                    self.driver.aborted(rid)
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
        self._pending.append(item)

    def _take_all(self, bus: Bus) -> None:
        while True:
            try:
                self._take(bus, self._inbox.receive_nowait())
            except anyio.WouldBlock:
                return

    async def _admit_due(self, bus: Bus, now_s: float) -> None:
        """Hand the engine every pending admission due by `now_s`."""
        if not self._pending:
            return
        self._pending.sort(key=lambda a: a.decided_s)
        due = [a for a in self._pending if a.decided_s <= now_s]
        self._pending = self._pending[len(due):]
        for admission in due:
            await self._admit(bus, admission, max(now_s, admission.decided_s))

    async def _admit(self, bus: Bus, admission: RequestAdmitted, admitted_s: float) -> None:
        request = admission.request
        try:
            self.driver.engine.admit(request, admitted_s=admitted_s)
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
            for delivery in self._deliveries.pop(rid, ()):
                await delivery.ack()

    async def _keep_admissions_alive(self) -> None:
        while True:
            await anyio.sleep(ADMISSION_ACK_WAIT_S / 3)
            for deliveries in list(self._deliveries.values()):
                for delivery in deliveries:
                    await delivery.keep_alive()

    # ------------------------------------------------------------------ serving loop

    async def _idle(self, bus: Bus, clock: Clock, now_s: float, lag_s: float) -> float:
        """Nothing ran: wait for the next admission or abort (or until the first pending
        admission is due, or a poll); the engine's time after."""
        driver = self.driver
        if self._pending and driver.simulated_time:
            # Simulated time leaps to the next admission due (at most the lag ahead).
            now_s = max(now_s, self._pending[0].decided_s)
            driver.idle(now_s)
            return now_s
        driver.idle(now_s)
        wait_s = _RETRY_WALL_S if driver.engine.has_work() else IDLE_POLL_WALL_S
        if self._pending:
            due_wall = clock.wall_at(self._pending[0].decided_s + lag_s)
            wait_s = min(wait_s, max(due_wall - time.time(), 0.0))
        with anyio.move_on_after(wait_s):
            self._take(bus, await self._inbox.receive())
        now_s = max(now_s, clock.now_s() - lag_s)
        driver.idle(now_s)
        return now_s

    async def _loop(self, bus: Bus, clock: Clock) -> None:
        driver = self.driver
        engine = driver.engine
        iteration_subject = engine_iteration(self.instance)
        lag_s = driver.lag_wall_s * clock.speed  # in event seconds
        now_s = clock.now_s() - lag_s
        driver.idle(now_s)
        while True:
            self._take_all(bus)
            if not driver.simulated_time:
                now_s = clock.now_s()
            await self._admit_due(bus, now_s)
            await self._ack_done()  # refusals and aborts (their outcome is out)
            outcome = await driver.run_pass(now_s) if engine.has_work() else None
            if outcome is None:
                now_s = await self._idle(bus, clock, now_s, lag_s)
                continue
            it = outcome.iteration
            await bus.publish(iteration_subject, it)
            driver.passed(it)
            for done in outcome.completed:
                self._forget(done.id)
                await bus.publish_durable(REQUEST_COMPLETED, driver.completed(done),
                                          msg_id=completion_msg_id(done.id))
            await self._ack_done()  # completions stored: their admissions are done
            now_s = it.start_s + it.duration_ms / 1e3
            await clock.sleep_until(now_s + lag_s)
            # An engine running behind the clock does not sleep: let the consumers hand over
            # admissions and aborts anyway.
            await anyio.lowlevel.checkpoint()

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                  also: Sequence[Callable[[], Coroutine[Any, Any, object]]] = (),
                  log_fields: Mapping[str, object] | None = None) -> None:
        """Consume, serve and publish until cancelled, running the adapter's `also` tasks
        beside; `task_status.started()` once both durable consumers exist."""
        await bus.ensure_request_stream()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[_InboxItem](
            max_buffer_size=math.inf)
        with self._inbox_send, self._inbox:
            async with anyio.create_task_group() as tg:
                await tg.start(partial(
                    bus.consume, durable=engine_admissions_durable(self.instance),
                    deliver_new_only=True, subject=request_admitted(self.instance),
                    codec=REQUEST_CODEC, ack_wait_s=ADMISSION_ACK_WAIT_S,
                    handler=partial(self._on_admitted, bus)))
                await tg.start(partial(
                    bus.consume, durable=engine_aborts_durable(self.instance),
                    deliver_new_only=True, subject=REQUEST_ABORTED, codec=REQUEST_CODEC,
                    handler=self._on_aborted))
                tg.start_soon(self._loop, bus, clock)
                tg.start_soon(self._keep_admissions_alive)
                for task in also:
                    tg.start_soon(task)
                log.info("engine.started", instance=self.instance, **(log_fields or {}))
                task_status.started()

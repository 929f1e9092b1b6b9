"""The engine-twin service: one simulated engine instance (and its GPUs) on the bus.

It consumes its own admissions from JetStream, runs iteration-level inflight batching in
event time paced to the shared clock, publishes `engine.iteration.<instance>` for every
forward pass and `request.completed` (durable) for every finished request, and answers
NVML-shaped calls for its twin GPU on `twin.gpu.<instance>.read` (the collector) and
`.control` (the actuator).
"""

from __future__ import annotations

import math
from functools import partial

import anyio
import anyio.abc
import structlog

from throttllem._bus import Bus
from throttllem._errors import ConfigError, RequestRejectedError
from throttllem._events import REQUEST_CODEC, RequestAdmitted, RequestDeferred, RequestEvent
from throttllem._gpu.remote import serve_gpu
from throttllem._runtime import Clock
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import (
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


class EngineTwinService:
    name = "engine"

    def __init__(self, *, instance: str, setup: str = DEFAULT_SETUP,
                 slack_wall_s: float = 0.05) -> None:
        """`slack_wall_s`: how far (wall seconds) the engine's time trails the shared clock, so
        that an admission delayed on the bus by less than that still starts at its own decision
        time; without it, bus latency would be magnified by --speed. Keep it near the bus
        latency: the forecaster sees each engine's state this much late and plans for it, so
        0.5 s of slack at speed 1 made it raise clocks that the evaluator (no bus) never
        needed (live 12% more energy above idle than the evaluator on the same window)."""
        if slack_wall_s < 0:
            raise ConfigError("--slack must be non-negative")
        self.slack_wall_s = slack_wall_s
        self.instance = token(instance)
        self.profile = load_profile(setup)
        self.gpu = GpuTwin(self.profile)
        self.engine = EngineTwin(self.profile, self.instance, self.gpu)

    async def _on_admitted(self, event: RequestEvent) -> None:
        if isinstance(event, RequestAdmitted) and event.instance == self.instance:
            await self._inbox_send.send(event)

    async def _admit(self, bus: Bus, admission: RequestAdmitted, admitted_s: float) -> None:
        request = admission.request
        try:
            self.engine.admit(request, admitted_s=admitted_s)
        except RequestRejectedError as e:
            bus.counters["requests_rejected"] += 1
            log.warning("engine.request_rejected", instance=self.instance, id=request.id,
                        error=str(e))
            if "already in engine" not in str(e):  # a duplicate is harmless; the rest is news
                await bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                    id=request.id, decided_s=admitted_s, reason=f"{self.instance}: {e}",
                    final=True),
                    msg_id=f"rejected-{request.id}")

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
                    pending.append(self._inbox.receive_nowait())
                except anyio.WouldBlock:
                    break
            if pending:
                pending.sort(key=lambda a: a.decided_s)
                due = [a for a in pending if a.decided_s <= now_s]
                pending = pending[len(due):]
                for admission in due:
                    await self._admit(bus, admission, max(now_s, admission.decided_s))
            outcome = self.engine.step(now_s)
            if outcome is None:
                if pending:  # nothing runnable until the next admission is due
                    now_s = max(now_s, pending[0].decided_s)
                    self.gpu.idle_until(now_s)
                    continue
                with anyio.move_on_after(_IDLE_POLL_WALL_S):
                    pending.append(await self._inbox.receive())
                now_s = max(now_s, clock.now_s() - slack_s)
                self.gpu.idle_until(now_s)
                continue
            it = outcome.iteration
            now_s = it.start_s + it.duration_ms / 1e3
            await bus.publish(iteration_subject, it)
            for done in outcome.completed:
                await bus.publish_durable(REQUEST_COMPLETED, done, msg_id=f"done-{done.id}")
            await clock.sleep_until(now_s + slack_s)

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        await serve_gpu(bus, twin_gpu(self.instance), self.gpu)
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[RequestAdmitted](
            max_buffer_size=math.inf)
        with self._inbox_send, self._inbox:
            await self._serve(bus, clock, task_status)

    async def _serve(self, bus: Bus, clock: Clock, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(partial(
                bus.consume, durable=f"engine-{self.instance}", deliver_new_only=True,
                subject=request_admitted(self.instance), codec=REQUEST_CODEC,
                handler=self._on_admitted))
            tg.start_soon(self._loop, bus, clock)
            log.info("engine.started", instance=self.instance, setup=self.profile.name)
            task_status.started()

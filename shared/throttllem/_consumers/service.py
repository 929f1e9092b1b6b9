"""`throttllem run consumer --plugin NAME`: one plug-in fed from its own durable consumers.

The durable names are `<durable>-energy` (and `<durable>-completed` for a plug-in that wants
completions), so two plug-ins, or the same plug-in under two names, each get every record,
while replicas of one deployment (same name) share the work.
"""

from __future__ import annotations

from functools import partial

import anyio
import anyio.abc
import structlog

from throttllem import _metrics as m
from throttllem._bus import Bus
from throttllem._consumers import Consumer, ConsumerContext
from throttllem._events import (
    ENERGY_CODEC,
    REQUEST_CODEC,
    RequestCompleted,
    RequestEnergy,
    RequestEvent,
)
from throttllem._runtime import Clock
from throttllem._subjects import ENERGY_REQUEST, REQUEST_COMPLETED, token

log = structlog.get_logger("throttllem.consumer")

_OUTCOME = {True: "new", False: "duplicate", None: "received"}


class ConsumerService:
    name = "consumer"

    def __init__(self, plugin: Consumer, context: ConsumerContext, *,
                 deliver_new_only: bool = False, ack_wait_s: float = 30.0) -> None:
        """`deliver_new_only`: a durable created now skips the stream's history (an existing
        durable always resumes where it stopped)."""
        self.plugin = plugin
        self.context = context
        self.durable = token(context.durable)
        self.deliver_new_only = deliver_new_only
        self.ack_wait_s = ack_wait_s
        self.metrics = context.metrics
        self._records = self.metrics.counter(m.CONSUMER_RECORDS)

    async def _on_energy(self, record: RequestEnergy) -> None:
        outcome = await self.plugin.on_energy(record)
        self._records.labels(self.context.plugin, _OUTCOME[outcome]).inc()

    async def _on_request(self, event: RequestEvent) -> None:
        if isinstance(event, RequestCompleted):
            outcome = await self.plugin.on_completed(event)
            self._records.labels(self.context.plugin, _OUTCOME[outcome]).inc()

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        await self.plugin.open()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(partial(
                    bus.consume, durable=f"{self.durable}-energy", subject=ENERGY_REQUEST,
                    codec=ENERGY_CODEC, handler=self._on_energy, ack_wait_s=self.ack_wait_s,
                    deliver_new_only=self.deliver_new_only))
                if self.plugin.wants_completions:
                    await tg.start(partial(
                        bus.consume, durable=f"{self.durable}-completed",
                        subject=REQUEST_COMPLETED, codec=REQUEST_CODEC,
                        handler=self._on_request, ack_wait_s=self.ack_wait_s,
                        deliver_new_only=self.deliver_new_only))
                log.info("consumer.started", plugin=self.context.plugin, durable=self.durable,
                         completions=self.plugin.wants_completions)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self.plugin.close()

"""The forecaster / SLO checker service: decides where (and, later, at what clock) each
request runs. This stage ships the default policy: admit at once to the least-loaded
instance and leave clocks at the GPU default, as an engine shipped without throttLL'eM does.
"""

from __future__ import annotations

from functools import partial

import anyio
import anyio.abc
import structlog

from throttllem._bus import Bus
from throttllem._core.routing import least_loaded
from throttllem._errors import ConfigError
from throttllem._events import (
    REQUEST_CODEC,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestEvent,
)
from throttllem._runtime import Clock
from throttllem._subjects import REQUEST_ARRIVED, REQUEST_COMPLETED, request_admitted, token

log = structlog.get_logger("throttllem.forecaster")

POLICIES = ("default",)


class ForecasterService:
    name = "forecaster"

    def __init__(self, *, instances: list[str], policy: str = "default") -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; this build knows {POLICIES}")
        if not instances:
            raise ConfigError("the forecaster needs at least one engine instance (--instances)")
        self.instances = [token(i) for i in instances]
        self.policy = policy
        # Soft state: requests admitted and not yet completed, per instance.
        self.outstanding = dict.fromkeys(self.instances, 0)

    async def _on_completed(self, event: RequestEvent) -> None:
        if isinstance(event, RequestCompleted) and event.instance in self.outstanding:
            self.outstanding[event.instance] = max(self.outstanding[event.instance] - 1, 0)

    async def _on_arrived(self, bus: Bus, clock: Clock, event: RequestEvent) -> None:
        if not isinstance(event, RequestArrived):
            return
        instance = least_loaded(self.outstanding)
        admitted = RequestAdmitted(request=event, instance=instance, decided_s=clock.now_s(),
                                   reason=f"policy={self.policy}: least outstanding")
        # The msg id makes a redelivered arrival (after a crash before its ack) admit once.
        await bus.publish_durable(request_admitted(instance), admitted, msg_id=f"admit-{event.id}")
        self.outstanding[instance] += 1

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        await bus.subscribe(REQUEST_COMPLETED, REQUEST_CODEC, self._on_completed)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(
                bus.consume, durable="forecaster", subject=REQUEST_ARRIVED, codec=REQUEST_CODEC,
                handler=partial(self._on_arrived, bus, clock)))
            log.info("forecaster.started", policy=self.policy, instances=self.instances)
            task_status.started()

"""The trace replayer: a gateway stand-in that publishes a trace's requests at their
(scaled) arrival times, in event time, so that `--speed` replays faster than real time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio
import anyio.abc
import structlog

from throttllem._bus import Bus
from throttllem._events import RequestArrived
from throttllem._runtime import Clock
from throttllem._subjects import REQUEST_ARRIVED

log = structlog.get_logger("throttllem.replayer")


async def replay(bus: Bus, clock: Clock, requests: Iterable[RequestArrived], *,
                 on_published: Callable[[RequestArrived], None] | None = None) -> int:
    """Publish each request when event time reaches its arrival; returns how many."""
    count = 0
    for request in requests:
        await clock.sleep_until(request.arrival_s)
        await bus.publish_durable(REQUEST_ARRIVED, request, msg_id=f"arrived-{request.id}")
        count += 1
        if on_published is not None:
            on_published(request)
    return count


class ReplayerService:
    name = "replayer"

    def __init__(self, requests: Callable[[], Iterable[RequestArrived]]) -> None:
        self._requests = requests
        self.published = 0

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        task_status.started()
        self.published = await replay(bus, clock, self._requests())
        log.info("replayer.done", published=self.published)

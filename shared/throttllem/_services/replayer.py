"""The trace replayer: a gateway stand-in that publishes a trace's requests at their
(scaled) arrival times, in event time, so that `--speed` replays faster than real time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio
import anyio.abc
import structlog

from throttllem import _metrics as m
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

    def __init__(self, requests: Callable[[float], Iterable[RequestArrived]], *,
                 offset_s: float | None = None) -> None:
        """`requests(offset_s)` yields the trace shifted to start at event time `offset_s`;
        without an offset the trace starts one second after the service is ready."""
        self._requests = requests
        self._offset_s = offset_s
        self.published = 0
        self.metrics = m.ServiceMetrics(self.name)
        self._replayed = self.metrics.counter(m.REPLAYED)
        self._lag = self.metrics.gauge(m.REPLAY_LAG)

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await bus.ensure_request_stream()
        task_status.started()
        offset_s = self._offset_s if self._offset_s is not None else clock.now_s() + 1.0

        def observe(request: RequestArrived) -> None:
            self._replayed.labels(request.tenant, request.slo_class).inc()
            self._lag.set(max(clock.now_s() - request.arrival_s, 0.0))

        self.published = await replay(bus, clock, self._requests(offset_s), on_published=observe)
        log.info("replayer.done", published=self.published)

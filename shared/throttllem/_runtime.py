"""Service runtime: one anyio task group per service, readiness, heartbeats, graceful stop.

Services are objects with a `name` and an async `run(bus, clock, *, task_status)` that calls
`task_status.started()` once subscribed. The runtime connects the bus, starts the service,
publishes `tllm.v1.health.<service>` heartbeats with the bus's counters, and on SIGTERM or
SIGINT cancels the group and drains the connection so that nothing in flight is dropped.

Time: services read the clock only here, through a `Clock`. In simulated runs (the demo,
the twin) event time runs `speed` times faster than the wall and starts at a shared epoch,
so every process agrees on "now" without talking to each other.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import time
import uuid
from typing import Protocol

import anyio
import anyio.abc
import msgspec
import structlog

from throttllem import __version__
from throttllem._bus import Bus
from throttllem._busauth import BusAuth, redact_url
from throttllem._events import Heartbeat
from throttllem._metrics import MetricsServer, ServiceMetrics
from throttllem._subjects import health

log = structlog.get_logger("throttllem.runtime")


class Clock(msgspec.Struct, frozen=True, kw_only=True):
    """Event time as a function of wall time: `now_s = origin_s + (wall - epoch_wall_s)*speed`.

    With the defaults it is Unix time. Simulated runs set `epoch_wall_s` to a shared wall
    instant, `origin_s` to the trace time that instant stands for, and `speed` > 1 to replay
    faster than real time.
    """

    epoch_wall_s: float = 0.0
    origin_s: float = 0.0
    speed: float = 1.0

    def now_s(self) -> float:
        return self.origin_s + (time.time() - self.epoch_wall_s) * self.speed

    def wall_at(self, now_s: float) -> float:
        return self.epoch_wall_s + (now_s - self.origin_s) / self.speed

    async def sleep_until(self, now_s: float) -> None:
        delay = self.wall_at(now_s) - time.time()
        if delay > 0:
            await anyio.sleep(delay)


REAL_TIME = Clock()


class Service(Protocol):
    name: str

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...


async def _heartbeats(bus: Bus, service: Service, clock: Clock, instance_id: str,
                      period_s: float, *, exported: ServiceMetrics | None = None) -> None:
    started = time.monotonic()
    subject = health(service.name)
    while True:
        metrics_fn = getattr(service, "health_metrics", None)
        metrics: dict[str, float] = metrics_fn() if callable(metrics_fn) else {}
        # JSON has no NaN: a metric not known yet is left out rather than sent as null.
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        beat = Heartbeat(service=service.name, instance_id=instance_id, version=__version__,
                         now_s=clock.now_s(), uptime_s=time.monotonic() - started,
                         counters=dict(bus.counters), metrics=metrics)
        await bus.publish(subject, beat)
        if exported is not None:  # the age that `throttllem health` checks
            exported.heartbeat()
        await anyio.sleep(period_s)


def service_metrics(service: Service) -> ServiceMetrics:
    """The service's own `metrics` (a ServiceMetrics attribute: the hook a service uses to
    export its instruments), or a fresh one that exports only the bus's counters."""
    metrics = getattr(service, "metrics", None)
    return metrics if isinstance(metrics, ServiceMetrics) else ServiceMetrics(service.name)


async def run_service(service: Service, *, nats_url: str, clock: Clock = REAL_TIME,
                      heartbeat_s: float = 2.0, auth: BusAuth | None = None,
                      metrics_port: int | None = None,
                      metrics_host: str = "127.0.0.1") -> None:
    """Run one service until SIGTERM/SIGINT, then drain and return.

    `auth`: the service's NATS identity and TLS settings (its reply inbox is
    `_INBOX.<service name>`). `metrics_port`: serve the service's Prometheus metrics on
    `metrics_host:metrics_port` (`/metrics`; 0 picks a free port, logged as
    `metrics.serving`); None serves nothing.
    """
    instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    bound = log.bind(service=service.name, instance_id=instance_id)
    bus = await Bus.connect(nats_url, name=f"{service.name}-{instance_id}", auth=auth,
                            service=service.name)
    server: MetricsServer | None = None
    metrics: ServiceMetrics | None = None
    try:
        if metrics_port is not None:
            metrics = service_metrics(service)
            metrics.watch_bus(bus.counters, connected=lambda: bus.nc.is_connected)
            server = metrics.serve(metrics_port, metrics_host)
        async with anyio.create_task_group() as tg:
            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        bound.info("service.stopping", signal=signal.Signals(signum).name)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal)
            await tg.start(service.run, bus, clock)
            bound.info("service.ready", nats=redact_url(nats_url))
            tg.start_soon(functools.partial(_heartbeats, bus, service, clock, instance_id,
                                            heartbeat_s, exported=metrics))
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()
        if server is not None:
            server.close()
        bound.info("service.stopped", counters=dict(bus.counters))

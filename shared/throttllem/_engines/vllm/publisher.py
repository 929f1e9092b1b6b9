"""Publishes engine events to NATS from a background thread, so the engine never waits.

The engine's step loop calls `submit()`, which only hands the event to the publisher's event
loop (a thread-safe wake-up, no I/O) and returns. The publisher thread owns the NATS
connection: it keeps trying to connect while NATS is down, and drops (and counts) what does
not fit its bounded queue or cannot be sent. Every `heartbeat_s` it publishes a heartbeat with
its counters on `health.<service>`, so drops are visible on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections import Counter
from typing import Any

import msgspec
import nats
import structlog

from throttllem import __version__
from throttllem._errors import ConfigError
from throttllem._events import Heartbeat, encode
from throttllem._subjects import health

log = structlog.get_logger("throttllem.vllm")

NATS_URL_ENV = "THROTTLLEM_NATS_URL"
INSTANCE_ENV = "THROTTLLEM_INSTANCE"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
SERVICE = "vllm-adapter"


def settings_from_env(env: dict[str, str] | None = None) -> tuple[str, str]:
    """(NATS URL, instance name) from the environment; a missing instance is a clear error
    (events on a guessed subject would reach no controller)."""
    env = dict(os.environ) if env is None else env
    instance = env.get(INSTANCE_ENV, "").strip()
    if not instance:
        raise ConfigError(f"set {INSTANCE_ENV} to this vLLM instance's name (the controller's "
                          "instance list, e.g. i0) to publish its engine iterations")
    if any(c in instance for c in " .*>\t\n"):
        raise ConfigError(f"{INSTANCE_ENV}={instance!r}: an instance name is one subject token "
                          "(no spaces, dots, * or >)")
    return env.get(NATS_URL_ENV, "").strip() or DEFAULT_NATS_URL, instance


class EventPublisher:
    """A daemon thread with its own event loop and NATS connection; `submit()` never blocks."""

    def __init__(self, url: str, *, name: str, max_queue: int = 4096,
                 heartbeat_s: float = 2.0, reconnect_wait_s: float = 1.0) -> None:
        self.url = url
        self.name = name
        self.counters: Counter[str] = Counter()
        self._max_queue = max_queue
        self._heartbeat_s = heartbeat_s
        self._reconnect_wait_s = reconnect_wait_s
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[tuple[str, msgspec.Struct] | None] | None = None
        self._ready = threading.Event()
        self._started_s = time.time()
        self._instance_id = f"{socket.gethostname()}-{os.getpid()}"
        self._thread = threading.Thread(target=self._run, name=f"throttllem-{name}", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=5.0)

    # ---- engine side (any thread)

    def submit(self, subject: str, event: msgspec.Struct) -> None:
        """Queue one event for publishing; returns at once. Counted as dropped when the queue
        is full (NATS slow or down) or the publisher has stopped."""
        if self._loop.is_closed() or not self._thread.is_alive():
            self.counters["dropped_stopped"] += 1
            return
        try:
            self._loop.call_soon_threadsafe(self._enqueue, subject, event)
        except RuntimeError:  # the loop closed between the check and the call
            self.counters["dropped_stopped"] += 1

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (up to `timeout_s`), then stop the thread."""
        if self._thread.is_alive() and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._enqueue_stop)
            self._thread.join(timeout_s)

    # ---- publisher thread

    def _enqueue(self, subject: str, event: msgspec.Struct) -> None:
        assert self._queue is not None
        try:
            self._queue.put_nowait((subject, event))
        except asyncio.QueueFull:
            self.counters["dropped_queue_full"] += 1

    def _enqueue_stop(self) -> None:
        assert self._queue is not None
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except asyncio.QueueFull:  # make room for the stop marker: the oldest goes
                self._queue.get_nowait()
                self.counters["dropped_queue_full"] += 1

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception as e:  # never take the engine down with us
            log.error("publisher.failed", error=repr(e))
        finally:
            self._loop.close()

    async def _connect(self) -> Any:
        """Connect, retrying until it works; unbounded reconnects once connected."""
        attempt = 0
        while True:
            try:
                nc = await nats.connect(
                    self.url, name=self.name, connect_timeout=2, allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=self._reconnect_wait_s,
                    disconnected_cb=self._on_disconnect, reconnected_cb=self._on_reconnect,
                    error_cb=self._on_error)
            except Exception as e:
                attempt += 1
                self.counters["connect_failures"] += 1
                if attempt == 1 or attempt % 30 == 0:
                    log.warning("publisher.nats_unreachable", url=self.url, error=repr(e),
                                attempts=attempt)
                await asyncio.sleep(self._reconnect_wait_s)
                continue
            log.info("publisher.connected", url=self.url)
            return nc

    async def _on_disconnect(self) -> None:
        self.counters["disconnects"] += 1

    async def _on_reconnect(self) -> None:
        log.info("publisher.reconnected", url=self.url)

    async def _on_error(self, e: Exception) -> None:
        self.counters["nats_errors"] += 1

    async def _main(self) -> None:
        self._queue = asyncio.Queue(self._max_queue)
        self._ready.set()
        connecting = asyncio.ensure_future(self._connect())
        heartbeat = asyncio.ensure_future(self._heartbeats(connecting))
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    break
                if not connecting.done() or connecting.exception() is not None:
                    self.counters["dropped_disconnected"] += 1
                    continue
                await self._publish(connecting.result(), *item)
        finally:
            heartbeat.cancel()
            if connecting.done() and connecting.exception() is None:
                nc = connecting.result()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.drain(), 1.0)
            else:
                connecting.cancel()

    async def _publish(self, nc: Any, subject: str, event: msgspec.Struct) -> None:
        try:
            await nc.publish(subject, encode(event))
        except Exception:  # outbound buffer full while reconnecting, connection closed
            self.counters["dropped_send_failed"] += 1
        else:
            self.counters["published"] += 1

    async def _heartbeats(self, connecting: asyncio.Future[Any]) -> None:
        nc = await connecting
        while True:
            now = time.time()
            beat = Heartbeat(service=SERVICE, instance_id=self._instance_id, version=__version__,
                             now_s=now, uptime_s=now - self._started_s,
                             counters=dict(self.counters),
                             status="ok" if not self._dropped() else "dropping")
            with contextlib.suppress(Exception):
                await nc.publish(health(SERVICE), encode(beat))
            await asyncio.sleep(self._heartbeat_s)

    def _dropped(self) -> int:
        return sum(v for k, v in self.counters.items() if k.startswith("dropped"))

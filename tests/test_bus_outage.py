"""The bus rides out a NATS outage: the server stops for several seconds mid-stream and comes
back on the same port and store; durable publishes neither fail nor duplicate, and a durable
consumer resumes and sees every message exactly once."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._engines.twin import EngineTwinService
from throttllem._events import REQUEST_CODEC, RequestArrived, RequestCompleted, RequestEvent
from throttllem._runtime import Clock, Service
from throttllem._services.telemetry import TelemetryService
from throttllem._subjects import REQUEST_ARRIVED, REQUEST_COMPLETED, REQUEST_STREAM
from throttllem.testing import (
    RestartableNats,
    audited_replay,
    forecaster_service,
    running_services,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Longer outages: THROTTLLEM_TEST_OUTAGE_S=60 pytest tests/test_bus_outage.py
OUTAGE_S = float(os.environ.get("THROTTLLEM_TEST_OUTAGE_S", "6"))
MESSAGES = 400
PUBLISHERS = 4


def arrived(n: int) -> RequestArrived:
    return RequestArrived(id=f"r{n}", arrival_s=float(n), prompt_tokens=10 + n)


@pytest.mark.timeout(120 + 3 * OUTAGE_S)
async def test_durable_publishes_and_consumers_survive_a_server_outage(tmp_path: Path) -> None:
    server = RestartableNats(tmp_path / "js")
    url = server.start()
    producer = await Bus.connect(url, name="producer")
    consumer = await Bus.connect(url, name="consumer")
    await producer.ensure_request_stream()
    received: Counter[str] = Counter()
    published: list[str] = []
    outage: dict[str, float] = {}

    async def handler(event: RequestEvent) -> None:
        assert isinstance(event, RequestArrived)
        received[event.id] += 1

    async def publish_some(first: int) -> None:
        # Several publishers, so that some publish is in flight when the server goes away.
        for n in range(first, MESSAGES, PUBLISHERS):
            await producer.publish_durable(REQUEST_ARRIVED, arrived(n), msg_id=f"arrived-r{n}",
                                           timeout_s=1.0)
            published.append(f"r{n}")
            await anyio.sleep(0.005)

    async def publish_all() -> None:
        async with anyio.create_task_group() as publishers:
            for first in range(PUBLISHERS):
                publishers.start_soon(publish_some, first)

    async def outage_midway() -> None:
        while len(published) < MESSAGES // 3:
            await anyio.sleep(0.01)
        server.stop()
        outage["stopped"] = time.monotonic()
        outage["published_before"] = len(published)
        await anyio.sleep(OUTAGE_S)
        outage["published_during"] = len(published) - outage["published_before"]
        server.start()
        outage["restarted"] = time.monotonic()

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(partial(consumer.consume, durable="outage", subject=REQUEST_ARRIVED,
                                   codec=REQUEST_CODEC, handler=handler, batch=8))
            tg.start_soon(outage_midway)
            with anyio.fail_after(60 + 2 * OUTAGE_S):
                await publish_all()
                while len(received) < MESSAGES:
                    await anyio.sleep(0.05)
                await anyio.sleep(1.5)  # time for a duplicate delivery to show up
            tg.cancel_scope.cancel()
        assert outage["restarted"] - outage["stopped"] >= OUTAGE_S
        assert outage["published_during"] <= PUBLISHERS  # nothing acked while down
        assert sorted(published) == sorted(f"r{n}" for n in range(MESSAGES))
        assert set(received) == set(published)
        assert max(received.values()) == 1, "a message was handled twice"
        info = await producer.js.stream_info(REQUEST_STREAM)
        assert info.state.messages == MESSAGES  # the retried publishes were stored once
        print(f"outage {outage['restarted'] - outage['stopped']:.1f} s: {MESSAGES} published, "
              f"{len(received)} consumed once each, publish retries "
              f"{producer.counters['publish_retries.request']}, consumer rebinds "
              f"{consumer.counters['consume_errors']}")
    finally:
        await producer.close()
        await consumer.close()
        server.stop()


async def test_fire_and_forget_publish_during_an_outage_never_raises(tmp_path: Path) -> None:
    """Telemetry published while the server is away is buffered by the client or, once the
    buffer is full, counted as dropped; the publisher never sees an exception."""
    server = EmbeddedNatsServer(store_dir=tmp_path / "js")
    url = server.start()
    bus = await Bus.connect(url, name="telemetry")
    try:
        server.stop()
        with anyio.fail_after(10):
            while bus.nc.is_connected:
                await anyio.sleep(0.01)
        big = RequestArrived(id="x", arrival_s=0.0, prompt_tokens=1, prompt_text="y" * 100_000)
        for _ in range(60):  # 6 MB, three times nats-py's 2 MB reconnect buffer
            await bus.publish("tllm.v1.test.live", big)
        assert bus.counters["dropped.test"] >= 1
    finally:
        await bus.close()
        server.stop()


@pytest.mark.timeout(120 + 3 * OUTAGE_S)
async def test_durable_publishes_to_a_hung_server_are_retried_and_stored_once(
        nats: EmbeddedNatsServer) -> None:
    """A server that hangs (SIGSTOP) keeps the connection open but acks nothing: publishes
    time out and are retried with the same message id until it wakes up; each is stored once."""
    bus = await Bus.connect(nats.url, name="producer")
    await bus.ensure_request_stream()
    assert nats.pid is not None
    try:
        async with anyio.create_task_group() as tg:
            async def publish(n: int) -> None:
                await bus.publish_durable(REQUEST_ARRIVED, arrived(n), msg_id=f"arrived-r{n}",
                                          timeout_s=0.5)

            os.kill(nats.pid, signal.SIGSTOP)
            try:
                for n in range(20):
                    tg.start_soon(publish, n)
                await anyio.sleep(OUTAGE_S)
            finally:
                os.kill(nats.pid, signal.SIGCONT)
        info = await bus.js.stream_info(REQUEST_STREAM)
        assert info.state.messages == 20
        assert bus.counters["publish_retries.request"] >= 20  # every publish timed out
    finally:
        await bus.close()


@pytest.mark.timeout(180 + 3 * OUTAGE_S)
async def test_the_services_serve_every_request_once_across_a_server_outage(
        tmp_path: Path) -> None:
    """Replayer, forecaster, engine and telemetry keep running through an outage in the middle
    of a replay: every request is completed and billed exactly once, nobody exits."""
    clock = Clock(epoch_wall_s=time.time())
    services: dict[str, Service] = {
        "engine": EngineTwinService(instance="i0"),
        "forecaster": forecaster_service(instances=["i0"], policy="default"),
        "telemetry": TelemetryService(gpu="twin", instances=["i0"], interval_s=0.2)}
    total = 30
    start = clock.now_s() + 0.5
    requests = [RequestArrived(id=f"q{n}", arrival_s=start + 0.2 * n, prompt_tokens=50 + n,
                               true_output_tokens=5 + n % 7) for n in range(total)]
    with RestartableNats(tmp_path / "js") as server:
        async with (running_services(server.url, clock, services) as buses,
                    audited_replay(server.url, clock, requests) as window):
            with anyio.fail_after(120 + 2 * OUTAGE_S):
                await window.wait_published(total // 3)
                await server.outage(OUTAGE_S)
                await window.wait_served()
            window.assert_served_once()
            stored = await window.audit.history(REQUEST_COMPLETED, REQUEST_CODEC)
            assert sorted(e.id for e in stored if isinstance(e, RequestCompleted)) == \
                sorted(r.id for r in requests)  # stored once each, retries de-duplicated
            retries = {n: sum(v for k, v in b.counters.items()
                              if k.startswith("publish_retries"))
                       for n, b in [*buses.items(), ("replayer", window.replayer)]}
        print(f"pipeline outage {OUTAGE_S:.0f} s: {total} requests completed and billed once;"
              f" durable publish retries {retries}")

"""No single NATS server to lose: three nats-servers on loopback routed into one cluster, the
request stream at three replicas, the services given every node's URL; the node leading the
stream is killed (SIGKILL) mid-replay and nothing is lost or served twice."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus
from throttllem._engines.twin import EngineTwinService
from throttllem._events import (
    ENERGY_CODEC,
    REQUEST_CODEC,
    RequestArrived,
    RequestCompleted,
    RequestEnergy,
    RequestEvent,
)
from throttllem._runtime import Clock, Service
from throttllem._services.replayer import replay
from throttllem._services.telemetry import TelemetryService
from throttllem._subjects import ENERGY_REQUEST, REQUEST_COMPLETED, REQUEST_STREAM
from throttllem.testing import forecaster_service, nats_cluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def replicated_stream(bus: Bus, replicas: int) -> None:
    """Create the stream once the cluster has elected its JetStream leader."""
    with anyio.fail_after(30):
        while True:
            try:
                await bus.ensure_request_stream(replicas=replicas)
                info = await bus.js.stream_info(REQUEST_STREAM)
            except Exception:  # not ready yet: any JetStream error
                await anyio.sleep(0.2)
                continue
            if info.cluster is not None and info.cluster.leader:
                return
            await anyio.sleep(0.2)


@pytest.mark.timeout(240)
async def test_a_cluster_node_lost_mid_replay_loses_and_duplicates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THROTTLLEM_STREAM_REPLICAS", "3")  # as deploy/ sets it for services
    with nats_cluster(tmp_path) as cluster:
        url = cluster.url
        clock = Clock(epoch_wall_s=time.time())
        audit = await Bus.connect(url, name="audit")
        await replicated_stream(audit, 3)
        services: dict[str, Service] = {"engine": EngineTwinService(instance="i0"),
                    "forecaster": forecaster_service(instances=["i0"], policy="default"),
                    "telemetry": TelemetryService(gpu="twin", instances=["i0"], interval_s=0.2)}
        buses = {name: await Bus.connect(url, name=name, service=name) for name in services}
        replayer = await Bus.connect(url, name="replayer", service="replayer")
        completed: Counter[str] = Counter()
        billed: Counter[str] = Counter()
        published: list[str] = []
        total = 40

        async def on_completed(event: RequestEvent) -> None:
            if isinstance(event, RequestCompleted):
                completed[event.id] += 1

        async def on_energy(record: RequestEnergy) -> None:
            billed[record.id] += 1

        start = clock.now_s() + 0.5
        requests = [RequestArrived(id=f"q{n}", arrival_s=start + 0.15 * n,
                                   prompt_tokens=50 + n, true_output_tokens=5 + n % 7)
                    for n in range(total)]
        try:
            async with anyio.create_task_group() as tg:
                for name, service in services.items():
                    await tg.start(service.run, buses[name], clock)
                await tg.start(partial(audit.consume, durable="audit", subject=REQUEST_COMPLETED,
                                       codec=REQUEST_CODEC, handler=on_completed))
                await tg.start(partial(audit.consume, durable="bill", subject=ENERGY_REQUEST,
                                       codec=ENERGY_CODEC, handler=on_energy))

                async def replay_all() -> None:
                    await replay(replayer, clock, requests,
                                 on_published=lambda r: published.append(r.id))

                tg.start_soon(replay_all)
                with anyio.fail_after(150):
                    while len(published) < total // 3:
                        await anyio.sleep(0.01)
                    info = await audit.js.stream_info(REQUEST_STREAM)
                    assert info.config.num_replicas == 3
                    assert info.cluster is not None
                    leader = str(info.cluster.leader)
                    victim = cluster.server_named(leader)
                    assert victim.pid is not None
                    os.kill(victim.pid, signal.SIGKILL)  # the stream's leader, no goodbye
                    killed_at = len(published)
                    while len(completed) < total or len(billed) < total:
                        await anyio.sleep(0.05)
                    await anyio.sleep(1.0)  # time for a duplicate to show up
                tg.cancel_scope.cancel()
            assert set(completed) == set(billed) == {r.id for r in requests}
            assert max(completed.values()) == max(billed.values()) == 1
            info = await audit.js.stream_info(REQUEST_STREAM)
            assert info.cluster is not None
            assert info.cluster.leader != leader  # another node took over
            print(f"\ncluster node {leader} (stream leader) killed -9 after {killed_at} of "
                  f"{total} arrivals: {len(completed)} completed and billed once each; new "
                  f"leader {info.cluster.leader}")
        finally:
            for bus in [*buses.values(), audit, replayer]:
                await bus.close()

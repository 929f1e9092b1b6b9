"""No single NATS server to lose: three nats-servers on loopback routed into one cluster, the
request stream at three replicas, the services given every node's URL; the node leading the
stream is killed (SIGKILL) mid-replay and nothing is lost or served twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus
from throttllem._engines.twin import EngineTwinService
from throttllem._events import RequestArrived
from throttllem._runtime import Clock, Service
from throttllem._services.telemetry import TelemetryService
from throttllem._subjects import REQUEST_STREAM
from throttllem.testing import (
    audited_replay,
    forecaster_service,
    nats_cluster,
    running_services,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def replicated_stream(url: str, replicas: int) -> None:
    """Create the stream once the cluster has elected its JetStream leader."""
    bus = await Bus.connect(url, name="stream-setup")
    try:
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
    finally:
        await bus.close()


@pytest.mark.timeout(240)
async def test_a_cluster_node_lost_mid_replay_loses_and_duplicates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THROTTLLEM_STREAM_REPLICAS", "3")  # as deploy/ sets it for services
    with nats_cluster(tmp_path) as cluster:
        url = cluster.url
        clock = Clock(epoch_wall_s=time.time())
        await replicated_stream(url, 3)
        services: dict[str, Service] = {
            "engine": EngineTwinService(instance="i0"),
            "forecaster": forecaster_service(instances=["i0"], policy="default"),
            "telemetry": TelemetryService(gpu="twin", instances=["i0"], interval_s=0.2)}
        total = 40
        start = clock.now_s() + 0.5
        requests = [RequestArrived(id=f"q{n}", arrival_s=start + 0.15 * n,
                                   prompt_tokens=50 + n, true_output_tokens=5 + n % 7)
                    for n in range(total)]
        async with (running_services(url, clock, services),
                    audited_replay(url, clock, requests) as window):
            with anyio.fail_after(150):
                await window.wait_published(total // 3)
                info = await window.audit.js.stream_info(REQUEST_STREAM)
                assert info.config.num_replicas == 3
                assert info.cluster is not None
                leader = str(info.cluster.leader)
                victim = cluster.server_named(leader)
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)  # the stream's leader, no goodbye
                killed_at = len(window.published)
                await window.wait_served()
            window.assert_served_once()
            info = await window.audit.js.stream_info(REQUEST_STREAM)
        assert info.cluster is not None
        assert info.cluster.leader != leader  # another node took over
        print(f"\ncluster node {leader} (stream leader) killed -9 after {killed_at} of "
              f"{total} arrivals: {len(window.completed)} completed and billed once each; "
              f"new leader {info.cluster.leader}")

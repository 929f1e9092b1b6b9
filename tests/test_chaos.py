"""Chaos: one replay through real service processes (forecaster, engine, telemetry) on a real
nats-server, while each service in turn is killed with SIGKILL and restarted, and then the
server itself goes away for a while: every request is completed and billed exactly once.
(The clock fail-safe's own deaths are in test_clock_failsafe.py.)

Longer outages: THROTTLLEM_CHAOS_DOWN_S=30 pytest tests/test_chaos.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import (
    ENERGY_CODEC,
    REQUEST_CODEC,
    RequestArrived,
    RequestCompleted,
    RequestEnergy,
    RequestEvent,
)
from throttllem._runtime import REAL_TIME
from throttllem._services.replayer import replay
from throttllem._subjects import ENERGY_REQUEST, REQUEST_COMPLETED

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOWN_S = float(os.environ.get("THROTTLLEM_CHAOS_DOWN_S", "3"))
SERVICES = {
    "forecaster": ["forecaster", "--instances", "i0", "--policy", "default"],
    "engine": ["engine", "--instance", "i0"],
    "telemetry": ["telemetry", "--gpu", "twin", "--instances", "i0", "--interval", "0.5"],
}


class ServiceProcess:
    """One `throttllem run` process that the test kills and starts again."""

    def __init__(self, name: str, url: str, log_dir: Path) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "throttllem", "run", *SERVICES[name], "--nats", url]
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1

    async def ready(self) -> None:
        with anyio.fail_after(60):
            while self.log_path.read_text().count("service.ready") < self.starts:
                await anyio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.mark.timeout(240 + 3 * DOWN_S)
async def test_killing_each_service_and_the_server_mid_replay_loses_and_duplicates_nothing(
        tmp_path: Path) -> None:
    store = tmp_path / "js"
    server = EmbeddedNatsServer(store_dir=store)
    url = server.start()
    again = EmbeddedNatsServer(store_dir=store, port=int(url.rsplit(":", 1)[1]))
    services = {name: ServiceProcess(name, url, tmp_path) for name in SERVICES}
    audit = await Bus.connect(url, name="audit")
    replayer = await Bus.connect(url, name="replayer", service="replayer")
    completed: Counter[str] = Counter()
    completions: list[RequestCompleted] = []
    killed_s: dict[str, float] = {}
    billed: Counter[str] = Counter()
    published: list[str] = []
    faults: list[str] = []
    total = 60

    async def on_completed(event: RequestEvent) -> None:
        if isinstance(event, RequestCompleted):
            completed[event.id] += 1
            completions.append(event)

    async def on_energy(record: RequestEnergy) -> None:
        billed[record.id] += 1

    try:
        await audit.ensure_request_stream()
        for service in services.values():
            service.start()
        for service in services.values():
            await service.ready()
        start = REAL_TIME.now_s() + 0.5
        requests = [RequestArrived(id=f"c{n}", arrival_s=start + 0.4 * n, prompt_tokens=40 + n,
                                   true_output_tokens=100 + 20 * (n % 11)) for n in range(total)]
        async with anyio.create_task_group() as tg:
            await tg.start(partial(audit.consume, durable="audit", subject=REQUEST_COMPLETED,
                                   codec=REQUEST_CODEC, handler=on_completed))
            await tg.start(partial(audit.consume, durable="bill", subject=ENERGY_REQUEST,
                                   codec=ENERGY_CODEC, handler=on_energy))

            async def replay_all() -> None:
                await replay(replayer, REAL_TIME, requests,
                             on_published=lambda r: published.append(r.id))

            tg.start_soon(replay_all)
            with anyio.fail_after(180 + 2 * DOWN_S):
                # Each service dies in turn while requests keep arriving (the engine with
                # requests in flight), and comes back.
                for k, service in enumerate(services.values(), start=1):
                    while len(published) < k * total // 5:
                        await anyio.sleep(0.05)
                    service.kill()
                    killed_s[service.name] = REAL_TIME.now_s()
                    faults.append(f"{service.name} killed -9 at {len(published)}/{total}")
                    await anyio.sleep(1.0)
                    service.start()
                    await service.ready()
                while len(published) < 4 * total // 5:
                    await anyio.sleep(0.05)
                server.stop()
                faults.append(f"nats-server down {DOWN_S:g} s at {len(published)}/{total}")
                await anyio.sleep(DOWN_S)
                again.start()
                while len(completed) < total or len(billed) < total:
                    await anyio.sleep(0.1)
                await anyio.sleep(1.0)  # time for a duplicate to show up
            tg.cancel_scope.cancel()
        assert set(completed) == set(billed) == {r.id for r in requests}
        assert max(completed.values()) == max(billed.values()) == 1
        crash_s = killed_s["engine"]
        across = sum(1 for c in completions if c.arrival_s < crash_s < c.completed_s)
        print(f"\nchaos: {'; '.join(faults)}: {total} requests, 0 lost, 0 served twice; "
              f"{across} arrived before the engine's crash and completed after it")
    finally:
        await audit.close()
        await replayer.close()
        for service in services.values():
            service.stop()
        again.stop()
        server.stop()

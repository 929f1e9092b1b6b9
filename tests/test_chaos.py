"""Chaos: one replay through real service processes (forecaster, engine, telemetry) on a real
nats-server, while each service in turn is killed with SIGKILL and restarted, and then the
server itself goes away for a while: every request is completed and billed exactly once.
(The clock fail-safe's own deaths are in test_clock_failsafe.py.)

Longer outages: THROTTLLEM_CHAOS_DOWN_S=30 pytest tests/test_chaos.py
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio
import pytest

from throttllem._events import RequestArrived
from throttllem._runtime import REAL_TIME
from throttllem.testing import RestartableNats, ServiceProcess, audited_replay

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOWN_S = float(os.environ.get("THROTTLLEM_CHAOS_DOWN_S", "3"))
SERVICES = {
    "forecaster": ["forecaster", "--instances", "i0", "--policy", "default"],
    "engine": ["engine", "--instance", "i0"],
    "telemetry": ["telemetry", "--gpu", "twin", "--instances", "i0", "--interval", "0.5"],
}
# Both engines of `throttllem run engine` share one shell: each is killed in its turn. The
# GPU engine runs on the CPU with its fake pass timer (nothing measured, energy billed 0).
ENGINES = {
    "twin": [],
    "gpu": ["--backend", "gpu", "--device", "cpu", "--runner", "fake"],
}


@pytest.mark.timeout(240 + 3 * DOWN_S)
@pytest.mark.parametrize("backend", list(ENGINES))
async def test_killing_each_service_and_the_server_mid_replay_loses_and_duplicates_nothing(
        tmp_path: Path, backend: str) -> None:
    killed_s: dict[str, float] = {}
    faults: list[str] = []
    total = 60
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(RestartableNats(tmp_path / "js"))
        commands = {**SERVICES, "engine": SERVICES["engine"] + ENGINES[backend]}
        services = {name: stack.enter_context(ServiceProcess(name, args, server.url, tmp_path))
                    for name, args in commands.items()}
        for service in services.values():
            service.start()
        for service in services.values():
            await service.ready()
        start = REAL_TIME.now_s() + 0.5
        requests = [RequestArrived(id=f"c{n}", arrival_s=start + 0.4 * n, prompt_tokens=40 + n,
                                   true_output_tokens=100 + 20 * (n % 11)) for n in range(total)]
        async with audited_replay(server.url, REAL_TIME, requests) as window:
            with anyio.fail_after(180 + 2 * DOWN_S):
                # Each service dies in turn while requests keep arriving (the engine with
                # requests in flight), and comes back.
                for k, service in enumerate(services.values(), start=1):
                    await window.wait_published(k * total // 5)
                    service.kill()
                    killed_s[service.name] = REAL_TIME.now_s()
                    faults.append(f"{service.name} killed -9 at "
                                  f"{len(window.published)}/{total}")
                    await anyio.sleep(1.0)
                    service.start()
                    await service.ready()
                await window.wait_published(4 * total // 5)
                faults.append(f"nats-server down {DOWN_S:g} s at "
                              f"{len(window.published)}/{total}")
                await server.outage(DOWN_S)
                await window.wait_served()
        window.assert_served_once()
        crash_s = killed_s["engine"]
        across = sum(1 for c in window.completions if c.arrival_s < crash_s < c.completed_s)
        print(f"\nchaos ({backend} engine): {'; '.join(faults)}: {total} requests, 0 lost, "
              f"0 served twice; {across} arrived before the engine's crash and completed after it")

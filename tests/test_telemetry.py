"""The telemetry collector against engine twins over a real nats-server: GPU samples, and
per-request energy records that agree with the engine's own attribution."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._engines.twin import EngineTwinService
from throttllem._events import (
    ENERGY_CODEC,
    GPU_CODEC,
    GpuSample,
    RequestAdmitted,
    RequestArrived,
    RequestEnergy,
)
from throttllem._runtime import Clock
from throttllem._services.telemetry import TelemetryService
from throttllem._subjects import ENERGY_REQUEST, GPU_SAMPLE_ALL, request_admitted

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def start(tg: anyio.abc.TaskGroup, service: object, url: str, clock: Clock) -> Bus:
    bus = await Bus.connect(url, name=getattr(service, "name", "svc"))
    run: Callable[..., Awaitable[None]] = service.run  # type: ignore[attr-defined]
    await tg.start(run, bus, clock)
    return bus


async def test_collector_samples_twins_and_bills_every_request(nats: EmbeddedNatsServer) -> None:
    clock = Clock(epoch_wall_s=time.time(), speed=5.0)
    samples: list[GpuSample] = []
    records: list[RequestEnergy] = []
    observer = await Bus.connect(nats.url, name="observer")
    await observer.ensure_request_stream()

    async def on_sample(sample: GpuSample) -> None:
        samples.append(sample)

    async def on_energy(record: RequestEnergy) -> None:
        records.append(record)

    await observer.subscribe(GPU_SAMPLE_ALL, GPU_CODEC, on_sample)
    telemetry = TelemetryService(gpu="twin", instances=["i0", "i1"], interval_s=0.1)
    buses: list[Bus] = []
    async with anyio.create_task_group() as tg:
        for inst in ("i0", "i1"):
            buses.append(await start(tg, EngineTwinService(instance=inst), nats.url, clock))
        buses.append(await start(tg, telemetry, nats.url, clock))
        await tg.start(partial(observer.consume, durable="bill", subject=ENERGY_REQUEST,
                               codec=ENERGY_CODEC, handler=on_energy))
        for n in range(12):
            request = RequestArrived(id=f"r{n}", arrival_s=clock.now_s(),
                                     prompt_tokens=200 + 50 * n, true_output_tokens=20 + n)
            inst = f"i{n % 2}"
            await observer.publish_durable(request_admitted(inst), RequestAdmitted(
                request=request, instance=inst, decided_s=clock.now_s()))
        with anyio.fail_after(30):
            while len(records) < 12:
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    for bus in [*buses, observer]:
        await bus.close()

    assert sorted(r.id for r in records) == sorted(f"r{n}" for n in range(12))
    assert all(r.energy_mj > 0 and r.source == "engine" for r in records)
    # The collector's own token-share attribution agreed with the engine's on every request.
    assert buses[-1].counters["attribution_mismatch"] == 0
    assert telemetry.ledger.attributed_mj > 0
    by_gpu: dict[str, list[GpuSample]] = {}
    for s in samples:
        by_gpu.setdefault(s.node, []).append(s)
    assert set(by_gpu) == {"i0", "i1"}
    for series in by_gpu.values():
        assert all(s.source == "twin" for s in series)
        energies = [s.energy_mj for s in series]
        assert energies == sorted(energies), "the energy counter never runs backwards"
        assert all(60.0 <= s.power_w <= 700.0 for s in series)
        assert all(345.0 <= s.sm_clock_mhz <= 1980.0 for s in series)

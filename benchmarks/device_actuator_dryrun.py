"""The actuator service against a real GPU in dry-run: real NVML reads, real supported clocks,
validation of every target, and the exact NVML calls it would make, logged; nothing is set.

Starts an embedded nats-server and the actuator (`--gpu nvml --dry-run`), sends clock
targets (a supported clock, an unsupported one, a change, a reset, then silence until the
lease runs out), and prints what came back on `freq.applied` with the recorded calls.

    python benchmarks/device_actuator_dryrun.py --json runs/actuator_dryrun.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anyio
import msgspec

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import FREQ_CODEC, FreqApplied, FreqEvent, FreqTarget
from throttllem._gpu.nvml import NvmlBackend
from throttllem._gpu.remote import ThreadedGpu
from throttllem._runtime import Clock
from throttllem._services.actuator import ActuatorService
from throttllem._subjects import freq_applied, freq_target


async def main_async() -> dict[str, object]:
    backend = NvmlBackend(dry_run=True)
    gpu = ThreadedGpu(backend)
    supported = backend.supported_clocks_mhz(0)
    mid = supported[len(supported) // 2]
    low = supported[len(supported) // 4]
    applied: list[FreqApplied] = []
    with EmbeddedNatsServer() as server:
        bus = await Bus.connect(server.url, name="actuator")
        controller = await Bus.connect(server.url, name="controller")

        async def on_applied(event: FreqEvent) -> None:
            assert isinstance(event, FreqApplied)
            applied.append(event)

        await controller.subscribe(freq_applied("i0"), FREQ_CODEC, on_applied)
        actuator = ActuatorService(instance="i0", backend="nvml", dry_run=True, gpu=gpu,
                                   tick_s=0.1)
        clock = Clock(epoch_wall_s=time.time())
        async with anyio.create_task_group() as tg:
            await tg.start(actuator.run, bus, clock)
            for clock_mhz, lease_s in ((mid, 1.0), (mid + 1, 1.0), (low, 1.0), (None, 1.0),
                                       (low, 0.5)):
                await controller.publish(freq_target("i0"), FreqTarget(
                    instance="i0", clock_mhz=clock_mhz, lease_s=lease_s, decided_s=clock.now_s(),
                    reason="device check"))
                await anyio.sleep(0.3)
            await anyio.sleep(1.0)  # the last lease (0.5 s) runs out: reset to default
            tg.cancel_scope.cancel()
        await bus.close()
        await controller.close()
    reading = backend.read(0)
    backend.close()
    return {"gpu": reading.name, "supported": {"count": len(supported), "min": supported[0],
                                               "max": supported[-1]},
            "sm_clock_after_mhz": reading.sm_clock_mhz,
            "applied": [msgspec.to_builtins(a) for a in applied],
            "dry_run_calls": backend.dry_run_calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=Path("runs/actuator_dryrun.json"))
    args = parser.parse_args()
    result = anyio.run(main_async)
    print(f"{'clock (MHz)':>12}  {'dry-run':>7}  result")
    for a in result["applied"]:  # type: ignore[attr-defined]
        print(f"{a['clock_mhz']!s:>12}  {a['dry_run']!s:>7}  {a['error'] or 'applied'}")
    print("NVML calls (recorded, not made):")
    for call in result["dry_run_calls"]:  # type: ignore[attr-defined]
        print("  " + call)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Real-GPU check of the NVML telemetry path (read-only): run it on a machine with a GPU.

It starts an embedded nats-server and the telemetry service with `--gpu nvml`, puts the GPU
through idle and a bf16 matmul load (PyTorch, if present), and compares every `gpu.sample`
the service publishes with `nvidia-smi` read at the same moments. It also validates clock
targets against the card's real supported clocks in dry-run (no NVML setter is ever called).
Prints one table and writes JSON.

    python benchmarks/device_nvml_check.py --json runs/nvml_check.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._errors import ClockOutOfRangeError
from throttllem._events import GPU_CODEC, GpuSample
from throttllem._gpu.nvml import NvmlBackend, probe
from throttllem._runtime import run_service
from throttllem._services.telemetry import TelemetryService
from throttllem._subjects import GPU_SAMPLE_ALL

SMI_FIELDS = ("power.draw", "clocks.sm", "clocks.mem", "utilization.gpu", "temperature.gpu")
OURS = ("power_w", "sm_clock_mhz", "mem_clock_mhz", "gpu_util_pct", "temperature_c")


def smi_poller(stop: threading.Event, out: list[tuple[float, list[float]]],
               period_s: float) -> None:
    query = ["nvidia-smi", "--id=0", "--format=csv,noheader,nounits",
             f"--query-gpu={','.join(SMI_FIELDS)}"]
    while not stop.is_set():
        t0 = time.time()
        line = subprocess.run(query, capture_output=True, text=True, check=True).stdout
        t1 = time.time()
        out.append(((t0 + t1) / 2, [float(v) for v in line.strip().split(",")]))
        stop.wait(max(period_s - (time.time() - t0), 0.0))


def gpu_load(seconds: float) -> None:
    """A decode-like then compute-heavy bf16 load, if PyTorch with CUDA is available."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        time.sleep(seconds)
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(8192, 64, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(50):
            (a @ v if time.time() < end - seconds / 2 else a @ a)
        torch.cuda.synchronize()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    samples: list[GpuSample] = []
    smi: list[tuple[float, list[float]]] = []
    with EmbeddedNatsServer() as server:
        bus = await Bus.connect(server.url, name="check")

        async def on_sample(s: GpuSample) -> None:
            samples.append(s)

        await bus.subscribe(GPU_SAMPLE_ALL, GPU_CODEC, on_sample)
        service = TelemetryService(gpu="nvml", node="device", interval_s=args.interval)
        stop = threading.Event()
        poller = threading.Thread(target=smi_poller, args=(stop, smi, args.interval), daemon=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_service(service, nats_url=server.url))
            poller.start()
            await anyio.sleep(args.idle_s)
            await anyio.to_thread.run_sync(gpu_load, args.load_s)
            await anyio.sleep(args.idle_s)
            stop.set()
            tg.cancel_scope.cancel()
        poller.join()
        await bus.close()

    # Pair each service sample with the nvidia-smi reading closest in time.
    smi_t = [t for t, _ in smi]
    pairs = []
    for s in samples:
        j = min(range(len(smi_t)), key=lambda k: abs(smi_t[k] - s.now_s))
        if abs(smi_t[j] - s.now_s) <= args.interval / 2:
            pairs.append((s, smi[j][1]))
    rows = []
    for n, (ours, field) in enumerate(zip(OURS, SMI_FIELDS, strict=True)):
        diffs = [abs(getattr(s, ours) - vals[n]) for s, vals in pairs]
        rows.append({"metric": field, "pairs": len(diffs),
                     "mean_abs_diff": statistics.fmean(diffs) if diffs else float("nan"),
                     "median_abs_diff": statistics.median(diffs) if diffs else float("nan"),
                     "max_abs_diff": max(diffs) if diffs else float("nan"),
                     "ours_range": [min(getattr(s, ours) for s, _ in pairs),
                                    max(getattr(s, ours) for s, _ in pairs)] if pairs else []})
    # Energy counter vs the integral of the service's own power samples.
    energy = {}
    if len(samples) > 2:
        counter_j = (samples[-1].energy_mj - samples[0].energy_mj) / 1e3
        integral_j = sum((b.now_s - a.now_s) * (a.power_w + b.power_w) / 2
                         for a, b in itertools.pairwise(samples))
        energy = {"counter_j": counter_j, "power_integral_j": integral_j,
                  "relative_diff": (counter_j - integral_j) / counter_j if counter_j else None}
    # Dry-run clock validation against the real supported clocks.
    with NvmlBackend(dry_run=True) as gpu:
        clocks = gpu.supported_clocks_mhz(0)
        target = clocks[len(clocks) // 2]
        gpu.set_locked_clocks(0, target, target)
        gpu.reset_locked_clocks(0)
        refused = None
        try:
            gpu.set_locked_clocks(0, clocks[0] + 1, clocks[0] + 1)
        except ClockOutOfRangeError as e:
            refused = str(e)
        dry = {"calls": list(gpu.dry_run_calls), "refused_example": refused,
               "supported": {"count": len(clocks), "min": clocks[0], "max": clocks[-1]}}
    return {"probe": probe(0), "samples": len(samples), "smi_reads": len(smi), "pairs": rows,
            "energy": energy, "dry_run": dry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=Path("runs/nvml_check.json"))
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--load-s", type=float, default=10.0)
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        sys.exit("no nvidia-smi here: run this on a machine with an NVIDIA GPU")
    result = anyio.run(main_async, args)
    print(f"{'metric':<18}{'pairs':>6}{'mean |diff|':>13}{'max |diff|':>12}  range (ours)")
    for row in result["pairs"]:  # type: ignore[attr-defined]
        print(f"{row['metric']:<18}{row['pairs']:>6}{row['mean_abs_diff']:>13.2f}"
              f"{row['max_abs_diff']:>12.2f}  {row['ours_range']}")
    print("energy:", result["energy"])
    print("dry-run:", json.dumps(result["dry_run"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()

"""On a GPU machine: the live system serving a trace window on the real GPU engine, measured,
then the same window on the engine twin, side by side.

Run 1 (hardware): an embedded nats-server; the forecaster (`--policy default`: admit at
once, the card's own clocks); the GPU engine (`throttllem run engine --backend gpu`: the
Llama-3-8B-shaped random-weight decoder, every pass really run on the card, energy per pass
from the NVML energy counter); telemetry `--gpu nvml`; the actuator `--gpu nvml --dry-run`
(it logs the NVML calls it would make and makes none). Run 2 (twin): the same window, setup,
policy and services with the engine twin and its simulated GPU.

The table and the JSON say of every figure whether it was measured (with the GPU's name and
driver, read from NVML) or simulated. Measured energy is the card's energy counter over the
run (idle included, as the twin's is), and beside it the part the engine attributed to
requests by token share. Clocks, power limits and every other GPU setting are left alone.

    python3 benchmarks/device_demo_gpu.py --minutes 2 --out $OUT

Off a GPU, `--cpu-smoke` runs the same plumbing with the fake pass timer and no NVML (every
figure then says "not measured"); it is how this script is checked on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.report import ClockAccumulator, RunReport, format_table, summarize
from throttllem._core.slo import DEFAULT_SLO_CLASSES
from throttllem._demo import DemoOptions, _spawn, _stop, trace_requests
from throttllem._engines.gpu import ENERGY_MEASURED
from throttllem._events import (
    ENERGY_CODEC,
    ENGINE_CODEC,
    HEALTH_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    Heartbeat,
    RequestCompleted,
    RequestDeferred,
    RequestEnergy,
    RequestEvent,
)
from throttllem._gpu.remote import RemoteGpu
from throttllem._runtime import Clock
from throttllem._services.replayer import replay
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import (
    ENERGY_REQUEST,
    ENGINE_ITERATION_ALL,
    HEALTH_ALL,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    twin_gpu,
)

INSTANCE = "i0"


def say(msg: str) -> None:
    print(f"[demo-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Run(msgspec.Struct, kw_only=True):
    """One run's report and what else it measured or simulated."""

    report: RunReport
    label: str
    measured: bool
    energy_note: str
    attributed_energy_j: float | None = None
    # Per request (measured runs): how many carry energy, and its p50 / p99 in J.
    request_energy_j: dict[str, float] = {}
    # The collector's durable `energy.request` records of this run, by attribution source.
    energy_records: dict[str, int] = {}
    passes: int = 0
    engine: dict[str, Any] = {}


async def serve_window(args: argparse.Namespace, *, engine: str, nats_url: str,
                       log_dir: Path) -> Run:
    """Start the services for one run, replay the window, collect, stop."""
    hardware = engine == "gpu"
    opts = DemoOptions(trace=args.trace, minutes=args.minutes, start_minute=args.start_minute,
                       instances=1, seed=args.seed, setup=args.setup)
    requests = list(trace_requests(opts, offset_s=0.0, run_tag=f"{engine}-"))
    if not requests:
        raise SystemExit("the trace window holds no requests")
    clock = Clock(epoch_wall_s=time.time(), speed=1.0 if hardware else args.twin_speed)
    record = log_dir / f"engine-{engine}.jsonl"
    procs: list[subprocess.Popen[bytes]] = []
    bus = await Bus.connect(nats_url, name=f"demo-{engine}")
    try:
        await bus.ensure_request_stream()
        ready: dict[str, set[str]] = {}

        async def on_health(beat: Heartbeat) -> None:
            ready.setdefault(beat.service, set()).add(beat.instance_id)

        await bus.subscribe(HEALTH_ALL, HEALTH_CODEC, on_health)
        nvml = hardware and not args.cpu_smoke
        if hardware:
            runner = (["--device", "cpu", "--runner", "fake"] if args.cpu_smoke
                      else ["--device", args.device])
            engine_args = ["engine", "--backend", "gpu", "--instance", INSTANCE,
                           "--setup", args.setup, "--record", str(record), *runner]
        else:
            engine_args = ["engine", "--backend", "twin", "--instance", INSTANCE,
                           "--setup", args.setup]
        procs.append(_spawn(engine_args, log_dir / f"engine-{engine}.log", clock, nats_url))
        procs.append(_spawn(["forecaster", "--instances", INSTANCE, "--policy", "default",
                             "--setup", args.setup], log_dir / f"forecaster-{engine}.log",
                            clock, nats_url))
        expected = {"engine": 1, "forecaster": 1}
        gpu_kind = "nvml" if nvml else ("twin" if not hardware else None)
        if gpu_kind is not None:
            telemetry = ["telemetry", "--gpu", gpu_kind]
            actuator = ["actuator", "--instance", INSTANCE, "--gpu", gpu_kind]
            if gpu_kind == "twin":
                telemetry += ["--instances", INSTANCE]
            else:
                actuator += ["--dry-run"]  # the card's clocks are never changed
            procs.append(_spawn(telemetry, log_dir / f"telemetry-{engine}.log", clock,
                                nats_url))
            procs.append(_spawn(actuator, log_dir / f"actuator-{engine}.log", clock, nats_url))
            expected |= {"telemetry": 1, "actuator": 1}
        say(f"{engine}: starting {', '.join(expected)} (logs in {log_dir})")
        with anyio.move_on_after(args.startup_timeout_s):
            while any(len(ready.get(s, ())) < n for s, n in expected.items()):
                for proc in procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"a service exited at start-up: {proc.args!r}; see "
                                         f"{log_dir}")
                await anyio.sleep(0.2)
        missing = [s for s, n in expected.items() if len(ready.get(s, ())) < n]
        if missing:
            raise SystemExit(f"{engine}: not ready after {args.startup_timeout_s} s: {missing}")
        header = next((r for r in read_records(record) if r["kind"] == "engine"), {})
        measured = hardware and header.get("energy_source") == ENERGY_MEASURED

        offset_s = clock.now_s() + 0.5
        requests = [msgspec.structs.replace(r, arrival_s=r.arrival_s + offset_s)
                    for r in requests]
        end_s = requests[-1].arrival_s
        completions: list[RequestCompleted] = []
        rejected: dict[str, str] = {}
        clocks = ClockAccumulator()

        async def on_completed(event: RequestEvent) -> None:
            if isinstance(event, RequestCompleted) and event.instance == INSTANCE:
                completions.append(event)

        async def on_deferred(event: RequestEvent) -> None:
            if isinstance(event, RequestDeferred) and event.final:
                rejected[event.id] = event.reason

        async def on_iteration(it: EngineIteration) -> None:
            clocks.add(it)

        await bus.subscribe(REQUEST_COMPLETED, REQUEST_CODEC, on_completed)
        await bus.subscribe(REQUEST_DEFERRED, REQUEST_CODEC, on_deferred)
        await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, on_iteration)
        energy_mj = await energy_reader(bus, hardware=hardware, measured=measured,
                                        header=header)
        e0 = await energy_mj()
        say(f"{engine}: replaying {len(requests)} requests over {end_s - offset_s:.0f} s")
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(replay, bus, clock, requests))
            with anyio.move_on_after((end_s - clock.now_s()) / clock.speed
                                     + args.drain_timeout_s):
                last = time.monotonic()
                while len(completions) + len(rejected) < len(requests):
                    await anyio.sleep(0.2)
                    if time.monotonic() - last > 15:
                        last = time.monotonic()
                        say(f"{engine}: {len(completions)}/{len(requests)} done, "
                            f"t={clock.now_s() - offset_s:.0f}/{end_s - offset_s:.0f} s")
            tg.cancel_scope.cancel()
        await anyio.sleep(0.3)  # let the engines account energy up to now
        e1 = await energy_mj()
        duration_s = clock.now_s() - offset_s
        # The telemetry collector's durable per-request records (billing's view).
        await anyio.sleep(1.0)
        ids = {r.id for r in requests}
        records_by_source: dict[str, int] = {}
        for rec in await bus.history(ENERGY_REQUEST, ENERGY_CODEC):
            if isinstance(rec, RequestEnergy) and rec.id in ids:
                records_by_source[rec.source] = records_by_source.get(rec.source, 0) + 1
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()
        _stop(procs)

    energy_j = (e1 - e0) / 1e3 if math.isfinite(e0) and math.isfinite(e1) else math.nan
    attributed = None
    per_request: dict[str, float] = {}
    if measured:
        attributed = sum(c.energy_mj or 0.0 for c in completions) / 1e3
        joules = sorted(c.energy_mj / 1e3 for c in completions if c.energy_mj is not None)
        if joules:
            per_request = {"requests": float(len(joules)),
                           "p50": joules[len(joules) // 2],
                           "p99": joules[min(len(joules) - 1, int(0.99 * len(joules)))]}
    gpu = header.get("gpu") or {}
    if measured:
        source = (f"nvml (measured: {gpu.get('name', '?')}, driver "
                  f"{gpu.get('driver_version', '?')})")
        label = f"default on {gpu.get('name', 'the GPU')} (measured)"
        note = "the card's NVML energy counter over the run, idle included"
    elif hardware:
        source = "not measured (no NVML)"
        label = "default on the GPU engine (not measured)"
        note = "no energy counter: not measured"
    else:
        source = "twin (simulated)"
        label = "default on the twin (simulated)"
        note = "the twin GPU's simulated energy counter over the run, idle included"
    # On the GPU engine every pass really runs and the engine's clock is the wall clock, so
    # its TTFT/TBT/E2E are measured (engine-side: from arrival at the engine to each token).
    latency = ("measured (GPU engine: real passes, wall clock)" if hardware
               else "twin (simulated)")
    report = summarize(completions, policy=label, submitted=len(requests),
                       energy_j=energy_j if (measured or not hardware) else math.nan,
                       clocks=clocks, duration_s=duration_s, rejected=len(rejected),
                       slo_classes=DEFAULT_SLO_CLASSES, energy_source=source,
                       latency_source=latency)
    passes = sum(1 for r in read_records(record) if r["kind"] == "pass")
    return Run(report=report, label=label, measured=measured, energy_note=note,
               attributed_energy_j=attributed, request_energy_j=per_request,
               energy_records=records_by_source,
               passes=passes or clocks.iterations,
               engine=header)


async def energy_reader(bus: Bus, *, hardware: bool, measured: bool,
                        header: Mapping[str, Any]) -> Any:
    """A function reading the run's energy counter (mJ): the card's (NVML, read-only), the
    twin GPU's, or NaN where nothing measures it."""
    if hardware and measured:
        from throttllem._gpu.nvml import NvmlBackend  # noqa: PLC0415

        nvml = NvmlBackend(dry_run=True)
        index = int(header.get("nvml_index", 0))

        async def read_nvml() -> float:
            return await anyio.to_thread.run_sync(nvml.energy_mj, index)

        return read_nvml
    if hardware:
        async def nothing() -> float:
            return math.nan

        return nothing
    gpu = RemoteGpu(bus, twin_gpu(INSTANCE))

    async def read_twin() -> float:
        return sum([(await gpu.read(i)).energy_mj for i in range(await gpu.gpu_count())])

    return read_twin


def comparison(hw: Run, twin: Run) -> dict[str, float | None]:
    """Twin over hardware, figure by figure (1.0: the twin matches the measurement)."""
    a, b = hw.report, twin.report

    def ratio(x: float, y: float) -> float | None:
        return y / x if x and math.isfinite(x) and math.isfinite(y) else None

    return {"energy_j": ratio(a.energy_j, b.energy_j),
            "j_per_token": ratio(a.j_per_token, b.j_per_token),
            "ttft_p50_ms": ratio(a.ttft_ms.p50, b.ttft_ms.p50),
            "ttft_p99_ms": ratio(a.ttft_ms.p99, b.ttft_ms.p99),
            "tbt_p50_ms": ratio(a.tbt_ms.p50, b.tbt_ms.p50),
            "tbt_p99_ms": ratio(a.tbt_ms.p99, b.tbt_ms.p99),
            "e2e_p50_ms": ratio(a.e2e_ms.p50, b.e2e_ms.p50),
            "e2e_p99_ms": ratio(a.e2e_ms.p99, b.e2e_ms.p99),
            "mean_batch": ratio(a.mean_batch, b.mean_batch)}


def finite(value: Any) -> Any:
    """JSON has no NaN: a figure not known is null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def run_json(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = finite({
        **msgspec.to_builtins(run.report), "label": run.label, "measured": run.measured,
        "energy_note": run.energy_note, "attributed_energy_j": run.attributed_energy_j,
        "request_energy_j": run.request_energy_j, "energy_records": run.energy_records,
        "passes": run.passes,
        "engine": msgspec.to_builtins(run.engine)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo-gpu"),
                   help="folder for the JSON, the table and logs.tar.gz (the services' logs "
                        "and the engine's per-pass records)")
    p.add_argument("--trace", default="conv")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder holding azure-llm-2023/ (sets THROTTLLEM_DATA_DIR)")
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--start-minute", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setup", default=DEFAULT_SETUP)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--skip-twin", action="store_true", help="the hardware run only")
    p.add_argument("--startup-timeout-s", type=float, default=300.0,
                   help="the GPU engine loads its decoder and captures CUDA graphs first")
    p.add_argument("--drain-timeout-s", type=float, default=90.0)
    p.add_argument("--twin-speed", type=float, default=1.0,
                   help="event seconds per wall second of the twin run (its figures are in "
                        "event time; the hardware run is always real time)")
    p.add_argument("--wall-budget-s", type=float, default=560.0,
                   help="skip the twin run when it would not end within this many seconds "
                        "of the start (a device command is stopped at 600 s)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: the fake pass timer, no NVML (nothing is measured)")
    args = p.parse_args()
    if args.data_dir is not None:
        os.environ["THROTTLLEM_DATA_DIR"] = str(args.data_dir.resolve())
    started = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    say("SM clocks, power limits and every GPU setting stay the card's own: NVML is only "
        "read, and the actuator runs in dry-run")
    runs: dict[str, Run] = {}
    # The services' logs and the engine's records travel back as one archive.
    with tempfile.TemporaryDirectory(prefix="demo-gpu-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        try:
            with EmbeddedNatsServer() as server:
                runs["hardware"] = anyio.run(partial(serve_window, args, engine="gpu",
                                                     nats_url=server.url, log_dir=logs))
                (out / "demo_gpu.json").write_text(json.dumps(
                    {"hardware": run_json(runs["hardware"])}, indent=1) + "\n")
                left_s = args.wall_budget_s - (time.monotonic() - started)
                need_s = args.minutes * 60.0 / args.twin_speed + 60.0
                if args.skip_twin:
                    pass
                elif need_s > left_s:
                    say(f"twin run skipped: it needs ~{need_s:.0f} s, {left_s:.0f} s of the "
                        "wall budget are left (it needs no GPU: run this script with "
                        "--cpu-smoke elsewhere for the twin column)")
                else:
                    runs["twin"] = anyio.run(partial(serve_window, args, engine="twin",
                                                     nats_url=server.url, log_dir=logs))
        finally:
            with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
                tar.add(logs, arcname="logs")
    table = format_table([r.report for r in runs.values()])
    lines = [table]
    hw = runs["hardware"]
    for run in runs.values():
        extra = ""
        if run.attributed_energy_j is not None:
            extra = (f"; {run.attributed_energy_j:,.0f} J of it attributed to requests by "
                     f"token share ({run.request_energy_j.get('requests', 0):.0f} requests "
                     f"with measured energy, p50 {run.request_energy_j.get('p50', math.nan):.1f}"
                     f" J, p99 {run.request_energy_j.get('p99', math.nan):.1f} J)")
        lines.append(f"{run.label}: energy = {run.energy_note}{extra}; {run.passes} passes")
    gpu = hw.engine.get("gpu") or {}
    document: dict[str, Any] = {
        "gpu": {"name": gpu.get("name"), "driver_version": gpu.get("driver_version"),
                "clocks": "the card's own: never set (NVML read-only, actuator dry-run)"}
        if hw.measured else None,
        "hardware": run_json(hw), "options": {k: str(v) for k, v in vars(args).items()}}
    if "twin" in runs:
        ratios = comparison(hw, runs["twin"])
        document["twin"] = run_json(runs["twin"])
        document["twin_over_hardware"] = ratios
        lines.append("twin / hardware: " + ", ".join(
            f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))
    text = "\n".join(lines)
    print(text)
    (out / "demo_gpu.txt").write_text(text + "\n", encoding="utf-8")
    (out / "demo_gpu.json").write_text(json.dumps(document, indent=1) + "\n")
    say(f"wrote {out / 'demo_gpu.json'} and {out / 'demo_gpu.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Length-predictor service latency over loopback NATS, at a fixed open-loop request rate.

Starts an embedded nats-server and the service as its own process (`throttllem run
length-predictor`), then sends request/reply predictions at --rate requests/s for --seconds
(each request in its own task, so a slow reply never slows the sender) and reports latency
percentiles as seen by the caller (from the moment its request is sent to the moment its reply
is decoded). Prints one table and writes JSON.

Requests carry real prompts: the AlpacaEval instructions (--data, read at run time from the
data folder), in a seeded random order, each with its token count (the model's token rule)
and, for --oracle, the true length of that file's answer. The table also says how far the
sender fell behind its schedule (if it did, the rate was not really offered) and the service's
own batching figures from its heartbeat.

    python benchmarks/bench_length_service.py --rate 1000 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import anyio
import numpy as np

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._data import data_file
from throttllem._errors import MalformedEventError
from throttllem._events import (
    HEALTH_CODEC,
    REQUEST_CODEC,
    Heartbeat,
    RequestArrived,
    RequestPredicted,
    encode,
)
from throttllem._length.tokens import count_tokens
from throttllem._subjects import PREDICT_RPC, health

DEFAULT_DATA = "alpaca-eval-outputs/Meta-Llama-3-8B-Instruct.json"


def load_prompts(path: Path) -> list[tuple[str, int, int]]:
    """(instruction, its tokens, the answer's tokens) per row of an AlpacaEval file."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [(r["instruction"], max(count_tokens(r["instruction"]), 1),
             max(count_tokens(r["output"]), 1)) for r in rows]


def make_payloads(prompts: list[tuple[str, int, int]], n: int, seed: int) -> list[bytes]:
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    out = []
    for k in range(n):
        text, prompt_tokens, output_tokens = prompts[order[k % len(order)]]
        out.append(encode(RequestArrived(id=f"b{k}", arrival_s=0.0, prompt_tokens=prompt_tokens,
                                         prompt_text=text, true_output_tokens=output_tokens)))
    return out


async def run(args: argparse.Namespace, url: str) -> dict[str, object]:
    bus = await Bus.connect(url, name="bench")
    prompts = load_prompts(args.data)
    payloads = make_payloads(prompts, int(args.rate * args.seconds), args.seed)
    beats: list[Heartbeat] = []

    async def on_beat(beat: Heartbeat) -> None:
        beats.append(beat)

    await bus.subscribe(health("length-predictor"), HEALTH_CODEC, on_beat)
    # Warm-up: wait for the service and let the model load.
    with anyio.fail_after(60):
        while True:
            try:
                await bus.nc.request(PREDICT_RPC, payloads[0], timeout=1)
                break
            except Exception:  # not up yet
                await anyio.sleep(0.2)
    for p in make_payloads(prompts, 200, args.seed + 1):
        await bus.nc.request(PREDICT_RPC, p, timeout=5)
    latencies_ms: list[float] = []
    lag_ms: list[float] = []
    failures = 0

    async def one(payload: bytes, due: float) -> None:
        nonlocal failures
        t0 = time.perf_counter()
        lag_ms.append((t0 - due) * 1e3)
        try:
            msg = await bus.nc.request(PREDICT_RPC, payload, timeout=5)
            ok = isinstance(REQUEST_CODEC.decode(msg.data), RequestPredicted)
        except MalformedEventError:  # an rpc.error reply
            ok = False
        except Exception:  # a timeout: counted, no latency
            failures += 1
            return
        latencies_ms.append((time.perf_counter() - t0) * 1e3)
        failures += not ok

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n, payload in enumerate(payloads):
            due = start + n / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(one, payload, due)
    sent_s = time.perf_counter() - start
    await anyio.sleep(2.5)  # one more heartbeat, with the run's batching figures
    await bus.close()
    lat = np.asarray(latencies_ms)
    lag = np.asarray(lag_ms)
    sizes = np.asarray([len(p) for p in payloads])
    metrics = beats[-1].metrics if beats else {}
    return {"rate_target": args.rate, "rate_achieved": len(payloads) / sent_s,
            "requests": len(payloads), "failures": failures,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "send_lag_p50_ms": float(np.percentile(lag, 50)),
            "send_lag_p99_ms": float(np.percentile(lag, 99)),
            "mode": f"oracle {args.oracle}" if args.oracle else "onnx model",
            "prompts": {"file": str(args.data), "distinct": len(prompts),
                        "request_bytes_p50": float(np.percentile(sizes, 50)),
                        "request_bytes_max": int(sizes.max())},
            "service_mean_batch": metrics.get("mean_batch"),
            "service_max_batch": metrics.get("max_batch"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--oracle", default=None, help="benchmark the oracle instead")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"AlpacaEval-style file of prompts (default: {DEFAULT_DATA} in the "
                             "data folder)")
    parser.add_argument("--seed", type=int, default=0, help="order of the prompts")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_length_service.json"))
    args = parser.parse_args()
    args.data = args.data or data_file(DEFAULT_DATA)
    with EmbeddedNatsServer() as server:
        cmd = [sys.executable, "-m", "throttllem", "run", "length-predictor", "--nats",
               server.url, "--log-level", "warning"]
        if args.oracle:
            cmd += ["--oracle", args.oracle]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            result = anyio.run(run, args, server.url)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"prompts: {len(load_prompts(args.data))} from {args.data.name}, "
          f"service batches: mean {result['service_mean_batch'] or 0:.2f}, "
          f"max {result['service_max_batch'] or 0:.0f}; "
          f"sender lag p99 {result['send_lag_p99_ms']:.2f} ms")
    print(f"{'mode':<12}{'rate (req/s)':>14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'failed':>8}")
    print(f"{result['mode']:<12}{result['rate_achieved']:>14.0f}{result['p50_ms']:>9.2f}"
          f"{result['p90_ms']:>9.2f}{result['p99_ms']:>9.2f}{result['max_ms']:>9.2f}"
          f"{result['failures']:>8}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

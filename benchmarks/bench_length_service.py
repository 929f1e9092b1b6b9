"""Length-predictor service latency over loopback NATS, at a fixed open-loop request rate.

Starts an embedded nats-server and the service as its own process (`throttllem run
length-predictor`), then sends request/reply predictions at --rate requests/s for --seconds
(each request in its own task, so a slow reply never slows the sender) and reports latency
percentiles as seen by the caller. Prints one table and writes JSON.

    python benchmarks/bench_length_service.py --rate 1000 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import numpy as np

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._errors import MalformedEventError
from throttllem._events import REQUEST_CODEC, RequestArrived, RequestPredicted, encode
from throttllem._subjects import PREDICT_RPC

PROMPTS = [
    "Write a detailed essay on the history of the Roman Empire.",
    "What is 2+2?",
    "Give me a haiku about autumn.",
    "Explain how a transformer language model generates text.",
    "Translate 'good morning' into French, Spanish and German.",
]


async def run(args: argparse.Namespace, url: str) -> dict[str, object]:
    bus = await Bus.connect(url, name="bench")
    payloads = [encode(RequestArrived(id=f"b{n}", arrival_s=0.0, prompt_tokens=12,
                                      prompt_text=PROMPTS[n % len(PROMPTS)],
                                      true_output_tokens=100 + n % 50))
                for n in range(int(args.rate * args.seconds))]
    # Warm-up: wait for the service and let the model load.
    with anyio.fail_after(60):
        while True:
            try:
                await bus.nc.request(PREDICT_RPC, payloads[0], timeout=1)
                break
            except Exception:  # not up yet
                await anyio.sleep(0.2)
    for p in payloads[:200]:
        await bus.nc.request(PREDICT_RPC, p, timeout=5)
    latencies_ms: list[float] = []
    failures = 0

    async def one(payload: bytes) -> None:
        nonlocal failures
        t0 = time.perf_counter()
        try:
            msg = await bus.nc.request(PREDICT_RPC, payload, timeout=5)
        except Exception:  # counted below
            failures += 1
            return
        latencies_ms.append((time.perf_counter() - t0) * 1e3)
        try:
            ok = isinstance(REQUEST_CODEC.decode(msg.data), RequestPredicted)
        except MalformedEventError:  # an rpc.error reply
            ok = False
        failures += not ok

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n, payload in enumerate(payloads):
            delay = start + n / args.rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(one, payload)
    sent_s = time.perf_counter() - start
    await bus.close()
    lat = np.asarray(latencies_ms)
    return {"rate_target": args.rate, "rate_achieved": len(payloads) / sent_s,
            "requests": len(payloads), "failures": failures,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "mode": "oracle" if args.oracle else "onnx model"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--oracle", default=None, help="benchmark the oracle instead")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_length_service.json"))
    args = parser.parse_args()
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
    print(f"{'mode':<12}{'rate (req/s)':>14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'failed':>8}")
    print(f"{result['mode']:<12}{result['rate_achieved']:>14.0f}{result['p50_ms']:>9.2f}"
          f"{result['p90_ms']:>9.2f}{result['p99_ms']:>9.2f}{result['max_ms']:>9.2f}"
          f"{result['failures']:>8}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

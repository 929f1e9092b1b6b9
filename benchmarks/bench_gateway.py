"""What the gateway path adds to time to first token, against calling vLLM directly, side by
side in one run.

Starts (unless given --vllm-url) a real vLLM OpenAI server on the tiny local model, an
embedded nats-server, the default-policy forecaster and the gateway, the last two as their
own processes (`throttllem run ...`), as deployed. Then, per concurrency level, it fires
bursts of that many concurrent streaming completions, alternating bursts straight to vLLM
and through the gateway so that both paths see the same engine state, and takes each
request's TTFT from the client's side (request sent → first event carrying text). The
gateway path includes everything it adds: the HTTP hop, prompt counting, the durable
`request.arrived`, the controller's admission over NATS and the proxying of the stream.

Prints one table (p50 and p99 per path and their difference) and writes JSON under runs/.
Short by default; the machine it runs on is shared.

    python benchmarks/bench_gateway.py --concurrency 1,64,256 --bursts 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import numpy as np

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import REQUEST_CODEC, RequestCompleted
from throttllem._subjects import REQUEST_COMPLETED

PROMPT = "the quick brown fox jumps over the lazy dog"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    sys.exit(f"{url} not healthy after {timeout_s} s")


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one_stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> float:
    """TTFT in ms of one streamed completion (read to its end)."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    ttft: float | None = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: "
                               f"{(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"text":""' not in line \
                    and '"choices":[]' not in line:
                ttft = (time.perf_counter() - start) * 1e3
    if ttft is None:
        raise RuntimeError(f"{url}: a stream without any text")
    return ttft


async def burst(client: httpx.AsyncClient, url: str, n: int, max_tokens: int) -> list[float]:
    out: list[float] = []

    async def run() -> None:
        out.append(await one_stream(client, url, max_tokens))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(run)
    return out


async def measure(direct: str, gateway: str, levels: list[int], bursts: int,
                  max_tokens: int) -> tuple[dict[int, dict[str, list[float]]],
                                            dict[int, tuple[float, float]]]:
    """TTFTs per level and path, and each level's wall-time window."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024,
                          keepalive_expiry=2.0)  # below the servers' 5 s keep-alive
    results: dict[int, dict[str, list[float]]] = {}
    windows: dict[int, tuple[float, float]] = {}
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await burst(client, direct, 4, max_tokens)  # warm both paths' connections
        await burst(client, gateway, 4, max_tokens)
        for level in levels:
            ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
            begin = time.time()
            for n in range(bursts * 10 if level == 1 else bursts):
                order = ("direct", "gateway") if n % 2 == 0 else ("gateway", "direct")
                for path in order:
                    url = direct if path == "direct" else gateway
                    ttft[path] += await burst(client, url, level, max_tokens)
            results[level] = ttft
            windows[level] = (begin, time.time())
    return results, windows


async def admission_waits(nats_url: str, windows: dict[int, tuple[float, float]]
                          ) -> dict[int, list[float]]:
    """Per level, how long each gateway request waited for the controller's admission
    (arrival at the gateway → admission received), from its `request.completed`."""
    bus = await Bus.connect(nats_url, name="bench-gateway")
    try:
        events = await bus.history(REQUEST_COMPLETED, REQUEST_CODEC)
    finally:
        await bus.close()
    waits: dict[int, list[float]] = {level: [] for level in windows}
    for event in events:
        if not isinstance(event, RequestCompleted):
            continue
        for level, (begin, end) in windows.items():
            if begin <= event.arrival_s <= end:
                waits[level].append((event.admitted_s - event.arrival_s) * 1e3)
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,64,256",
                        help="comma-separated numbers of concurrent streams")
    parser.add_argument("--bursts", type=int, default=3,
                        help="bursts per path and level (level 1: x10)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--vllm-url", default=None,
                        help="a running vLLM serving the tiny model as `tiny` (default: start "
                             "one on a freshly written tiny model)")
    parser.add_argument("--model", type=Path, default=None,
                        help="that model's folder (default: write the tiny model)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    levels = [int(v) for v in args.concurrency.split(",") if v.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    model = args.model
    if model is None:
        from throttllem._engines.vllm.tiny_model import write_tiny_model  # noqa: PLC0415

        model = work / "tiny"
        write_tiny_model(model)
    exe = Path(sys.executable).parent / "throttllem"
    with contextlib.ExitStack() as stack:
        vllm_url = args.vllm_url
        if vllm_url is None:
            port = free_port()
            vllm_url = f"http://127.0.0.1:{port}"
            proc = stack.enter_context(process(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(model), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port",
                 str(port), "--max-model-len", "1024", "--disable-log-stats"],
                work / "vllm.log", {"VLLM_CPU_KVCACHE_SPACE": "1"}))
            print("starting vLLM (about a minute or two on a small CPU)...", flush=True)
            wait_healthy(f"{vllm_url}/health", proc, work / "vllm.log", 600)
        nats = stack.enter_context(EmbeddedNatsServer(store_dir=work / "nats"))
        stack.enter_context(process(
            [str(exe), "run", "forecaster", "--policy", "default", "--instances", "i0",
             "--nats", nats.url, "--log-level", "warning"], work / "forecaster.log"))
        gw_port = free_port()
        gw = stack.enter_context(process(
            [str(exe), "run", "gateway", "--model", str(model), "--served-model-name", "tiny",
             "--max-model-len", "1024", "--instance", f"i0={vllm_url}", "--host",
             "127.0.0.1", "--port", str(gw_port), "--nats", nats.url, "--log-level",
             "warning"], work / "gateway.log"))
        wait_healthy(f"http://127.0.0.1:{gw_port}/health", gw, work / "gateway.log", 60)
        time.sleep(1.0)  # the forecaster subscribes after its own start-up
        started = time.time()
        results, windows = anyio.run(measure, f"{vllm_url}/v1/completions",
                                     f"http://127.0.0.1:{gw_port}/v1/completions",
                                     levels, args.bursts, args.max_tokens)
        elapsed = time.time() - started
        time.sleep(1.0)  # the last completions are published after their streams end
        waits = anyio.run(admission_waits, nats.url, windows)

    rows = []
    print(f"\nTTFT, client side, ms ({args.max_tokens} tokens per stream, vLLM CPU, tiny "
          f"model, {os.cpu_count()} CPUs); overhead = gateway − direct")
    print(f"{'streams':>7} {'n':>5} | {'direct p50':>10} {'p99':>8} | {'gateway p50':>11} "
          f"{'p99':>8} | {'overhead p50':>12} {'p99':>8} | {'admission p50':>13} {'p99':>8}")
    for level, ttft in results.items():
        d = np.array(ttft["direct"])
        g = np.array(ttft["gateway"])
        row = {"streams": level, "n": len(d),
               "direct_p50_ms": float(np.nanpercentile(d, 50)),
               "direct_p99_ms": float(np.nanpercentile(d, 99)),
               "gateway_p50_ms": float(np.nanpercentile(g, 50)),
               "gateway_p99_ms": float(np.nanpercentile(g, 99))}
        row["overhead_p50_ms"] = row["gateway_p50_ms"] - row["direct_p50_ms"]
        row["overhead_p99_ms"] = row["gateway_p99_ms"] - row["direct_p99_ms"]
        w = np.array(waits[level]) if waits[level] else np.array([np.nan])
        row["admission_wait_p50_ms"] = float(np.nanpercentile(w, 50))
        row["admission_wait_p99_ms"] = float(np.nanpercentile(w, 99))
        row["admission_waits_seen"] = len(waits[level])
        rows.append(row)
        print(f"{level:>7} {len(d):>5} | {row['direct_p50_ms']:>10.2f} "
              f"{row['direct_p99_ms']:>8.2f} | {row['gateway_p50_ms']:>11.2f} "
              f"{row['gateway_p99_ms']:>8.2f} | {row['overhead_p50_ms']:>12.2f} "
              f"{row['overhead_p99_ms']:>8.2f} | {row['admission_wait_p50_ms']:>13.2f} "
              f"{row['admission_wait_p99_ms']:>8.2f}")
    print("admission: the part of the gateway's TTFT spent waiting for the controller "
          "(request.arrived → request.admitted over NATS), from request.completed")
    out = args.json or Path("runs") / f"bench_gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "gateway_ttft_overhead", "rows": rows, "max_tokens": args.max_tokens,
        "bursts": args.bursts, "seconds": elapsed, "cpus": os.cpu_count(),
        "python": platform.python_version(), "machine": platform.machine(),
        "raw_ms": {str(k): v for k, v in results.items()}}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

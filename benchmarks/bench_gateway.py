"""What the gateway path adds to a request, against calling the upstream directly, side by
side in one run.

Upstreams (`--upstream`):
- `stub` (default): `benchmarks/stub_upstream.py`, a minimal OpenAI-compatible server that
  streams `--tokens` tokens `--token-interval-ms` apart and stamps each event with the
  instant it was written, so the engine costs nothing and what remains is the gateway's own
  work: per request (time to first token) and per token (stub → client delivery).
- `vllm`: a real vLLM OpenAI server (CPU build) on the tiny local model (or `--vllm-url`).

The gateway and the default-policy forecaster run as their own processes (`throttllem run
...`) on an embedded nats-server, as deployed. Per concurrency level, N closed-loop clients
(each sends its next request when its last one ends) run one phase straight to the upstream
and one through the gateway, `--rounds` times in alternating order, so that both paths see
the same load. Client-side times: TTFT = request sent → first event carrying text; per token
= the event's write instant at the stub → its arrival at the client. The gateway path
includes everything it adds: the HTTP hop, prompt counting, the durable `request.arrived`,
the controller's admission over NATS (reported apart, as "admission", from each
`request.completed`) and the relaying of the stream.

Prints one table and writes JSON (`--json`, default under runs/). `--profile DIR` runs the
gateway under cProfile and writes DIR/gateway.prof. Short by default; the machine it runs
on may be shared, so compare the two paths of one run, not runs with each other.

    python benchmarks/bench_gateway.py --upstream stub --concurrency 1,64,256
    python benchmarks/bench_gateway.py --upstream vllm --concurrency 1,64 --requests 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import numpy as np

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import REQUEST_CODEC, RequestCompleted
from throttllem._subjects import REQUEST_COMPLETED

PROMPT = "the quick brown fox jumps over the lazy dog"
HERE = Path(__file__).resolve().parent
_STAMP = re.compile(rb'"t":(\d+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args!r} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
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


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class PathTimes:
    """What the clients measured on one path at one level."""

    ttft_ms: list[float] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)  # stub write → client, per token
    gap_ms: list[float] = field(default_factory=list)  # between consecutive tokens
    windows: list[tuple[float, float]] = field(default_factory=list)  # wall time of phases
    requests: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # per watched process, in phases


async def one_stream(client: httpx.AsyncClient, url: str, max_tokens: int,
                     times: PathTimes) -> None:
    """One streamed completion, read to its end."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    last: float | None = None
    buffer = b""
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: "
                               f"{(await response.aread())[:300]!r}")
        async for chunk in response.aiter_raw():
            now = time.perf_counter()
            now_ns = time.monotonic_ns()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {") or b'"choices":[]' in event \
                        or b'"text":""' in event:
                    continue
                if last is None:
                    times.ttft_ms.append((now - start) * 1e3)
                else:
                    times.gap_ms.append((now - last) * 1e3)
                last = now
                stamp = _STAMP.search(event)
                if stamp:
                    times.token_ms.append((now_ns - int(stamp[1])) / 1e6)
    if last is None:
        raise RuntimeError(f"{url}: a stream without any text")


async def phase(client: httpx.AsyncClient, url: str, streams: int, per_client: int, *,
                max_tokens: int, times: PathTimes, watched: dict[str, int]) -> None:
    """`streams` closed-loop clients, `per_client` requests each; the CPU time each watched
    process used meanwhile."""
    async def run() -> None:
        for _ in range(per_client):
            await one_stream(client, url, max_tokens, times)

    cpu_before = {name: cpu_s(pid) for name, pid in watched.items()}
    begin = time.time()
    async with anyio.create_task_group() as tg:
        for _ in range(streams):
            tg.start_soon(run)
    times.windows.append((begin, time.time()))
    times.requests += streams * per_client
    for name, pid in watched.items():
        times.cpu_s[name] = times.cpu_s.get(name, 0.0) + cpu_s(pid) - cpu_before[name]


def requests_per_client(streams: int, total: int) -> int:
    return max(1, -(-total // streams))


@dataclass(frozen=True)
class Plan:
    levels: list[int]
    rounds: int
    requests: int  # per path, level and round
    max_tokens: int
    watched: dict[str, int]  # process name -> pid, whose CPU time is measured


async def measure(direct: str, gateway: str, plan: Plan) -> dict[int, dict[str, PathTimes]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=4096,
                          keepalive_expiry=2.0)  # below the servers' keep-alive
    results: dict[int, dict[str, PathTimes]] = {}
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        for url in (direct, gateway):  # warm both paths
            await phase(client, url, 4, 2, max_tokens=plan.max_tokens, times=PathTimes(),
                        watched={})
        for level in plan.levels:
            total = plan.requests if level > 1 else max(1, plan.requests // 10)
            per_client = requests_per_client(level, total)
            times = {"direct": PathTimes(), "gateway": PathTimes()}
            for n in range(plan.rounds):
                order = ("direct", "gateway") if n % 2 == 0 else ("gateway", "direct")
                for path in order:
                    await phase(client, direct if path == "direct" else gateway, level,
                                per_client, max_tokens=plan.max_tokens, times=times[path],
                                watched=plan.watched)
            results[level] = times
    return results


async def admission_waits(nats_url: str, windows: dict[int, list[tuple[float, float]]]
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
        for level, spans in windows.items():
            if any(begin <= event.arrival_s <= end for begin, end in spans):
                waits[level].append((event.admitted_s - event.arrival_s) * 1e3)
    return waits


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 and np.isfinite(a) and np.isfinite(b) else None


def summarize(level: int, times: dict[str, PathTimes], waits: list[float]) -> dict[str, object]:
    d, g = times["direct"], times["gateway"]
    row: dict[str, object] = {"streams": level, "requests_per_path": len(d.ttft_ms)}
    for name, key in (("ttft", "ttft_ms"), ("token", "token_ms"), ("gap", "gap_ms")):
        for q in (50, 99):
            dv, gv = pct(getattr(d, key), q), pct(getattr(g, key), q)
            row[f"{name}_direct_p{q}_ms"] = dv
            row[f"{name}_gateway_p{q}_ms"] = gv
            row[f"{name}_added_p{q}_ms"] = gv - dv
            row[f"{name}_ratio_p{q}"] = ratio(gv, dv)
    # CPU per request while the gateway phases ran (the direct phases: what the watched
    # processes use with no gateway traffic, about nothing).
    for name in g.cpu_s:
        row[f"{name}_cpu_ms_per_request"] = (
            (g.cpu_s[name] - d.cpu_s.get(name, 0.0) * g.requests / max(d.requests, 1))
            / max(g.requests, 1) * 1e3)
    row["admission_p50_ms"] = pct(waits, 50)
    row["admission_p99_ms"] = pct(waits, 99)
    row["admission_seen"] = len(waits)
    return row


def print_table(rows: list[dict[str, object]], title: str, token: str) -> None:
    """`token`: the per-token figure shown, `token` (stub: write → client) or `gap`
    (between consecutive tokens at the client: what an engine's stream shows)."""
    print(f"\n{title}")
    print(f"{'streams':>7} {'n':>5} | {'TTFT direct p50/p99':>19} | {'gateway p50/p99':>16} | "
          f"{'added p50/p99':>14} | {token + ' direct p50/p99':>20} | {'added p50/p99':>14} | "
          f"{'admission p50/p99':>17}")

    def f(row: dict[str, object], a: str, b: str, width: int) -> str:
        return f"{float(row[a]):.2f} / {float(row[b]):.2f}".rjust(width)  # type: ignore[arg-type]

    for r in rows:
        print(f"{r['streams']:>7} {r['requests_per_path']:>5} | "
              f"{f(r, 'ttft_direct_p50_ms', 'ttft_direct_p99_ms', 19)} | "
              f"{f(r, 'ttft_gateway_p50_ms', 'ttft_gateway_p99_ms', 16)} | "
              f"{f(r, 'ttft_added_p50_ms', 'ttft_added_p99_ms', 14)} | "
              f"{f(r, f'{token}_direct_p50_ms', f'{token}_direct_p99_ms', 20)} | "
              f"{f(r, f'{token}_added_p50_ms', f'{token}_added_p99_ms', 14)} | "
              f"{f(r, 'admission_p50_ms', 'admission_p99_ms', 17)}")
    print("CPU per request through the gateway, ms:  " + "; ".join(
        f"{r['streams']} streams: gateway {r.get('gateway_cpu_ms_per_request', 0):.2f}, "
        f"forecaster {r.get('forecaster_cpu_ms_per_request', 0):.2f}" for r in rows))
    print("ratios gateway/direct (p50, p99):  " + "; ".join(
        f"{r['streams']} streams: TTFT {r['ttft_ratio_p50'] or float('nan'):.2f}, "
        f"{r['ttft_ratio_p99'] or float('nan'):.2f}" for r in rows))
    print("added = gateway − direct; token = the event's write at the stub → the client; "
          "gap = between consecutive tokens at the client; admission = the controller's round "
          "trip inside the gateway's TTFT (request.arrived → request.admitted), from "
          "request.completed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", choices=("stub", "vllm"), default="stub")
    parser.add_argument("--concurrency", default="1,64,256",
                        help="comma-separated numbers of concurrent streams")
    parser.add_argument("--requests", type=int, default=256,
                        help="requests per path, level and round (at least one per stream; "
                             "level 1: a tenth of it)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="phases per path and level, in alternating order")
    parser.add_argument("--tokens", type=int, default=8, help="max_tokens of each request")
    parser.add_argument("--token-interval-ms", type=float, default=40.0,
                        help="stub: time between two tokens of a stream")
    parser.add_argument("--vllm-url", default=None,
                        help="vllm: a running vLLM serving the tiny model as `tiny` (default: "
                             "start one on a freshly written tiny model)")
    parser.add_argument("--model", type=Path, default=None,
                        help="the model's folder (its tokenizer; default: write the tiny model)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the gateway under cProfile; write DIR/gateway.prof")
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
        upstream_url = args.vllm_url
        if args.upstream == "stub":
            port = free_port()
            upstream_url = f"http://127.0.0.1:{port}"
            proc = stack.enter_context(process(
                [sys.executable, str(HERE / "stub_upstream.py"), "--port", str(port),
                 "--token-interval-ms", str(args.token_interval_ms)], work / "stub.log"))
            wait_healthy(f"{upstream_url}/health", proc, work / "stub.log", 60)
        elif upstream_url is None:
            port = free_port()
            upstream_url = f"http://127.0.0.1:{port}"
            proc = stack.enter_context(process(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(model), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port",
                 str(port), "--max-model-len", "1024", "--disable-log-stats"],
                work / "vllm.log", {"VLLM_CPU_KVCACHE_SPACE": "1"}))
            print("starting vLLM (about a minute or two on a small CPU)...", flush=True)
            wait_healthy(f"{upstream_url}/health", proc, work / "vllm.log", 600)
        nats = stack.enter_context(EmbeddedNatsServer(store_dir=work / "nats"))
        forecaster = stack.enter_context(process(
            [str(exe), "run", "forecaster", "--policy", "default", "--instances", "i0",
             "--nats", nats.url, "--log-level", "warning"], work / "forecaster.log"))
        gw_port = free_port()
        gateway_cmd = [str(exe)]
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            gateway_cmd = [sys.executable, "-m", "cProfile", "-o",
                           str(args.profile / "gateway.prof"), str(exe)]
        gw = stack.enter_context(process(
            [*gateway_cmd, "run", "gateway", "--model", str(model), "--served-model-name",
             "tiny", "--max-model-len", "1024", "--instance", f"i0={upstream_url}", "--host",
             "127.0.0.1", "--port", str(gw_port), "--nats", nats.url, "--log-level",
             "warning"], work / "gateway.log"))
        wait_healthy(f"http://127.0.0.1:{gw_port}/health", gw, work / "gateway.log", 60)
        print(f"gateway pid {gw.pid}, forecaster pid {forecaster.pid}", flush=True)
        time.sleep(1.0)  # the forecaster subscribes after its own start-up
        load_before = os.getloadavg()
        started = time.time()
        results = anyio.run(measure, f"{upstream_url}/v1/completions",
                            f"http://127.0.0.1:{gw_port}/v1/completions",
                            Plan(levels, args.rounds, args.requests, args.tokens,
                                 {"gateway": gw.pid, "forecaster": forecaster.pid}))
        elapsed = time.time() - started
        load_after = os.getloadavg()
        time.sleep(1.0)  # the last completions are published after their streams end
        waits = anyio.run(admission_waits, nats.url,
                          {lvl: t["gateway"].windows for lvl, t in results.items()})

    rows = [summarize(level, times, waits[level]) for level, times in results.items()]
    upstream = ("stub upstream (no engine)" if args.upstream == "stub"
                else "vLLM CPU, tiny model")
    print_table(rows, f"client-side ms, {args.tokens} tokens per stream, {upstream}, "
                      f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
                      f"{load_after[0]:.1f} after, {elapsed:.0f} s",
                "token" if args.upstream == "stub" else "gap")
    out = args.json or Path("runs") / f"bench_gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "gateway_overhead", "upstream": args.upstream, "rows": rows,
        "tokens": args.tokens, "token_interval_ms": args.token_interval_ms
        if args.upstream == "stub" else None, "rounds": args.rounds,
        "requests": args.requests, "seconds": elapsed, "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": load_after,
        "python": platform.python_version(), "machine": platform.machine(),
        "command": " ".join(sys.argv)}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

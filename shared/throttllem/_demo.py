"""`throttllem demo`: the whole system on one machine.

Starts a nats-server (embedded unless --nats is given), the services as separate processes
(forecaster, one engine twin per instance, telemetry), replays a window of a real trace in
event time, and prints the run summary. Energy comes from the twin GPUs' energy counters:
it is simulated, and every output says so.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.report import ClockAccumulator, RunReport, format_table, summarize
from throttllem._core.slo import SloClass, load_slo_classes, require_slo_class
from throttllem._energy_report import Totals
from throttllem._errors import ConfigError, ThrottllemError
from throttllem._eval.sim import Timeline
from throttllem._events import (
    ENGINE_CODEC,
    HEALTH_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    Heartbeat,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
)
from throttllem._gpu.remote import RemoteGpu
from throttllem._runtime import Clock
from throttllem._services.replayer import replay
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import (
    ENGINE_ITERATION_ALL,
    HEALTH_ALL,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    twin_gpu,
)
from throttllem._trace import WindowSpec, window_requests

if TYPE_CHECKING:
    from throttllem._demo_metrics import DemoMetrics
    from throttllem._security import SecurityLayout

log = structlog.get_logger("throttllem.demo")

class DemoOptions(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str | None = None
    trace: str = "conv"
    minutes: float = 2.0
    start_minute: float = 0.0
    instances: int = 2
    seed: int = 0
    speed: float = 1.0
    # The first command shows the product: both policies on the same window, side by side.
    policies: list[str] = msgspec.field(default_factory=lambda: ["default", "throttllem"])
    length_error: str = "0.15"
    setup: str = DEFAULT_SETUP
    peak_rps: float | None = None
    json_path: Path | None = None
    log_dir: Path | None = None
    startup_timeout_s: float = 60.0
    drain_timeout_s: float = 120.0
    progress: bool = True
    slo_config: Path | None = None  # TOML SLO classes for the forecaster and the report
    slo_class: str = "standard"  # the class of every replayed request
    plots_dir: Path | None = None  # PNG plots (energy, clock, TBT and E2E CDFs); None: none
    # Run the embedded server locked down: TLS with client certificates and one NATS identity
    # per service (credentials generated under the log folder), as `deploy/` does.
    secure: bool = False
    # "twin": simulated engines; "vllm": real vLLM server(s) behind the gateway.
    engine: str = "twin"
    model_dir: Path | None = None  # vLLM: the model to serve (default: a tiny one, written)
    sample_s: float = 5.0  # event seconds per bin of the plots' timelines
    # One Prometheus endpoint for the whole demo (see `_demo_metrics`); None: none.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # After the last run, keep the embedded NATS server (its stream: `throttllem report
    # energy`) and the metrics endpoint up until SIGINT/SIGTERM.
    keep_serving: bool = False

    @property
    def window(self) -> WindowSpec:
        return WindowSpec(trace=self.trace, minutes=self.minutes,
                          start_minute=self.start_minute, seed=self.seed,
                          peak_rps=self.peak_rps, slo_class=self.slo_class)


def trace_requests(opts: DemoOptions, *, offset_s: float,
                   run_tag: str = "") -> Iterator[RequestArrived]:
    """The demo window's requests (see `WindowSpec`), shifted to start at `offset_s`."""
    return window_requests(opts.window, offset_s=offset_s, run_tag=run_tag)


def _spawn(args: list[str], log_path: Path, clock: Clock, nats_url: str, *,
           secrets: SecurityLayout | None = None,
           identity: str | None = None) -> subprocess.Popen[bytes]:
    """Start one service; with `secrets`, as `identity` (credentials by environment, never
    on the command line)."""
    cmd = [sys.executable, "-m", "throttllem", "run", *args, "--nats", nats_url,
           "--epoch-wall", repr(clock.epoch_wall_s), "--speed", repr(clock.speed)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if secrets is not None:
        env |= secrets.env(identity or args[0])
    with log_path.open("ab") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                env=env)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, *, submitted: int, done: int, total: int, now_s: float, end_s: float,
             force: bool = False) -> None:
        if not self.enabled:
            return
        wall = time.monotonic()
        if not force and wall - self._last < (0.25 if self.tty else 15.0):
            return
        self._last = wall
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        line = (f"[{bar:<30}] {done}/{total} done, {submitted} sent, "
                f"trace t={max(now_s, 0):.0f}/{end_s:.0f}s")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


class DemoRun(msgspec.Struct, frozen=True, kw_only=True):
    """One policy's live run: its report and what the plots draw."""

    report: RunReport
    timeline: Timeline
    tbt_ms: list[float]
    e2e_ms: list[float]
    # Requests, engine-attributed energy and tokens per tenant (what `report energy` bills).
    tenants: dict[str, Totals] = msgspec.field(default_factory=dict)


def tenant_totals(completions: list[RequestCompleted]) -> dict[str, Totals]:
    """Per-tenant totals of the completions, each id once, from the energy the engines
    attributed (a completion without one counts its tokens, not its energy)."""
    seen: set[str] = set()
    out: dict[str, Totals] = {}
    for c in completions:
        if c.id in seen:
            continue
        seen.add(c.id)
        totals = out.setdefault(c.tenant, Totals())
        totals.requests += 1
        totals.energy_j += (c.energy_mj or 0.0) / 1e3
        totals.prompt_tokens += c.prompt_tokens
        totals.generated_tokens += c.generated_tokens
    return out


async def _run(opts: DemoOptions, policy: str, nats_url: str, log_dir: Path,
               slo_classes: Mapping[str, SloClass], *,
               secrets: SecurityLayout | None = None,
               metrics: DemoMetrics | None = None) -> DemoRun:
    instances = [f"i{n}" for n in range(opts.instances)]
    # Ids carry the policy: runs on one server must not de-duplicate each other's requests.
    requests = list(trace_requests(opts, offset_s=0.0, run_tag=f"{policy}-"))
    if not requests:
        raise ConfigError(f"the trace window (start {opts.start_minute} min, "
                          f"{opts.minutes} min) holds no requests")
    clock = Clock(epoch_wall_s=time.time(), speed=opts.speed)
    procs: list[subprocess.Popen[bytes]] = []
    # (process, log file, where this run's lines start): where each logged its metrics URL.
    spawned: list[tuple[str, Path, int]] = []

    def start(args: list[str], process: str, identity: str | None = None) -> None:
        log_path = log_dir / f"{process}.log"
        if metrics is not None:
            args = [*args, "--metrics-port", "0"]
            spawned.append((process, log_path,
                            log_path.stat().st_size if log_path.exists() else 0))
        procs.append(_spawn(args, log_path, clock, nats_url, secrets=secrets,
                            identity=identity))

    bus = await Bus.connect(nats_url, name="demo",
                            auth=None if secrets is None else secrets.auth("demo"),
                            service=None if secrets is None else "demo")
    try:
        await bus.ensure_request_stream()
        ready: dict[str, set[str]] = {}

        async def on_health(beat: Heartbeat) -> None:
            ready.setdefault(beat.service, set()).add(beat.instance_id)

        await bus.subscribe(HEALTH_ALL, HEALTH_CODEC, on_health)
        for inst in instances:
            start(["engine", "--instance", inst, "--setup", opts.setup], f"engine-{inst}",
                  identity=f"engine-{inst}")
        slo_args = [] if opts.slo_config is None else ["--slo-config", str(opts.slo_config)]
        start(["forecaster", "--instances", ",".join(instances), "--policy", policy,
               "--setup", opts.setup, *slo_args], "forecaster")
        start(["telemetry", "--gpu", "twin", "--instances", ",".join(instances)], "telemetry")
        expected = {"engine": len(instances), "forecaster": 1, "telemetry": 1}
        if policy == "throttllem":
            # Trace prompts have no text: the predictor runs as a labelled oracle.
            start(["length-predictor", "--oracle", opts.length_error, "--seed", str(opts.seed)],
                  "length-predictor")
            for inst in instances:
                start(["actuator", "--instance", inst, "--gpu", "twin"], f"actuator-{inst}",
                      identity=f"actuator-{inst}")
            expected |= {"length-predictor": 1, "actuator": len(instances)}
        with anyio.move_on_after(opts.startup_timeout_s):
            while any(len(ready.get(s, ())) < n for s, n in expected.items()):
                for proc in procs:
                    if proc.poll() is not None:
                        raise ThrottllemError(
                            f"a service exited at start-up ({proc.args!r}); see logs in {log_dir}")
                await anyio.sleep(0.1)
        missing = {s: n - len(ready.get(s, ())) for s, n in expected.items()
                   if len(ready.get(s, ())) < n}
        if missing:
            raise ThrottllemError(f"services not ready after {opts.startup_timeout_s} s: "
                                  f"{missing}; see logs in {log_dir}")
        if metrics is not None:
            from throttllem._demo_metrics import metrics_url_from_log  # noqa: PLC0415

            # A service serves /metrics before it joins the bus: ready means it logged it.
            for process, log_path, offset in spawned:
                url = metrics_url_from_log(log_path, offset)
                if url is None:
                    raise ThrottllemError(f"{process} logged no metrics.serving line; see "
                                          f"{log_path}")
                metrics.add_target(policy, process, url)

        # Shift the window so that it starts just after now, in event time.
        offset_s = clock.now_s() + 0.5
        requests = [msgspec.structs.replace(r, arrival_s=r.arrival_s + offset_s) for r in requests]
        end_s = requests[-1].arrival_s
        completions: list[RequestCompleted] = []
        clocks = ClockAccumulator()
        submitted = 0

        rejected: dict[str, str] = {}

        async def on_completed(event: RequestEvent) -> None:
            if isinstance(event, RequestCompleted):
                completions.append(event)

        async def on_deferred(event: RequestEvent) -> None:
            # An engine's refusal (a prompt longer than the context window) is final and
            # counts as unserved; the controller's deferrals are retried.
            if isinstance(event, RequestDeferred) and event.final:
                rejected[event.id] = event.reason

        timeline = Timeline(sample_s=opts.sample_s)

        async def on_iteration(it: EngineIteration) -> None:
            clocks.add(it)
            timeline.add_pass(it.duration_ms / 1e3, it.clock_mhz)

        await bus.subscribe(REQUEST_COMPLETED, REQUEST_CODEC, on_completed)
        await bus.subscribe(REQUEST_DEFERRED, REQUEST_CODEC, on_deferred)
        await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, on_iteration)
        gpus = [RemoteGpu(bus, twin_gpu(inst)) for inst in instances]

        async def energy_mj() -> float:
            total = 0.0
            for gpu in gpus:
                for index in range(await gpu.gpu_count()):
                    total += (await gpu.read(index)).energy_mj
            return total

        energy_start_mj = await energy_mj()
        progress = _Progress(opts.progress)

        def on_published(_: RequestArrived) -> None:
            nonlocal submitted
            submitted += 1

        async def sample_energy() -> None:
            bin_end_s = offset_s + opts.sample_s
            while True:
                await clock.sleep_until(bin_end_s)
                timeline.close_bin(bin_end_s - offset_s,
                                   (await energy_mj() - energy_start_mj) / 1e3, len(instances))
                bin_end_s += opts.sample_s

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(replay, bus, clock, requests, on_published=on_published))
            tg.start_soon(sample_energy)
            with anyio.move_on_after((end_s - clock.now_s()) / opts.speed + opts.drain_timeout_s):
                while len(completions) + len(rejected) < len(requests):
                    progress.show(submitted=submitted, done=len(completions), total=len(requests),
                                  now_s=clock.now_s() - offset_s, end_s=end_s - offset_s)
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        progress.show(submitted=submitted, done=len(completions), total=len(requests),
                      now_s=clock.now_s() - offset_s, end_s=end_s - offset_s, force=True)
        progress.close()
        # Let the engines account idle energy up to now before the final read.
        await anyio.sleep(0.3)
        energy_j = (await energy_mj() - energy_start_mj) / 1e3
        timeline.close_bin(clock.now_s() - offset_s, energy_j, len(instances))
        if metrics is not None:
            # The final scrape must hold every completion: wait for the telemetry's count.
            counted = await anyio.to_thread.run_sync(partial(
                metrics.wait_for_completions, policy, len(completions)))
            if counted < len(completions):
                log.warning("demo.metrics_incomplete", counted=counted,
                            completions=len(completions))
        if rejected:
            log.warning("demo.requests_rejected", count=len(rejected),
                        example=next(iter(rejected.values())))
        label = policy if policy == "default" else f"{policy} (length error {opts.length_error})"
        report = summarize(completions, policy=label, submitted=len(requests),
                           slo_classes=slo_classes,
                           energy_j=energy_j, clocks=clocks, rejected=len(rejected),
                           duration_s=clock.now_s() - offset_s)
        return DemoRun(report=report, timeline=timeline,
                       tbt_ms=[c.tbt_mean_ms for c in completions if c.generated_tokens > 1],
                       e2e_ms=[c.e2e_ms for c in completions],
                       tenants=tenant_totals(completions))
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()
            if metrics is not None:  # what the services counted outlives them
                await anyio.to_thread.run_sync(metrics.finish, policy)
        _stop(procs)


def run_demo(opts: DemoOptions) -> list[RunReport]:
    """Run the demo end to end, once per policy on the same window (each with fresh services
    on one bus); prints one table, writes JSON if asked, returns the reports."""
    if opts.instances < 1:
        raise ConfigError("--instances must be at least 1")
    if opts.minutes <= 0 or opts.speed <= 0:
        raise ConfigError("--minutes and --speed must be positive")
    unknown = [p for p in opts.policies if p not in ("default", "throttllem")]
    if unknown or not opts.policies:
        raise ConfigError(f"--policy takes default and/or throttllem, not {unknown}")
    if opts.engine not in ("twin", "vllm"):
        raise ConfigError(f"--engine takes twin or vllm, not {opts.engine!r}")
    if opts.engine == "vllm" and (opts.speed != 1.0 or opts.secure):
        raise ConfigError("--engine vllm serves in real time (--speed 1) on an open "
                          "loopback bus (no --secure)")
    # Fail before starting anything: a bad file or class would only show in the report.
    slo_classes = load_slo_classes(opts.slo_config)
    require_slo_class(opts.slo_class, slo_classes)
    log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="tllm-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    server = None
    nats_url = opts.nats_url
    secrets = None
    if opts.secure:
        if nats_url is not None:
            raise ConfigError("--secure locks down the demo's own embedded server; without "
                              "--nats (or give your own server its config from "
                              "`throttllem security init`)")
        from throttllem._security import init_security  # noqa: PLC0415

        secrets = init_security(log_dir / "nats-secrets",
                                instances=[f"i{n}" for n in range(opts.instances)],
                                force=True)
    if opts.metrics_port is not None and opts.engine != "twin":
        raise ConfigError("--metrics-port serves the twin demo's services; the vLLM demo "
                          "starts no telemetry (vLLM serves its own /metrics)")
    metrics: DemoMetrics | None = None
    metrics_server = None
    try:
        if opts.metrics_port is not None:
            from throttllem._demo_metrics import DemoMetrics  # noqa: PLC0415

            metrics = DemoMetrics()
            metrics_server = metrics.serve(opts.metrics_port, opts.metrics_host)
            _notice(f"metrics of every service of this demo at {metrics_server.url} "
                    "(labelled policy and process)")
        if nats_url is None:
            server = (EmbeddedNatsServer() if secrets is None else
                      EmbeddedNatsServer(config=secrets.secure_conf, tls=True))
            nats_url = server.start()
            if opts.keep_serving:
                _notice(f"NATS at {nats_url}")
        runs: dict[str, DemoRun] = {}
        extras: dict[str, object] = {"engine": "twin"}
        if opts.engine == "vllm":
            extras = _run_vllm(opts, nats_url, log_dir, slo_classes, runs)
        for policy in opts.policies if opts.engine == "twin" else ():
            policy_logs = log_dir / policy
            policy_logs.mkdir(exist_ok=True)
            runs[policy] = anyio.run(partial(_run, opts, policy, nats_url, policy_logs,
                                             slo_classes, secrets=secrets, metrics=metrics))
        reports = _present(opts, runs, extras, log_dir)
        if opts.keep_serving:
            kept = [f"NATS at {nats_url} (throttllem report energy --nats {nats_url})"]
            if metrics_server is not None:
                kept.append(f"metrics at {metrics_server.url}")
            sys.stdout.flush()  # the table, before the wait (stdout may be a pipe)
            anyio.run(_until_signalled,
                      f"the runs are over; serving {' and '.join(kept)} until Ctrl-C")
    finally:
        if server is not None:
            server.stop()
        if metrics_server is not None:
            metrics_server.close()
    return reports


def _notice(text: str) -> None:
    print(f"throttllem: {text}", file=sys.stderr, flush=True)


async def _until_signalled(notice: str) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        _notice(notice)  # said once Ctrl-C is caught here, so it ends the wait cleanly
        async for _ in signals:
            return


def _present(opts: DemoOptions, runs: Mapping[str, DemoRun], extras: Mapping[str, object],
             log_dir: Path) -> list[RunReport]:
    """Print the table and the saving, write the plots and the JSON."""
    reports = [run.report for run in runs.values()]
    print(format_table(reports))
    if opts.engine == "twin":
        print(f"(energy and latencies come from the serving twin, not measured hardware; "
              f"service logs in {log_dir})")
    else:
        clipped = extras["requests_clipped_to_context"]
        print(f"(latencies measured by the gateway on real vLLM ({clipped} requests clipped "
              f"to the model's context); energy not measured: no GPU here; service logs in "
              f"{log_dir})")
    summary = saving_line(runs)
    if summary:
        print(summary)
    if opts.plots_dir is not None:
        from throttllem._eval.plots import PlotsUnavailableError, write_plots  # noqa: PLC0415

        try:
            note = ("simulated (serving twin), not measured" if opts.engine == "twin" else
                    "real vLLM: latencies measured, energy not measured")
            written = write_plots(runs, opts.plots_dir, note=note,
                                  time_axis="trace time (min, replayed live)")
        except PlotsUnavailableError as e:
            print(f"throttllem: note: {e}", file=sys.stderr)
        else:
            print(f"(plots: {', '.join(str(p) for p in written)})")
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        # Top level: the first policy's figures; "policies": every run, keyed by policy (the
        # layout `throttllem evaluate` shares), with the saving against `default`.
        base = next((r for r in reports if r.policy == "default"), None)
        policies = {run.report.policy: {
            **msgspec.structs.asdict(run.report),
            "saving_vs_default": 1 - run.report.energy_j / base.energy_j if base else None,
            "tenants": {k: v.as_dict() for k, v in sorted(run.tenants.items())}}
            for run in runs.values()}
        document = {**msgspec.structs.asdict(reports[0]),
                    "tenants": policies[reports[0].policy]["tenants"], "policies": policies,
                    "options": _jsonable(opts), **extras}
        opts.json_path.write_bytes(msgspec.json.format(msgspec.json.encode(document)))
    return reports


def _run_vllm(opts: DemoOptions, nats_url: str, log_dir: Path,
              slo_classes: Mapping[str, SloClass],
              runs: dict[str, DemoRun]) -> dict[str, object]:
    """Every policy against the same vLLM server(s), started once; fills `runs` and returns
    what the JSON adds (`engine`, what was measured)."""
    from throttllem import _demo_vllm as dv  # noqa: PLC0415

    requests = list(window_requests(opts.window, offset_s=0.0))
    if not requests:
        raise ConfigError(f"the trace window (start {opts.start_minute} min, "
                          f"{opts.minutes} min) holds no requests")
    model_dir = dv.prepare_model(opts.model_dir, log_dir)
    clipped = 0
    with dv.vllm_servers(model_dir, instances=opts.instances, log_dir=log_dir,
                         nats_url=nats_url) as servers:
        for policy in opts.policies:
            policy_logs = log_dir / policy
            policy_logs.mkdir(exist_ok=True)
            report, timeline, tbt, e2e, clipped = anyio.run(partial(
                dv.run_policy, policy=policy, requests=requests, servers=servers,
                model_dir=model_dir, nats_url=nats_url, log_dir=policy_logs,
                slo_classes=slo_classes, spawn=_spawn, stop=_stop,
                startup_timeout_s=opts.startup_timeout_s,
                drain_timeout_s=opts.drain_timeout_s, sample_s=opts.sample_s))
            runs[policy] = DemoRun(report=report, timeline=timeline, tbt_ms=tbt, e2e_ms=e2e)
    return dv.document_extras(clipped)


def saving_line(runs: Mapping[str, DemoRun]) -> str | None:
    """One line saying what throttLL'eM saved against the default policy, at what SLO
    attainment (None unless both ran)."""
    base, ours = runs.get("default"), runs.get("throttllem")
    if (base is None or ours is None or not base.report.energy_j > 0
            or math.isnan(ours.report.energy_j)):
        return None
    b, o = base.report, ours.report
    return (f"throttLL'eM used {100 * (1 - o.energy_j / b.energy_j):.1f}% less energy than "
            f"default ({o.energy_j / 1e3:,.1f} kJ vs {b.energy_j / 1e3:,.1f} kJ, simulated) "
            f"at {100 * o.slo_attainment:.1f}% SLO attainment (default "
            f"{100 * b.slo_attainment:.1f}%)")


def _jsonable(opts: DemoOptions) -> dict[str, object]:
    out = msgspec.structs.asdict(opts)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()
            if not (isinstance(v, float) and math.isinf(v))}


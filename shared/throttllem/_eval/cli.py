"""`throttllem evaluate`: policies compared on a trace window in simulated time.

Every policy serves the very same requests (the demo's: same ids, tenants and oracle length
noise) on fresh engine twins; energy is integrated over a common horizon (the latest end of
any policy's run), so idle tails count the same for all. Energy and latencies come from the
serving twin, not measured hardware.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import msgspec

from throttllem._core.report import RunReport, format_table, summarize
from throttllem._errors import ConfigError
from throttllem._eval.policies import POLICIES, make_policy, oracle_predictions
from throttllem._eval.sim import SimResult, Simulation


class EvalOptions(msgspec.Struct, frozen=True, kw_only=True):
    trace: str = "conv"
    minutes: float = 60.0
    start_minute: float = 0.0
    instances: int = 2
    peak_rps: float | None = None
    policies: list[str] = msgspec.field(default_factory=lambda: list(POLICIES))
    length_error: str = "0.15"
    setup: str = "h100-llama3-8b-tp1"
    perf_model: str | None = None  # None: the shipped model for the setup; "twin": oracle
    seed: int = 0
    retune_s: float = 0.1  # the live forecaster's retune period (at --speed 1)


class PolicyRun(msgspec.Struct, frozen=True, kw_only=True):
    report: RunReport
    gpu_energy_mj: list[float]  # each GPU's counter at the horizon
    idle_floor_j: float  # idle power × horizon × GPUs
    deferred: int
    iterations: int
    ticks: int


def parse_length_error(value: str) -> float | str:
    if value.strip().lower() == "measured":
        return "measured"
    text = value.strip().rstrip("%")
    try:
        error = float(text) / (100.0 if value.strip().endswith("%") else 1.0)
    except ValueError as exc:
        raise ConfigError(f"--length-error takes 0, 0.15, 0.3 (or 15%) or 'measured', "
                          f"not {value!r}") from exc
    if not 0.0 <= error < 1.0:
        raise ConfigError(f"--length-error must be in [0, 1), got {error}")
    return error


def evaluate(opts: EvalOptions) -> dict[str, PolicyRun]:
    """Run every policy on the window; returns the runs by policy name, in order."""
    from throttllem._demo import DemoOptions, trace_requests  # noqa: PLC0415
    from throttllem._services.forecaster import load_perf_model, setup_policy  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    if opts.instances < 1:
        raise ConfigError("--instances must be at least 1")
    if opts.minutes <= 0 or opts.retune_s <= 0:
        raise ConfigError("the window length and --retune-s must be positive")
    unknown = [p for p in opts.policies if p not in POLICIES]
    if unknown or not opts.policies:
        raise ConfigError(f"--policies takes some of {', '.join(POLICIES)}, not {unknown}")
    error = parse_length_error(opts.length_error)
    requests = list(trace_requests(DemoOptions(
        trace=opts.trace, minutes=opts.minutes, start_minute=opts.start_minute,
        seed=opts.seed, peak_rps=opts.peak_rps), offset_s=0.0))
    if not requests:
        raise ConfigError(f"the trace window (start {opts.start_minute} min, "
                          f"{opts.minutes} min) holds no requests")
    profile = load_profile(opts.setup)
    instances = [f"i{n}" for n in range(opts.instances)]
    controlled = [p for p in opts.policies if p != "default"]
    policy = shape = predictions = None
    if controlled:
        perf = load_perf_model(opts.setup, opts.perf_model)
        policy, shape = setup_policy(opts.setup, perf)
        predictions = oracle_predictions(requests, error, opts.seed)

    sims: dict[str, Simulation] = {}
    results: dict[str, SimResult] = {}
    for name in opts.policies:
        sim = Simulation(profile, instances, make_policy(
            name, instances, policy=policy, shape=shape, predictions=predictions,
            tick_s=opts.retune_s))
        results[name] = sim.run(requests)
        sims[name] = sim
    horizon_s = max(r.end_s for r in results.values())
    runs: dict[str, PolicyRun] = {}
    for name, sim in sims.items():
        res = results[name]
        energy_j = sim.finish(horizon_s)
        report = summarize(res.completions, policy=name, submitted=res.submitted,
                           energy_j=energy_j, clocks=res.clocks, rejected=len(res.rejected),
                           duration_s=horizon_s)
        runs[name] = PolicyRun(
            report=report, gpu_energy_mj=sim.gpu_energy_mj(),
            idle_floor_j=profile.gpu.idle_power_w * horizon_s * sim.gpu_count(),
            deferred=int(getattr(sim.policy, "deferred", 0)), iterations=res.iterations,
            ticks=res.ticks)
    return runs


def to_document(runs: dict[str, PolicyRun], opts: EvalOptions) -> dict[str, Any]:
    """The JSON layout: {"policies": {name: figures}, "options": ...}; deterministic."""
    base = runs.get("default")
    policies: dict[str, Any] = {}
    for name, run in runs.items():
        r = run.report
        policies[name] = {
            **msgspec.to_builtins(r),
            "saving_vs_default": (1 - r.energy_j / base.report.energy_j) if base else None,
            "tokens_per_joule": r.generated_tokens / r.energy_j if r.energy_j > 0 else None,
            "idle_floor_j": run.idle_floor_j,
            "deferred": run.deferred,
            "iterations": run.iterations,
            "controller_ticks": run.ticks,
        }
    options = {k: v for k, v in msgspec.structs.asdict(opts).items()
               if not (isinstance(v, float) and math.isinf(v))}
    return {"policies": policies, "options": options,
            "energy_source": "twin (simulated)", "time": "simulated (no wall clock)"}


def add_evaluate_parser(sub: Any) -> None:
    """Register `throttllem evaluate` on the root command's subparsers."""
    p = sub.add_parser("evaluate", help="compare policies on a trace window in simulated time "
                                        "(the same controller functions, no bus)")
    p.add_argument("--trace", default="conv", help="conv, code, or a CSV path")
    p.add_argument("--hours", type=float, default=1.0, help="window length in hours")
    p.add_argument("--minutes", type=float, default=None,
                   help="window length in minutes (overrides --hours)")
    p.add_argument("--start-minute", type=float, default=0.0, help="trace window start")
    p.add_argument("--instances", type=int, default=2, help="engine instances")
    p.add_argument("--peak-rps", type=float, default=None,
                   help="time-scale the window so its busiest minute has this many requests/s")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated, of {', '.join(POLICIES)}")
    p.add_argument("--length-error", default="0.15",
                   help="oracle length predictor's relative error (0, 0.15, 0.3) or 'measured'")
    p.add_argument("--setup", default="h100-llama3-8b-tp1", help="twin setup profile")
    p.add_argument("--perf-model", default=None,
                   help="controller performance model: folder or shipped name (default: the "
                        "setup's shipped model, as the live forecaster), or 'twin' (oracle)")
    p.add_argument("--retune-s", type=float, default=0.1,
                   help="controller tick period in simulated seconds")
    p.add_argument("--seed", type=int, default=0, help="seeds the tenant mix and length noise")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.set_defaults(func=cmd_evaluate)


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    minutes = args.minutes if args.minutes is not None else 60.0 * args.hours
    return EvalOptions(
        trace=args.trace, minutes=minutes, start_minute=args.start_minute,
        instances=args.instances, peak_rps=args.peak_rps,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        length_error=args.length_error, setup=args.setup, perf_model=args.perf_model,
        seed=args.seed, retune_s=args.retune_s)


def cmd_evaluate(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    runs = evaluate(opts)
    print(format_table([r.report for r in runs.values()]))
    print("(simulated time; energy and latencies come from the serving twin, not measured "
          "hardware)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(
            to_document(runs, opts))))
    return 0

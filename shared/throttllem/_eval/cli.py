"""`throttllem evaluate`: the command line of the evaluation driver (`throttllem._eval.driver`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec

from throttllem._eval.driver import (
    EvalOptions,
    evaluate,
    format_evaluation,
    parse_power,
    to_document,
)
from throttllem._eval.node import NODE_POLICIES
from throttllem._eval.policies import DEFAULT_POLICIES, POLICIES
from throttllem._setup import DEFAULT_SETUP


def add_evaluate_parser(sub: Any) -> None:
    """Register `throttllem evaluate` on the root command's subparsers."""
    p = sub.add_parser("evaluate", help="compare policies on a trace in simulated time "
                                        "(the same controller functions, no bus)")
    p.add_argument("--trace", default="conv", help="conv, code, or a CSV path")
    p.add_argument("--hours", type=float, default=1.0, help="window length in hours")
    p.add_argument("--minutes", type=float, default=None,
                   help="window length in minutes (overrides --hours)")
    p.add_argument("--start-minute", type=float, default=0.0, help="trace window start")
    p.add_argument("--instances", type=int, default=4,
                   help="instances sized for the peak (default runs all of them)")
    p.add_argument("--peak-load", type=float, default=1.0,
                   help="the trace's busiest minute as a fraction of N x capacity")
    p.add_argument("--peak-rps", type=float, default=None,
                   help="time-scale so the busiest minute has this many requests/s instead")
    p.add_argument("--no-time-scale", action="store_true",
                   help="replay at the trace's own rate (as `throttllem demo` does)")
    p.add_argument("--capacity-rps", type=float, default=None,
                   help="one instance's capacity (default: measured on the twin)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated, of {', '.join((*POLICIES, *NODE_POLICIES))} "
                        "(the last two need --node-setups)")
    p.add_argument("--node-setups", default="",
                   help="TP configurations of one model the node autoscaler may mix, e.g. "
                        "h100-llama2-13b-tp1,h100-llama2-13b-tp2,h100-llama2-13b-tp4")
    p.add_argument("--node-gpus", type=int, default=None,
                   help="the node's GPUs (default: --instances x the setup's TP degree)")
    p.add_argument("--length-error", default="0.15",
                   help="oracle length predictor's relative error (0, 0.15, 0.3) or 'measured'")
    p.add_argument("--length-errors", default="",
                   help="extra throttllem runs at these errors, e.g. 0,0.3,measured")
    p.add_argument("--setup", default=DEFAULT_SETUP, help="twin setup profile")
    p.add_argument("--perf-model", default=None,
                   help="controller performance model: folder or shipped name (default: the "
                        "setup's shipped model, as the live forecaster), or 'twin' (oracle)")
    p.add_argument("--retune-s", type=float, default=0.1,
                   help="controller tick period in simulated seconds")
    p.add_argument("--slo-target", type=float, default=0.99,
                   help="attainment that sizes capacity and the static clock")
    p.add_argument("--warmup-s", type=float, default=60.0, help="a new instance's warm-up")
    p.add_argument("--power", default="",
                   help="sensitivity: replace twin power-model parameters, e.g. "
                        "static_w=120,voltage_min_ratio=0.6 (names of the profile's [power])")
    p.add_argument("--no-fidelity", action="store_true",
                   help="the older twin: one idle power whatever the lock, instant clock "
                        "changes (and a controller that knows neither)")
    p.add_argument("--switch-latency-s", type=float, default=None,
                   help="replace the twin's clock-switch latency (profile [clocking])")
    p.add_argument("--band", action="store_true",
                   help="also run every policy but static with each assumed power, idle and "
                        "switch parameter at its low and high plausible value: a saving band "
                        "per policy (10 more runs of each; slow)")
    p.add_argument("--no-future-prefills", action="store_true",
                   help="ablation: the controller ignores the prefills of requests to come")
    p.add_argument("--slo-config", type=Path, default=None,
                   help="TOML file of SLO classes (as `throttllem run forecaster`): they size "
                        "capacity, steer the controller and score the runs")
    p.add_argument("--slo-class", default="standard",
                   help="SLO class of every request of the window (default: standard)")
    p.add_argument("--seed", type=int, default=0, help="seeds the tenant mix and length noise")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--plots", type=Path, default=Path("runs/evaluate"),
                   help="folder for the PNG plots (needs matplotlib: pip install "
                        "'throttllem[plot]')")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    minutes = args.minutes if args.minutes is not None else 60.0 * args.hours
    return EvalOptions(
        trace=args.trace, minutes=minutes, start_minute=args.start_minute,
        instances=args.instances, peak_rps=args.peak_rps, peak_load=args.peak_load,
        time_scale=not args.no_time_scale,
        capacity_rps=args.capacity_rps,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        length_error=args.length_error,
        length_errors=[e.strip() for e in args.length_errors.split(",") if e.strip()],
        setup=args.setup, perf_model=args.perf_model, seed=args.seed,
        retune_s=args.retune_s, slo_target=args.slo_target, warmup_s=args.warmup_s,
        future_prefills=not args.no_future_prefills, power=parse_power(args.power),
        slo_config=args.slo_config, slo_class=args.slo_class,
        fidelity=not args.no_fidelity, band=args.band,
        node_setups=[s.strip() for s in args.node_setups.split(",") if s.strip()],
        node_gpus=args.node_gpus,
        clocking=({} if args.switch_latency_s is None
                  else {"switch_latency_s": args.switch_latency_s}))


def cmd_evaluate(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    ev = evaluate(opts)
    print(format_evaluation(ev))
    print("(simulated time; energy and latencies come from the serving twin, not measured "
          "hardware)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(to_document(ev, opts))))
    if not args.no_plots:
        from throttllem._eval.plots import PlotsUnavailableError, write_plots  # noqa: PLC0415

        try:
            written = write_plots(ev.runs, args.plots)
        except PlotsUnavailableError as e:
            print(f"throttllem: note: {e}", file=sys.stderr)
        else:
            print(f"(plots: {', '.join(str(p) for p in written)})")
    return 0

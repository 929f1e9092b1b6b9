"""Command line of the performance model: `profile`, `train perf`, `perf score`.

The main CLI (`throttllem._cli`) registers these with

    add_profile_parser(root_subparsers)        # throttllem profile ...
    add_train_perf_parser(train_subparsers)    # throttllem train perf ...
    add_perf_parser(root_subparsers)           # throttllem perf score ...

each parser setting ``func=<callable(Namespace) -> int>``. This module also runs on its own,
with nothing imported beyond the standard library until a command runs, so that the GPU lab's
profiler runs on a GPU machine without the main CLI's dependencies:

    PYTHONPATH=shared python -m throttllem._cli_perf profile --target gpu --out runs/gpu.csv
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from throttllem._setup import DEFAULT_SETUP


def _out_default(args: argparse.Namespace) -> Path:
    return Path("runs") / f"profile-{args.setup}-{args.target}.csv"


# --------------------------------------------------------------------------- profile


def add_profile_parser(root_subparsers: Any) -> argparse.ArgumentParser:
    """Register `profile` (the offline profiler) on the root sub-parsers."""
    p: argparse.ArgumentParser = root_subparsers.add_parser(
        "profile", help="sweep a setup's iterations (twin or real GPU) into a profile table",
        description="One CSV row per iteration: batch 1…max and KV fill empty…full (plus "
                    "prefills) at randomly drawn SM clocks (twin) or at the clock the card "
                    "picks itself (gpu: clocks are never changed).")
    p.add_argument("--target", choices=("twin", "gpu"), default="twin",
                   help="twin: the setup's simulated GPU; gpu: a Llama-3-8B-shaped decoder "
                        "on a real GPU (needs torch + CUDA)")
    p.add_argument("--setup", default=DEFAULT_SETUP,
                   help="twin setup profile name or .toml path (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV to write (default runs/profile-<setup>-<target>.csv); "
                        ".parquet is refused: pyarrow is not a dependency")
    p.add_argument("--samples", type=int, default=12_000,
                   help="twin: iterations to sample (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sweep and the twin's noise")
    p.add_argument("--noise", type=float, default=None,
                   help="twin: multiplicative log-normal noise sigma (default 0.01)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="gpu: wall-clock budget for the whole sweep (default 330 s)")
    p.add_argument("--device", type=int, default=0,
                   help="gpu: CUDA device index (the NVML index of the same card is looked "
                        "up by PCI bus id)")
    p.set_defaults(func=cmd_profile)
    return p


def cmd_profile(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else _out_default(args)
    if args.target == "gpu":
        # The GPU lab's profiler; imported here only, since it needs torch on a GPU machine.
        from throttllem._gpulab.decoder import (  # noqa: PLC0415
            GpuProfileOptions,
            run_gpu_profile,
        )

        if args.setup != DEFAULT_SETUP:
            print(f"profile: note: the gpu target always runs a Llama-3-8B-shaped decoder "
                  f"(TP1); --setup {args.setup} only names the default output file",
                  file=sys.stderr)
        opts = GpuProfileOptions(device_index=args.device, seed=args.seed)
        if args.budget_s is not None:
            opts = opts._replace(budget_s=args.budget_s)
        run_gpu_profile(out, opts)
    else:
        from throttllem._perf.profiler import TWIN_NOISE_SIGMA, run_profile  # noqa: PLC0415

        run_profile(setup=args.setup, out=out, samples=args.samples, seed=args.seed,
                    noise_sigma=TWIN_NOISE_SIGMA if args.noise is None else args.noise)
    print(out)
    return 0


# --------------------------------------------------------------------------- train perf


def add_train_perf_parser(train_subparsers: Any) -> argparse.ArgumentParser:
    """Register `perf` under the `train` group (a colleague registers `length` there)."""
    p: argparse.ArgumentParser = train_subparsers.add_parser(
        "perf", help="fit the performance model on profile tables, export ONNX + card",
        description="Evaluates at 90%% and 10%% training splits, fits on all rows, exports "
                    "ONNX (parity-checked against scikit-learn) and writes model.onnx, "
                    "metrics.json and MODEL_CARD.md.")
    p.add_argument("--data", action="append", required=True, metavar="CSV",
                   help="profile table (repeatable); `data:<relative path>` reads from the "
                        "shared data folder; `twin` profiles the setup's twin now with "
                        "--samples/--seed")
    p.add_argument("--setup", default=DEFAULT_SETUP,
                   help="setup profile the data belongs to (clock range, grid domain)")
    p.add_argument("--out", type=Path, default=None,
                   help="model folder (default models/perf/<setup>/)")
    p.add_argument("--samples", type=int, default=12_000, help="with --data twin")
    p.add_argument("--seed", type=int, default=0, help="splits, trees, and --data twin")
    p.add_argument("--repeats", type=int, default=None,
                   help="random splits per fraction (default 1 for ≥1000 rows, else 5 "
                        "10-fold CVs at 90%% and 20 draws at 10%%)")
    p.add_argument("--attention", choices=("auto", "on", "off"), default="auto",
                   help="the Σ prompt² input (prefill attention): auto uses it when every "
                        "row's Σ prompt² is known (column prefill_attn_tokens2, or derivable)")
    p.set_defaults(func=cmd_train_perf)
    return p


def _retrain_command(args: argparse.Namespace) -> str:
    parts = ["throttllem", "train", "perf"]
    for d in args.data:
        parts += ["--data", d]
    parts += ["--setup", args.setup]
    if "twin" in args.data:
        parts += ["--samples", str(args.samples)]
    parts += ["--seed", str(args.seed)]
    if args.repeats is not None:
        parts += ["--repeats", str(args.repeats)]
    if args.attention != "auto":
        parts += ["--attention", args.attention]
    if args.out is not None:
        parts += ["--out", str(args.out)]
    return shlex.join(parts)


def cmd_train_perf(args: argparse.Namespace) -> int:
    from throttllem._perf.train import train_perf_model  # noqa: PLC0415

    train_perf_model(args.data, args.setup, args.out, samples=args.samples, seed=args.seed,
                     repeats=args.repeats, command=_retrain_command(args),
                     attention=args.attention)
    return 0


# --------------------------------------------------------------------------- perf score


def add_perf_parser(root_subparsers: Any) -> argparse.ArgumentParser:
    """Register the `perf` group (`perf score`) on the root sub-parsers."""
    p: argparse.ArgumentParser = root_subparsers.add_parser(
        "perf", help="performance model tools (score)")
    sub = p.add_subparsers(dest="perf_command", required=True, metavar="COMMAND")
    s = sub.add_parser("score", help="score a performance model on a profile table",
                       description="Prints notes, then as its last line: "
                                   "R2=<r2> MAPE=<mape>% MAE=<mae> iters/s")
    s.add_argument("--model", required=True,
                   help="model folder (or its model.onnx, or a shipped model's name)")
    s.add_argument("--data", required=True, type=Path, help="profile table CSV")
    s.add_argument("--grid", action="store_true",
                   help="also score the runtime's compiled grid (what the forecaster uses)")
    s.add_argument("--json", type=Path, default=None, help="also write the scores as JSON")
    s.set_defaults(func=cmd_perf_score)
    return p


def cmd_perf_score(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from throttllem._perf.runtime import PerfRuntime, score_table  # noqa: PLC0415

    model = PerfRuntime.load(args.model, grid=args.grid)
    metrics, notes = score_table(model, args.data)
    lo, hi = model.trained_clock_range_mhz
    print(f"model {model.path} (setup {model.setup}, trained clocks {lo:.0f}-{hi:.0f} MHz)")
    print(f"data {args.data}: {notes['rows']} rows; outside the trained range: clock below "
          f"{notes['clock_below_trained']}, above {notes['clock_above_trained']}; batch "
          f"{notes['batch_above_trained']}, kv {notes['kv_above_trained']}, prefill "
          f"{notes['prefill_above_trained']} above (extrapolated, scored anyway)")
    if metrics.mape_by_phase:
        print("MAPE by phase: " + ", ".join(f"{k} {v:.2f}%"
                                            for k, v in metrics.mape_by_phase.items()))
    result: dict[str, Any] = {"onnx": metrics._asdict(), "notes": notes}
    if args.grid:
        gm, _ = score_table(model, args.data, use_grid=True)
        print(f"grid: {gm.line()}")
        result["grid"] = gm._asdict()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(metrics.line())
    return 0


# --------------------------------------------------------------------------- standalone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m throttllem._cli_perf",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_profile_parser(sub)
    train = sub.add_parser("train", help="train models")
    add_train_perf_parser(train.add_subparsers(dest="model", required=True, metavar="MODEL"))
    add_perf_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from throttllem._errors import ThrottllemError  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ThrottllemError as e:
        print(f"throttllem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

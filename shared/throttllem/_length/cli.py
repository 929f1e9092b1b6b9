"""Command-line pieces for the length model; the main ``throttllem`` CLI mounts them:

* ``throttllem train length --data <file|dir> [--data ...] --out models/length/``
* ``throttllem length score --model <dir> --data <file> [--heldout-only]``

Each parser sets ``func`` (Namespace -> exit code). Standalone, without the main CLI:
``python -m throttllem._length.cli train length ...`` / ``... length score ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from throttllem._errors import ConfigError, ModelError

EXIT_OK = 0
EXIT_ERROR = 2


def add_train_length_parser(train_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``length`` under the ``train`` command group."""
    p: argparse.ArgumentParser = train_subparsers.add_parser(
        "length",
        help="train the generation-length model (ONNX) from AlpacaEval-style outputs",
        description="Train, evaluate and export the generation-length model; writes model.onnx, "
        "MODEL_CARD.md and metrics.json into --out.",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        type=Path,
        metavar="PATH",
        help="an AlpacaEval-style JSON file or a folder of them (repeatable); a relative path "
        "that does not exist is looked up in the data folder (../shared/data, THROTTLLEM_DATA_DIR)",
    )
    p.add_argument("--out", type=Path, default=Path("models/length"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share of prompts held out for testing (default 0.2)",
    )
    p.add_argument(
        "--holdout-generator",
        default="auto",
        metavar="NAME",
        help="model file kept out of training to test generalization: a generator "
        "name, 'auto' (gpt-4o-2024-05-13 when present) or 'none'",
    )
    p.add_argument(
        "--max-prompts",
        type=int,
        default=None,
        help="use only this many distinct prompts (quick runs)",
    )
    p.set_defaults(func=_train)
    return p


def add_length_parser(root_subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``length`` command group (``length score``) on the root parser."""
    p: argparse.ArgumentParser = root_subparsers.add_parser(
        "length", help="generation-length model tools"
    )
    sub = p.add_subparsers(dest="length_command", metavar="COMMAND", required=True)
    s = sub.add_parser(
        "score",
        help="score a length model on an AlpacaEval-style file",
        description="Prints MAE, within-±25%% accuracy and upper-quantile coverage; the last "
        "line is 'MAE=… within25=…%% baseline_MAE=…' (baseline: the training-corpus mean "
        "length stored in the model). By default every row is scored, including rows whose "
        "prompts are on the training side of the model's split (the output says how many); "
        "--heldout-only scores only the held-out prompts, the honest test on AlpacaEval files.",
    )
    s.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model folder or model.onnx (default: the shipped models/length)",
    )
    s.add_argument(
        "--data",
        action="append",
        required=True,
        type=Path,
        metavar="PATH",
        help="AlpacaEval-style JSON file or folder (repeatable)",
    )
    s.add_argument(
        "--heldout-only",
        action="store_true",
        help="score only the prompts the model's training split held out (default: all "
        "rows, training prompts included)",
    )
    s.add_argument(
        "--generator",
        default=None,
        help="override the generator name given to the model ('' = unknown)",
    )
    s.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    s.set_defaults(func=_score)
    return p


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _train(args: argparse.Namespace) -> int:
    from throttllem._length.train import TrainConfig, train_length_model  # noqa: PLC0415

    holdout: str | None = None if args.holdout_generator in ("", "none") else args.holdout_generator
    cfg = TrainConfig(
        test_fraction=args.test_fraction, holdout_generator=holdout, max_prompts=args.max_prompts
    )
    try:
        report = train_length_model(
            args.data, args.out, seed=args.seed, config=cfg, log=lambda msg: print(msg, flush=True)
        )
    except (ConfigError, ModelError) as exc:
        return _fail(exc)
    m = report.metrics
    t, base = m["test"], m["baselines"]["corpus_mean"]
    print(f"model_version={report.model_version} seconds={report.seconds:.1f}")
    print(
        f"coverage_upper={100 * t['coverage_upper']:.1f}% (nominal 90%) "
        f"onnx_parity_max_abs_diff={m['onnx_parity']['max_abs_diff_tokens']:.2e} tokens"
    )
    print(f"MAE={t['mae']:.1f} within25={100 * t['within25']:.1f}% baseline_MAE={base['mae']:.1f}")
    return EXIT_OK


def _score(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415

    from throttllem._length.data import (  # noqa: PLC0415
        as_jsonable,
        is_heldout_prompt,
        length_metrics,
        load_examples,
        resolve_data_paths,
    )
    from throttllem._length.runtime import LengthModel  # noqa: PLC0415

    try:
        model = LengthModel.load(args.model)
        examples = load_examples(args.data)
        files = resolve_data_paths(args.data)
        split = json.loads(model.metadata.get("split", "{}"))
        has_split = "test_fraction" in split
        seed, frac = int(split.get("seed", 0)), float(split.get("test_fraction", 0.0))
        heldout = [is_heldout_prompt(e.prompt, seed=seed, test_fraction=frac) for e in examples]
        if args.heldout_only:
            examples = [e for e, h in zip(examples, heldout, strict=True) if h]
            if not examples:
                raise ConfigError("no held-out prompts in the data")
            heldout = [True] * len(examples)
    except (ConfigError, ModelError) as exc:
        return _fail(exc)
    n_heldout = sum(heldout)
    n_train_side = len(examples) - n_heldout
    trained_on = set(json.loads(model.metadata.get("trained_on", "[]")))
    holdout = split.get("holdout_generator")  # its file was given to training, not trained on
    in_training_data = sorted(f.name for f in files if f.name in trained_on and f.stem != holdout)
    rows = _rows_line(
        n=len(examples),
        n_train_side=n_train_side,
        n_heldout=n_heldout,
        heldout_only=args.heldout_only,
        has_split=has_split,
        in_training_data=in_training_data,
    )
    gens = [e.generator for e in examples] if args.generator is None else args.generator
    median, upper = model.predict(
        [e.prompt for e in examples],
        [e.prompt_tokens for e in examples],
        generator=gens,
        task=[e.task for e in examples],
    )
    true = np.asarray([e.output_tokens for e in examples], dtype=np.float64)
    m = length_metrics(true, median, upper)
    base = length_metrics(true, np.full_like(true, model.train_mean_tokens))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                as_jsonable(
                    {
                        "model_version": model.model_version,
                        "rows": {
                            "scored": len(examples),
                            "training_split_prompts": n_train_side if has_split else None,
                            "heldout_prompts": n_heldout if has_split else None,
                            "heldout_only": bool(args.heldout_only),
                            "files_in_training_data": in_training_data,
                        },
                        "model": m,
                        "baseline_corpus_mean": base,
                    }
                ),
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    print(f"model {model.model_version} ({model.token_rule} tokens), {int(m['n'])} examples")
    print(rows)
    print(
        f"MAPE={100 * m['mape']:.1f}% coverage_upper={100 * m['coverage_upper']:.1f}% "
        f"(nominal {100 * model.quantiles[-1]:.0f}%) "
        f"baseline_within25={100 * base['within25']:.1f}%"
    )
    print(f"MAE={m['mae']:.1f} within25={100 * m['within25']:.1f}% baseline_MAE={base['mae']:.1f}")
    return EXIT_OK


def _rows_line(
    *,
    n: int,
    n_train_side: int,
    n_heldout: int,
    heldout_only: bool,
    has_split: bool,
    in_training_data: Sequence[str],
) -> str:
    """Which rows were scored, and whether the model was trained on their prompts."""
    if heldout_only:
        return f"scored rows: {n}, held-out prompts only (none of them trained on)"
    if not has_split:
        return (
            f"scored rows: all {n}; the model records no train/test split, so whether it was "
            "trained on these prompts is unknown"
        )
    if n_train_side == 0:
        return f"scored rows: all {n}, every prompt held out from training"
    if in_training_data:
        names = (
            ", ".join(in_training_data)
            if len(in_training_data) <= 2
            else f"{len(in_training_data)} of these files"
        )
        source = f"{names}: data it was trained on"
    else:
        source = "trained on if they are also in its training data"
    trained = f"{n_train_side} with prompts on the training side of the model's split ({source})"
    return (
        f"scored rows: all {n}, INCLUDING {trained}, {n_heldout} held out; "
        f"--heldout-only scores the {n_heldout} held-out rows only"
    )


def build_parser() -> argparse.ArgumentParser:
    """A root parser with just these commands (the standalone entry point)."""
    root = argparse.ArgumentParser(prog="python -m throttllem._length.cli")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser("train", help="train models")
    add_train_length_parser(
        train.add_subparsers(dest="train_command", metavar="MODEL", required=True)
    )
    add_length_parser(sub)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

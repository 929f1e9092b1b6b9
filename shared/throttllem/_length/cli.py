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
        "length stored in the model).",
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
        help="score only the prompts the model's training split held out",
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
    )
    from throttllem._length.runtime import LengthModel  # noqa: PLC0415

    try:
        model = LengthModel.load(args.model)
        examples = load_examples(args.data)
        if args.heldout_only:
            split = json.loads(model.metadata.get("split", "{}"))
            seed, frac = int(split.get("seed", 0)), float(split.get("test_fraction", 0.0))
            examples = [
                e for e in examples if is_heldout_prompt(e.prompt, seed=seed, test_fraction=frac)
            ]
            if not examples:
                raise ConfigError("no held-out prompts in the data")
    except (ConfigError, ModelError) as exc:
        return _fail(exc)
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
                        "model": m,
                        "baseline_corpus_mean": base,
                    }
                ),
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    print(
        f"model {model.model_version} ({model.token_rule} tokens), {int(m['n'])} examples"
        + (" (held-out prompts)" if args.heldout_only else "")
    )
    print(
        f"MAPE={100 * m['mape']:.1f}% coverage_upper={100 * m['coverage_upper']:.1f}% "
        f"(nominal {100 * model.quantiles[-1]:.0f}%) "
        f"baseline_within25={100 * base['within25']:.1f}%"
    )
    print(f"MAE={m['mae']:.1f} within25={100 * m['within25']:.1f}% baseline_MAE={base['mae']:.1f}")
    return EXIT_OK


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

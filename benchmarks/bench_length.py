"""Inference time of the generation-length model (ONNX Runtime, 1 intra-op thread).

    python benchmarks/bench_length.py [--model models/length] [--json runs/bench_length.json]

"model-only" times the bare ``InferenceSession.run`` on prepared inputs; "predict" adds what a
caller pays in :meth:`LengthModel.predict` (token counting of the prompts, building the
inputs). Prompts are the 805 AlpacaEval instructions, cycled to fill each batch. Target:
≤ 0.2 ms per prompt model-only in batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import onnxruntime as ort

from throttllem._data import data_file
from throttllem._length.runtime import DEFAULT_MODEL_DIR, LengthModel

TARGET_MS_PER_PROMPT = 0.2
BATCHES = (1, 8, 32, 128, 512)


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--json", type=Path, default=Path("runs/bench_length.json"))
    ap.add_argument("--generator", default="Meta-Llama-3-8B-Instruct")
    ap.add_argument("--budget-s", type=float, default=1.0, help="time per batch size (about)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = LengthModel.load(args.model, generator=args.generator)
    load_ms = (time.perf_counter() - t0) * 1e3
    rows = json.loads(data_file("alpaca-eval-outputs/Meta-Llama-3-8B-Instruct.json").read_text())
    prompts = [r["instruction"] for r in rows]

    results = []
    for batch in BATCHES:
        chunk = [prompts[i % len(prompts)] for i in range(batch)]
        feeds = model.make_feeds(chunk)
        one = _time_ms(partial(model.run_session, feeds), 3)
        repeats = max(5, min(2000, int(args.budget_s * 1e3 / max(one, 1e-3) / 2)))
        model_ms = _time_ms(partial(model.run_session, feeds), repeats)
        predict_ms = _time_ms(partial(model.predict, chunk), repeats)
        results.append(
            {
                "batch": batch,
                "repeats": repeats,
                "model_ms_per_batch": model_ms,
                "model_ms_per_prompt": model_ms / batch,
                "predict_ms_per_batch": predict_ms,
                "predict_ms_per_prompt": predict_ms / batch,
                "meets_target": model_ms / batch <= TARGET_MS_PER_PROMPT,
            }
        )

    print(
        f"length model {model.model_version}: load {load_ms:.1f} ms, onnxruntime {ort.__version__}"
    )
    print(
        f"{'batch':>6} {'model ms/batch':>15} {'model ms/prompt':>16} "
        f"{'predict ms/prompt':>18} {'≤0.2 ms':>8}"
    )
    for r in results:
        print(
            f"{r['batch']:>6} {r['model_ms_per_batch']:>15.3f} {r['model_ms_per_prompt']:>16.4f} "
            f"{r['predict_ms_per_prompt']:>18.4f} {'yes' if r['meets_target'] else 'no':>8}"
        )

    out = {
        "model_version": model.model_version,
        "model": str(model.path),
        "load_ms": load_ms,
        "target_ms_per_prompt": TARGET_MS_PER_PROMPT,
        "results": results,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "intra_op_threads": 1,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

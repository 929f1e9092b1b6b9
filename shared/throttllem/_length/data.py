"""Length-model data: loading AlpacaEval-style files, the held-out prompt split, and the
metrics used by training, the model card and ``throttllem length score``.

No scikit-learn here: serving and scoring only need numpy (and onnxruntime in runtime.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from throttllem._errors import ConfigError
from throttllem._length.tokens import count_tokens

# the model-folder contract shared by training and serving
MODEL_FILE = "model.onnx"
CARD_FILE = "MODEL_CARD.md"
METRICS_FILE = "metrics.json"
QUANTILES = (0.5, 0.9)
"""The two quantiles the model predicts: median and upper."""
INPUT_NAMES = ("prompt", "generator", "task", "prompt_tokens")
OUTPUT_NAME = "lengths"

UNKNOWN = ""
"""Generator / task value meaning "not known"; the model maps it (and any value it never saw)
to its generic prediction."""

WITHIN = 0.25
"""Relative tolerance of the "within ±25%" accuracy."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class LengthExample:
    """One (prompt, answer) pair; lengths are in :data:`~throttllem._length.tokens.TOKEN_RULE`
    tokens."""

    prompt: str
    task: str
    generator: str
    output_tokens: int
    prompt_tokens: int


def resolve_data_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Files named directly, plus every ``*.json`` in a named folder (sorted).

    A relative path that does not exist is also tried under the project's data folder
    (``throttllem._data.data_dir()``), so ``--data alpaca-eval-outputs`` works.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() and not path.is_absolute():
            from throttllem._data import data_dir  # noqa: PLC0415 (only when needed)

            try:
                candidate = data_dir() / path
            except ConfigError:
                candidate = path
            path = candidate if candidate.exists() else path
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise ConfigError(f"no *.json files in {path}")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"length data {raw} does not exist")
    if not out:
        raise ConfigError("no length data files given")
    return out


def load_examples(paths: Iterable[Path | str]) -> list[LengthExample]:
    """Read AlpacaEval-style JSON lists of ``{instruction, output, dataset?, generator?}``.

    The label is ``count_tokens(output)``; a missing ``generator`` defaults to the file stem and
    a missing ``dataset`` to :data:`UNKNOWN`. Raises ConfigError on a malformed file.
    """
    examples: list[LengthExample] = []
    for path in resolve_data_paths(paths):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read length data {path}: {exc}") from exc
        if not isinstance(rows, list):
            raise ConfigError(f"{path}: expected a JSON list of objects")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{path}[{i}]: expected an object")
            prompt, output = row.get("instruction"), row.get("output")
            if not isinstance(prompt, str) or not isinstance(output, str):
                raise ConfigError(f"{path}[{i}]: 'instruction' and 'output' must be strings")
            generator = row.get("generator") or path.stem
            task = row.get("dataset") or UNKNOWN
            examples.append(
                LengthExample(
                    prompt=prompt,
                    task=str(task),
                    generator=str(generator),
                    output_tokens=count_tokens(output),
                    prompt_tokens=count_tokens(prompt),
                )
            )
    if not examples:
        raise ConfigError("the length data files hold no examples")
    return examples


def is_heldout_prompt(prompt: str, *, seed: int, test_fraction: float) -> bool:
    """Deterministic split *by prompt text*: the same instruction is on the same side in every
    model file (so no test prompt is ever seen in training, whatever the generator)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction


def prompt_group(prompt: str, *, seed: int, folds: int) -> int:
    """Fold index of a prompt for grouped cross-fitting (independent of the test split)."""
    digest = hashlib.sha256(f"fold{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def length_metrics(
    true: Sequence[float] | FloatArray,
    median: Sequence[float] | FloatArray,
    upper: Sequence[float] | FloatArray | None = None,
) -> dict[str, float]:
    """MAE (tokens), MAPE, within-±25% accuracy of the median and, when given, the empirical
    coverage of the upper quantile (share of answers no longer than it)."""
    t = np.maximum(np.asarray(true, dtype=np.float64), 1.0)
    m = np.asarray(median, dtype=np.float64)
    err = np.abs(m - t)
    out = {
        "n": float(t.size),
        "mae": float(err.mean()) if t.size else float("nan"),
        "mape": float((err / t).mean()) if t.size else float("nan"),
        "within25": float((err <= WITHIN * t).mean()) if t.size else float("nan"),
    }
    if upper is not None:
        u = np.asarray(upper, dtype=np.float64)
        out["coverage_upper"] = float((t <= u).mean()) if t.size else float("nan")
        out["upper_over_median"] = float(np.median(u / np.maximum(m, 1.0))) if t.size else 0.0
    return out


def as_jsonable(obj: Any) -> Any:
    """Round floats for stable, readable JSON."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [as_jsonable(v) for v in obj]
    return obj

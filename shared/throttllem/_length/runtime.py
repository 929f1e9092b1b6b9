"""Serving the generation-length model: ONNX Runtime only (no scikit-learn).

>>> model = LengthModel.load("models/length", generator="Meta-Llama-3-8B-Instruct")
>>> median, upper = model.predict(["Write a haiku about GPUs."])

The model folder holds ``model.onnx`` (with its metadata), ``MODEL_CARD.md`` and
``metrics.json``; see :mod:`throttllem._length.train` for the graph's inputs and outputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from throttllem._data import models_dir
from throttllem._errors import ModelError
from throttllem._length.data import (
    CARD_FILE,
    INPUT_NAMES,
    METRICS_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    UNKNOWN,
)
from throttllem._length.tokens import TOKEN_RULE, count_tokens_many
from throttllem._onnx import onnx_session

DEFAULT_MODEL_DIR = models_dir() / "length"
"""The shipped model: ``models/length/`` at the repository root."""

FloatArray = npt.NDArray[np.float64]

_REQUIRED_METADATA = ("token_rule", "model_version", "quantiles", "train_mean_tokens")


def _broadcast(value: str | Sequence[str] | None, n: int, default: str, what: str) -> list[str]:
    if value is None:
        return [default] * n
    if isinstance(value, str):
        return [value] * n
    out = [v if v is not None else default for v in value]
    if len(out) != n:
        raise ValueError(f"{what}: {len(out)} values for {n} prompts")
    return out


class LengthModel:
    """A loaded length model; thread-compatible (one ONNX Runtime session, 1 intra-op thread).

    Use :meth:`load`; :meth:`predict` is batched.
    """

    def __init__(
        self, session: Any, path: Path, metadata: dict[str, str], *, generator: str | None = None
    ) -> None:
        self._session = session
        self.path = path
        self.metadata = dict(metadata)
        self.generator = generator or UNKNOWN
        self.model_version: str = metadata["model_version"]
        self.token_rule: str = metadata["token_rule"]
        self.quantiles: tuple[float, ...] = tuple(
            float(q) for q in metadata["quantiles"].split(",")
        )
        self.train_mean_tokens: float = float(metadata["train_mean_tokens"])
        self.generators: tuple[str, ...] = tuple(json.loads(metadata.get("generators", "[]")))
        self.tasks: tuple[str, ...] = tuple(json.loads(metadata.get("tasks", "[]")))

    def __repr__(self) -> str:
        return f"LengthModel({str(self.path)!r}, version={self.model_version!r})"

    @classmethod
    def load(cls, path: Path | str | None = None, *, generator: str | None = None) -> LengthModel:
        """Load ``model.onnx`` from a model folder (or the file itself); default: the shipped
        model in ``models/length/``. ``generator`` is the default serving-model name for
        :meth:`predict` (unknown names get the model's generic prediction).

        Raises ModelError when the file is missing or corrupt, was trained with another token
        rule, or disagrees with the ``metrics.json`` / ``MODEL_CARD.md`` beside it.
        """
        p = Path(path) if path is not None else DEFAULT_MODEL_DIR
        file = p / MODEL_FILE if p.is_dir() else p
        if not file.is_file():
            raise ModelError(
                f"length model {file} does not exist (train it: throttllem train length)"
            )
        session = onnx_session(file, f"length model {file}")
        inputs = tuple(i.name for i in session.get_inputs())
        outputs = tuple(o.name for o in session.get_outputs())
        if inputs != INPUT_NAMES or outputs != (OUTPUT_NAME,):
            raise ModelError(
                f"{file} is not a throttLL'eM length model (inputs {inputs}, outputs {outputs})"
            )
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        missing = [k for k in _REQUIRED_METADATA if k not in metadata]
        if missing:
            raise ModelError(f"{file} lacks metadata {missing}")
        if metadata["token_rule"] != TOKEN_RULE:
            raise ModelError(
                f"{file} was trained with token rule {metadata['token_rule']!r}, "
                f"this code counts with {TOKEN_RULE!r}: retrain it"
            )
        _check_companions(file.parent, metadata["model_version"])
        return cls(session, file, metadata, generator=generator)

    def predict(
        self,
        prompts: Sequence[str],
        prompt_tokens: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        *,
        generator: str | Sequence[str] | None = None,
        task: str | Sequence[str] | None = None,
        max_tokens: int | Sequence[int | None] | None = None,
    ) -> tuple[FloatArray, FloatArray]:
        """Median and upper-quantile generation length (tokens, float64, ≥ 1) per prompt.

        ``prompt_tokens``: the prompts' token counts if known (else counted with the token
        rule). ``generator`` / ``task``: one value for all prompts or one per prompt (default:
        the model's ``generator``, unknown task). ``max_tokens``: the request's generation cap;
        both quantiles are clipped to it (None = no cap).
        """
        if isinstance(prompts, str):
            raise TypeError("predict() takes a sequence of prompts, not one string")
        n = len(prompts)
        if n == 0:
            return np.zeros(0), np.zeros(0)
        feeds = self.make_feeds(prompts, prompt_tokens, generator=generator, task=task)
        out = np.asarray(self._session.run([OUTPUT_NAME], feeds)[0], dtype=np.float64)
        median, upper = out[:, 0].copy(), out[:, 1].copy()
        if max_tokens is not None:
            caps = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
            if len(caps) != n:
                raise ValueError(f"max_tokens: {len(caps)} values for {n} prompts")
            cap = np.asarray([np.inf if c is None else max(float(c), 1.0) for c in caps])
            np.minimum(median, cap, out=median)
            np.minimum(upper, cap, out=upper)
        return median, upper

    def make_feeds(
        self,
        prompts: Sequence[str],
        prompt_tokens: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        *,
        generator: str | Sequence[str] | None = None,
        task: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The ONNX inputs for a batch (see :meth:`predict` for the arguments)."""
        n = len(prompts)
        if prompt_tokens is None:
            ntok = count_tokens_many(prompts).astype(np.float32)
        else:
            ntok = np.asarray(prompt_tokens, dtype=np.float32).reshape(-1)
            if ntok.size != n:
                raise ValueError(f"prompt_tokens: {ntok.size} values for {n} prompts")
        return {
            "prompt": np.asarray(list(prompts), dtype=object).reshape(-1, 1),
            "generator": np.asarray(
                _broadcast(generator, n, self.generator, "generator"), dtype=object
            ).reshape(-1, 1),
            "task": np.asarray(_broadcast(task, n, UNKNOWN, "task"), dtype=object).reshape(-1, 1),
            "prompt_tokens": ntok.reshape(-1, 1),
        }

    def run_session(self, feeds: dict[str, Any]) -> FloatArray:
        """The bare ONNX Runtime call, ``[N, 2]`` (benchmarks: model-only time)."""
        return np.asarray(self._session.run([OUTPUT_NAME], feeds)[0], dtype=np.float64)


def _check_companions(folder: Path, version: str) -> None:
    """metrics.json / MODEL_CARD.md beside the model, when present, must describe it."""
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        try:
            recorded = json.loads(metrics.read_text(encoding="utf-8")).get("model_version")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise ModelError(f"{metrics} is unreadable: {exc}") from exc
        if recorded != version:
            raise ModelError(
                f"{metrics} describes model {recorded!r}, the ONNX file is {version!r}"
            )
    card = folder / CARD_FILE
    if card.is_file() and version not in card.read_text(encoding="utf-8", errors="replace"):
        raise ModelError(f"{card} does not describe model {version!r}")


def read_metrics(path: Path | str | None = None) -> dict[str, Any]:
    """``metrics.json`` of a model folder (default: the shipped model); ModelError if absent."""
    p = Path(path) if path is not None else DEFAULT_MODEL_DIR
    file = p / METRICS_FILE if p.is_dir() else p
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read length-model metrics {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{file} is not a JSON object")
    return data

"""Oracle length predictions for trace replay, where requests carry their true generation
length but no prompt text (e.g. the Azure LLM traces).

Error models (``relative_error``):

* ``0.0``: the true length, exactly.
* ``e > 0`` with ``distribution="uniform"`` (default; the paper's sensitivity study injects
  0%, 15% and 30%): ``pred = true × (1 + u)``, ``u ~ Uniform(-e, +e)``, so every prediction is
  within ±e of the truth, the mean absolute relative error is e/2 and its standard deviation
  e/√3.
* ``e > 0`` with ``distribution="lognormal"``: ``pred = true × exp(e·z)``, ``z ~ N(0, 1)``
  (unbounded, symmetric in log space).
* ``"measured"``: ``pred = true × r`` with ``r`` drawn from the real model's empirical
  distribution of median/true on held-out prompts (the ``error_distribution`` quantiles in
  ``metrics.json``, interpolated linearly).

The ``median`` returned is that noisy prediction; ``upper`` is what a calibrated predictor
that knows the error model would report as the 90% quantile of the true length given the
prediction: ``pred / q₀.₁(r)`` (uniform: ``pred / (1 - 0.8e)``; lognormal:
``pred · exp(1.2816 e)``; measured: from the stored quantiles). With 0% error both equal the
truth.

Pure and seeded: the noise of a request is a hash of ``(seed, key)`` where ``key`` is the
request's id (``keys=``) or, by default, its position in the call; the same inputs always give
the same outputs, independent of batching when keys are given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from throttllem._errors import ConfigError, ModelError

FloatArray = npt.NDArray[np.float64]
U64 = npt.NDArray[np.uint64]

UPPER_LEVEL = 0.9
_Z90 = 1.2815515655446004  # standard normal 0.9 quantile

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: U64) -> U64:
    """SplitMix64 finalizer, vectorized (uint64 arithmetic wraps modulo 2**64)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    out: U64 = z ^ (z >> np.uint64(31))
    return out


def _uniforms(seed: int, keys: U64, stream: int) -> FloatArray:
    """Uniform (0, 1) numbers, one per key, a pure function of (seed, key, stream)."""
    base = np.uint64((seed * 0x2545F4914F6CDD1D + stream * 0x632BE59BD9B4E019) % 2**64)
    with np.errstate(over="ignore"):
        h = _splitmix64(_splitmix64(keys ^ base) + np.uint64(stream))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(2**53)


def _key_array(keys: Sequence[int | str] | None, n: int) -> U64:
    if keys is None:
        return np.arange(n, dtype=np.uint64)
    if len(keys) != n:
        raise ValueError(f"keys: {len(keys)} values for {n} lengths")
    out = np.empty(n, dtype=np.uint64)
    for i, k in enumerate(keys):
        if isinstance(k, str):
            out[i] = int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big")
        else:
            out[i] = int(k) % 2**64
    return out


def parse_length_error(value: str, *, option: str = "--length-error") -> float | str:
    """An oracle's error as users write it: a relative error (`0.15` or `15%`) or `measured`
    (the real model's error distribution); ConfigError naming `option` otherwise."""
    text = value.strip()
    if text.lower() == "measured":
        return "measured"
    try:
        error = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError as e:
        raise ConfigError(f"{option} takes a relative error (0, 0.15, 0.3 or 15%) or "
                          f"'measured', not {value!r}") from e
    if not 0.0 <= error < 1.0:
        raise ConfigError(f"{option} relative error must be in [0, 1), got {error}")
    return error


class OraclePredictor:
    """True lengths with injected relative error; same ``(median, upper)`` contract as
    :meth:`throttllem._length.runtime.LengthModel.predict`, but fed true lengths."""

    def __init__(
        self,
        relative_error: float | Literal["measured"] = 0.0,
        seed: int = 0,
        *,
        distribution: Literal["uniform", "lognormal"] = "uniform",
        metrics: dict[str, Any] | Path | str | None = None,
    ) -> None:
        """``metrics``: for ``"measured"``, the model's ``metrics.json`` (a dict, a file or a
        model folder; default: the shipped model)."""
        self.seed = int(seed)
        self.distribution = distribution
        self._levels: FloatArray | None = None
        self._ratios: FloatArray | None = None
        if relative_error == "measured":
            self.relative_error: float | str = "measured"
            self._levels, self._ratios = _load_ratio_quantiles(metrics)
        elif isinstance(relative_error, int | float) and not isinstance(relative_error, bool):
            e = float(relative_error)
            if not 0.0 <= e < 1.0:
                raise ConfigError(f"relative_error must be in [0, 1) or 'measured', got {e}")
            if distribution not in ("uniform", "lognormal"):
                raise ConfigError(f"unknown error distribution {distribution!r}")
            self.relative_error = e
        else:
            raise ConfigError(
                f"relative_error must be a number or 'measured', got {relative_error!r}"
            )

    def __repr__(self) -> str:
        return (
            f"OraclePredictor(relative_error={self.relative_error!r}, seed={self.seed}, "
            f"distribution={self.distribution!r})"
        )

    def ratios(self, n: int, keys: Sequence[int | str] | None = None) -> FloatArray:
        """The multiplicative error ``pred / true`` drawn for ``n`` requests."""
        k = _key_array(keys, n)
        if self.relative_error == "measured":
            assert self._levels is not None
            assert self._ratios is not None
            return np.interp(_uniforms(self.seed, k, 1), self._levels, self._ratios)
        e = float(self.relative_error)
        if e == 0.0:
            return np.ones(n)
        if self.distribution == "uniform":
            return 1.0 + e * (2.0 * _uniforms(self.seed, k, 1) - 1.0)
        u1, u2 = _uniforms(self.seed, k, 1), _uniforms(self.seed, k, 2)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
        return np.exp(e * z)

    def upper_factor(self) -> float:
        """``upper / median``: 1 / (the 10% quantile of pred/true)."""
        if self.relative_error == "measured":
            assert self._levels is not None
            assert self._ratios is not None
            return float(1.0 / np.interp(1.0 - UPPER_LEVEL, self._levels, self._ratios))
        e = float(self.relative_error)
        if self.distribution == "uniform":
            return 1.0 / (1.0 - e * (2.0 * UPPER_LEVEL - 1.0))
        return float(np.exp(e * _Z90))

    def predict(
        self,
        true_lengths: Sequence[int] | npt.NDArray[np.integer[Any]] | npt.NDArray[np.floating[Any]],
        *,
        keys: Sequence[int | str] | None = None,
    ) -> tuple[FloatArray, FloatArray]:
        """(median, upper) per request, floats ≥ 1. ``keys``: request ids (default: positions)."""
        t = np.asarray(true_lengths, dtype=np.float64).reshape(-1)
        if t.size and (not np.all(np.isfinite(t)) or t.min() < 0):
            raise ValueError("true lengths must be finite and non-negative")
        median = np.maximum(t * self.ratios(t.size, keys), 1.0)
        upper = np.maximum(median * self.upper_factor(), median)
        return median, upper


def _load_ratio_quantiles(
    metrics: dict[str, Any] | Path | str | None,
) -> tuple[FloatArray, FloatArray]:
    if not isinstance(metrics, dict):
        from throttllem._length.runtime import read_metrics  # noqa: PLC0415

        metrics = read_metrics(metrics)
    dist = metrics.get("error_distribution")
    if not isinstance(dist, dict):
        raise ModelError("metrics hold no 'error_distribution'")
    try:
        levels = np.asarray(dist["levels"], dtype=np.float64)
        ratios = np.asarray(dist["ratio_pred_over_true"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError("metrics hold no usable 'error_distribution'") from exc
    ok = (
        levels.ndim == 1
        and levels.shape == ratios.shape
        and levels.size >= 2
        and np.all(np.diff(levels) > 0)
        and np.all(np.diff(ratios) >= 0)
        and levels[0] == 0.0
        and levels[-1] == 1.0
        and ratios[0] > 0
    )
    if not ok:
        raise ModelError("'error_distribution' must be increasing quantiles from level 0 to 1")
    return levels, ratios

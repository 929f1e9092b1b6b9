"""Performance models: how long one engine iteration takes at a given SM clock.

The forecaster projects iteration *shapes* (decode batch, KV tokens read, prefill tokens);
a `PerfModel` turns shapes into seconds for many clocks at once. Implementations: the affine
roofline below (cheap, monotone, used by tests and as a baseline), an adapter around any
function (`FunctionPerfModel`, e.g. the twin's `clockmodel.iteration_time_s`), and later the
ONNX gradient-boosted model and a precompiled grid. The core never imports the twin.

Contract: numpy broadcasting, finite seconds > 0. The SLO check calls it with pass rows of
shape (1, T) and clocks of shape (C, 1) and expects (C, T) back (clock-major: element-wise
models then run long inner loops over passes, ≈2× faster than (T, 1) × (1, C)); any
broadcastable shapes work.

`is_monotone_in_clock` probes a model once per (model, clock list) and caches the answer:
the clock search may binary-search only when a higher clock never makes an iteration slower.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
AnyArray = npt.NDArray[Any]


@runtime_checkable
class PerfModel(Protocol):
    """Seconds per iteration, vectorized over broadcastable shapes and clocks."""

    def iteration_time_s(self, batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                         clock_mhz: AnyArray) -> AnyArray:
        """`batch` decoding sequences, `kv_tokens` = Σ their contexts, `prefill_tokens` new
        prompt tokens in the pass; returns seconds at `clock_mhz` (broadcast shape)."""
        ...


@runtime_checkable
class PreparedPerfModel(Protocol):
    """A `PerfModel` whose query splits into a clock-independent part, done once per set of
    passes, and a per-clock part. A clock search asks for the same passes round after round
    at other clocks: the SLO check prepares a problem's passes once and then asks only for
    clocks. Both methods give exactly `iteration_time_s`'s values."""

    def prepare_passes(self, rows: FloatArray) -> Any | None:
        """Prepare passes given as a (3, T) or (4, T) float64 array (rows: decoding
        sequences, KV tokens, prefill tokens, and Σ prompt² of the pass's prefills, which a
        model without that input ignores); None when this model has nothing to prepare (then
        the caller uses `iteration_time_s`). The rows must not change while it is in use."""
        ...

    def prepared_time_s(self, prepared: Any, clocks_mhz: FloatArray) -> FloatArray:
        """(C, T) seconds of the prepared passes at `clocks_mhz` (1-D)."""
        ...


PerfFunction = Callable[[AnyArray, AnyArray, AnyArray, AnyArray], AnyArray]


class FunctionPerfModel:
    """Wrap `fn(batch, kv_tokens, prefill_tokens, clock_mhz) -> seconds` as a `PerfModel`.

    A plain class (not a slotted dataclass) so it can be weak-referenced by the monotonicity
    cache.
    """

    def __init__(self, fn: PerfFunction, *, name: str = "",
                 prepared: PreparedPerfModel | None = None) -> None:
        self._fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        # A model giving `fn`'s values through `PreparedPerfModel` (e.g. the runtime whose
        # method `fn` is), used for prepared queries; None: every query goes to `fn`.
        self._prepared = prepared

    def iteration_time_s(self, batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                         clock_mhz: AnyArray) -> AnyArray:
        return self._fn(batch, kv_tokens, prefill_tokens, clock_mhz)

    def prepare_passes(self, rows: FloatArray) -> Any | None:
        """`PreparedPerfModel`, when a model was given for it (else None: use `fn`)."""
        return None if self._prepared is None else self._prepared.prepare_passes(rows)

    def prepared_time_s(self, prepared: Any, clocks_mhz: FloatArray) -> FloatArray:
        assert self._prepared is not None  # prepare_passes gave something to query
        return self._prepared.prepared_time_s(prepared, clocks_mhz)

    def __repr__(self) -> str:
        return f"FunctionPerfModel({self.name})"


@dataclass(frozen=True)
class AffinePerfModel:
    """t = fixed + memory-bound part + compute-bound part · f_ref/f.

    memory part  = mem_s + kv_s_per_token · kv_tokens                  (HBM, clock-independent)
    compute part = cpu_s + batch_s · batch + prefill_s_per_token · prefill_tokens   (∝ 1/f)

    Monotone non-increasing in the clock by construction. Defaults are round numbers of the
    H100/Llama-3-8B order (≈7 ms batch-1 decode, ≈20 µs per prefill token at the top clock),
    not a fit: use it where a cheap, obviously monotone model is wanted.
    """

    mem_s: float = 5.5e-3
    kv_s_per_token: float = 4.4e-8
    cpu_s: float = 1.2e-3
    batch_s: float = 2.0e-5
    prefill_s_per_token: float = 2.0e-5
    ref_clock_mhz: float = 1980.0

    def iteration_time_s(self, batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                         clock_mhz: AnyArray) -> AnyArray:
        mem = self.mem_s + self.kv_s_per_token * kv_tokens
        work = self.cpu_s + self.batch_s * batch + self.prefill_s_per_token * prefill_tokens
        return np.asarray(mem + work * (self.ref_clock_mhz / clock_mhz))


# --------------------------------------------------------------------------- monotonicity

_PROBE_BATCH: Final = (0.0, 1.0, 2.0, 8.0, 32.0, 128.0, 256.0, 1024.0)
_PROBE_KV: Final = (0.0, 1e3, 3e4, 2e5, 1e6)
_PROBE_PREFILL: Final = (0.0, 64.0, 2048.0, 16384.0)

# model -> {clock tuple: monotone?}; weak keys so models are not kept alive by the cache.
_MONOTONE_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], bool]] = (
    weakref.WeakKeyDictionary())


# The last answer of `is_monotone_in_clock` (model, clock tuple, answer): every clock search
# asks again for the same pair, and hashing a 110-clock tuple costs more than the search's
# arithmetic on a small instance.
_LAST_MONOTONE: list[tuple[weakref.ref[Any], tuple[int, ...], bool] | None] = [None]


def _probe_monotone(model: PerfModel, clocks_mhz: tuple[int, ...]) -> bool:
    b, kv, pf = np.meshgrid(_PROBE_BATCH, _PROBE_KV, _PROBE_PREFILL, indexing="ij")
    clocks = np.asarray(clocks_mhz, dtype=np.float64)[None, :]
    t = np.asarray(model.iteration_time_s(b.reshape(-1, 1), kv.reshape(-1, 1),
                                          pf.reshape(-1, 1), clocks), dtype=np.float64)
    if t.shape != (b.size, clocks.size) or not np.all(np.isfinite(t)) or np.any(t <= 0):
        return False
    return bool(np.all(np.diff(t, axis=1) <= 0.0))


def is_monotone_in_clock(model: PerfModel, clocks_mhz: tuple[int, ...]) -> bool:
    """Whether iteration time never rises with the clock, on a probe grid of shapes (batch
    0–1024, KV 0–1M tokens, prefill 0–16k tokens) × every clock. Probed once per model and
    clock list and cached; models that cannot be weak-referenced are probed on every call.

    A probe is evidence, not proof: a model that turns non-monotone only between probe
    points passes. The shipped models are monotone by construction or by their tests.
    """
    base = getattr(model, "monotone_as", None)
    if base is not None:  # a wrapper that preserves its base model's monotonicity
        return is_monotone_in_clock(base, clocks_mhz)
    last = _LAST_MONOTONE[0]
    if last is not None and last[1] is clocks_mhz and last[0]() is model:
        return last[2]  # the same model and the very same clock tuple as last time
    try:
        per_model = _MONOTONE_CACHE.get(model)
    except TypeError:  # not weak-referenceable
        return _probe_monotone(model, clocks_mhz)
    if per_model is None:
        per_model = {}
        _MONOTONE_CACHE[model] = per_model
    known = per_model.get(clocks_mhz)
    if known is None:
        known = _probe_monotone(model, clocks_mhz)
        per_model[clocks_mhz] = known
    _LAST_MONOTONE[0] = (weakref.ref(model), clocks_mhz, known)
    return known


# --------------------------------------------------------------------------- future prefills

# Shape at which the marginal cost of one prefill token is read off a model: a mid-sized
# decode batch with 1k-token contexts, 2k prompt tokens added (a typical mixed pass).
_PREFILL_PROBE: Final = (32.0, 32.0 * 1024, 2048.0)
_PREFILL_COST_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], FloatArray]] = (
    weakref.WeakKeyDictionary())
# The most of a pass's time that arrivals' prefills may take; beyond it an instance cannot
# keep up at that clock, and its passes are taken as 10× slower (infeasible).
MAX_PREFILL_SHARE: Final = 0.9


# The last answer of `prefill_s_per_token` (model, clock tuple, cost): the controller asks
# again for the same pair every time an instance's arrival rate changes.
_LAST_PREFILL_COST: list[tuple[weakref.ref[Any], tuple[int, ...], FloatArray] | None] = [None]


def prefill_s_per_token(model: PerfModel, clocks_mhz: tuple[int, ...]) -> FloatArray:
    """Seconds one more prefill token adds to a pass, at each of `clocks_mhz` (ascending),
    made non-increasing in the clock; cached per model and clock list."""
    last = _LAST_PREFILL_COST[0]
    if last is not None and last[1] is clocks_mhz and last[0]() is model:
        return last[2]
    cost = _prefill_s_per_token(model, clocks_mhz)
    with contextlib.suppress(TypeError):  # not weak-referenceable: no fast path
        _LAST_PREFILL_COST[0] = (weakref.ref(model), clocks_mhz, cost)
    return cost


def _prefill_s_per_token(model: PerfModel, clocks_mhz: tuple[int, ...]) -> FloatArray:
    try:
        per_model = _PREFILL_COST_CACHE.setdefault(model, {})
    except TypeError:
        per_model = {}
    cached = per_model.get(clocks_mhz)
    if cached is not None:
        return cached
    batch, kv, prefill = _PREFILL_PROBE
    clocks = np.asarray(clocks_mhz, dtype=np.float64)
    with_pf = np.asarray(model.iteration_time_s(np.array(batch), np.array(kv),
                                                np.array(prefill), clocks), dtype=np.float64)
    without = np.asarray(model.iteration_time_s(np.array(batch), np.array(kv), np.array(0.0),
                                                clocks), dtype=np.float64)
    cost = np.maximum((with_pf - without) / prefill, 0.0)
    cost = np.minimum.accumulate(cost)  # never rises with the clock
    per_model[clocks_mhz] = cost
    return cost


class ArrivalPrefillPerf:
    """`base`, with every pass stretched by the prefills of requests that will arrive while
    it runs: at `prefill_tokens_per_s` of arriving prompt tokens, a fraction
    ρ·p(f) of the time goes to their prefills (p: `prefill_s_per_token`), so a pass that
    takes T alone takes T / (1 − ρ·p(f)) on average.

    A projection sees only the requests admitted so far; the engine keeps admitting, and
    every admitted prompt is prefilled inside the running requests' passes. Ignoring that
    makes the search choose clocks at which TBT is missed as soon as load is steady. The
    factor is non-increasing in the clock, so the wrapper is monotone where `base` is
    (`monotone_as`), and one call costs `base`'s plus one multiply.
    """

    def __init__(self, base: PerfModel, prefill_tokens_per_s: float,
                 clocks_mhz: tuple[int, ...]) -> None:
        self.base = base
        self.monotone_as = base
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self._clocks = _clock_vector(clocks_mhz)
        share = prefill_tokens_per_s * prefill_s_per_token(base, clocks_mhz)
        self._factor = np.where(share < MAX_PREFILL_SHARE, 1.0 / (1.0 - share), 10.0)
        self._stretch_at: dict[bytes, AnyArray] = {}  # clock vector bytes -> (C, 1) factors
        # clock vector bytes -> positions in `clocks_mhz` (None: some clock is not there),
        # shared by every wrapper on the same clock tuple: the controller builds a new
        # wrapper whenever an instance's arrival rate changes
        self._positions = _clock_positions(clocks_mhz)

    def stretch(self, clock_mhz: AnyArray) -> AnyArray:
        """The factor at `clock_mhz` (supported clocks; others are interpolated)."""
        return np.interp(clock_mhz, self._clocks, self._factor)

    def iteration_time_s(self, batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                         clock_mhz: AnyArray,
                         prefill_attn_tokens2: AnyArray | None = None) -> AnyArray:
        """`base`'s seconds, stretched; `prefill_attn_tokens2` (Σ prompt²) goes to `base`
        when given (then `base` must take it, as `PerfRuntime` does)."""
        if prefill_attn_tokens2 is None:
            base = self.base.iteration_time_s(batch, kv_tokens, prefill_tokens, clock_mhz)
        else:
            base = self.base.iteration_time_s(  # type: ignore[call-arg]
                batch, kv_tokens, prefill_tokens, clock_mhz, prefill_attn_tokens2)
        return np.asarray(base * self.stretch(np.asarray(clock_mhz, dtype=np.float64)))

    def prepare_passes(self, rows: FloatArray) -> Any | None:
        """`PreparedPerfModel`: the base model's preparation (the stretch is per clock)."""
        prepare = getattr(self.base, "prepare_passes", None)
        return None if prepare is None else prepare(rows)

    def prepared_time_s(self, prepared: Any, clocks_mhz: FloatArray) -> FloatArray:
        base = self.base.prepared_time_s(prepared, clocks_mhz)  # type: ignore[attr-defined]
        key = clocks_mhz.tobytes()
        factor = self._stretch_at.get(key)
        if factor is None:  # a search asks for a few clock sets again and again
            factor = self._stretch_column(key, clocks_mhz)
            if len(self._stretch_at) >= 256:
                self._stretch_at.clear()
            self._stretch_at[key] = factor
        stretched: FloatArray = base * factor
        return stretched

    def _stretch_column(self, key: bytes, clocks_mhz: FloatArray) -> AnyArray:
        """`stretch` at a clock vector, as a (C, 1) column. At clocks of the wrapper's own
        list that is the factor there, read by position: `np.interp` at a node returns the
        node's value exactly, so both give the same numbers."""
        pos = self._positions.get(key, False)
        if pos is False:
            idx = np.searchsorted(self._clocks, clocks_mhz)
            pos = (idx if bool(np.all(idx < self._clocks.size))
                   and bool(np.array_equal(self._clocks[np.minimum(idx, self._clocks.size - 1)],
                                           clocks_mhz)) else None)
            if len(self._positions) >= 256:
                self._positions.clear()
            self._positions[key] = pos
        if pos is None:
            return self.stretch(clocks_mhz.reshape(-1, 1))
        column: AnyArray = self._factor[pos].reshape(-1, 1)
        return column


# (clock tuple, its float64 vector, clock vector bytes -> positions) of the last clock tuple
# seen by `ArrivalPrefillPerf`: see `_clock_positions`.
_LAST_CLOCKS: list[tuple[tuple[int, ...], FloatArray, dict[bytes, Any]] | None] = [None]


def _clock_vector(clocks_mhz: tuple[int, ...]) -> FloatArray:
    last = _LAST_CLOCKS[0]
    if last is None or last[0] is not clocks_mhz:
        last = (clocks_mhz, np.asarray(clocks_mhz, dtype=np.float64), {})
        _LAST_CLOCKS[0] = last
    return last[1]


def _clock_positions(clocks_mhz: tuple[int, ...]) -> dict[bytes, Any]:
    """The positions cache shared by the wrappers on one clock tuple (the last one seen)."""
    last = _LAST_CLOCKS[0]
    if last is None or last[0] is not clocks_mhz:
        _clock_vector(clocks_mhz)
        last = _LAST_CLOCKS[0]
        assert last is not None
    return last[2]

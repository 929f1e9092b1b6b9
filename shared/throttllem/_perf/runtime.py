"""Serving the performance model: ONNX Runtime only (no scikit-learn), and a precompiled grid.

>>> perf = PerfRuntime.load("models/perf/h100-llama3-8b-tp1")
>>> perf.iteration_time_s(batch[:, None], kv[:, None], prefill[:, None], clocks[None, :])

`PerfRuntime` satisfies `throttllem._core.perf.PerfModel`: numpy broadcasting over (batch,
kv_tokens, prefill_tokens, clock_mhz), seconds back, finite and > 0.

Two ways to answer
------------------
* **ONNX** (`PerfRuntime.predict_onnx`): the exported graph, one ``session.run`` on an
  [N, 4] array (1 intra-op thread). Exact — it *is* the model — but a 100-tree ensemble costs
  about a microsecond per point, so evaluating every clock of a forecast (2,000 future
  iterations × 110 clocks) takes a few hundred milliseconds: far too slow for a decision per
  arrival.
* **Grid** (`PerfRuntime.iteration_time_s` once `compile_grid` ran; the default of
  `PerfRuntime.load`): at load time (a second or two, some 18 MB of float32 for the 8B
  setup; cached per model in the process) the ONNX model is evaluated once on a dense grid
  over (batch, KV tokens, prefill tokens, supported clock): every integer batch 0…max × 33
  KV points for decode-only iterations, and a coarser (17 batch × 17 KV × 26 prefill) grid
  for iterations that prefill. Its domain is the setup's (`_perf.train` writes it into the
  model): batch up to the engine's max batch, KV up to its KV capacity, prefill up to the
  larger of the pass's token budget and the longest prompt (the first prefill of a pass may
  exceed the budget), each at least the training data's largest value; that is all a
  projection of that setup asks for, unless it overflows the KV cache. A decode-only
  iteration costs two gathers and one convex combination along KV; one that prefills, a
  trilinear combination of 8. The grid is made monotone (non-increasing) in the clock by a
  running maximum from the top clock down, which only ever raises a time (conservative for
  SLOs), and the interpolation keeps it so bit for bit (non-negative weights, same operation
  order for every clock), so the clock search may bisect
  (`throttllem._core.perf.is_monotone_in_clock` holds; it does not for raw ONNX, whose trees
  wiggle by a fraction of a percent).

**The forecaster uses the grid**: hundreds of times cheaper for the controller's queries,
monotone by construction, and as accurate as the model it tabulates (figures: README,
"Profile and train a new setup", from ``benchmarks/bench_perf.py``). ONNX stays the
reference (``perf score`` scores the ONNX model; ``--grid`` scores the grid too) and answers
clocks beyond the grid's range.

Queries, fast
-------------
The controller asks for a few clocks at a time (a secant round: 2), over the same projected
passes round after round. So: the decode table is also kept clock-major, [C, B, K] (a
clock's slab is 34 kB: a few-clock query gathers in cache); a query in the controller's
layout, clocks (C, 1) × passes (1, T), is answered (C, T) contiguous; and what does not
depend on the clock (cells, weights, the points beyond the edge) is computed once per set
of passes and reused while the next query asks for exactly the same values (compared in
full, never by identity: `PerfRuntime._prepared`). A query's cost therefore grows with the
clocks it asks for, so a search that probes a few clocks per round is cheaper than one scan
of all 110: that is why the forecaster keeps the clock search's "auto" strategy (the secant
search) with the grid (`benchmarks/bench_controller.py` times every strategy on the same
decisions, "onnx grid" rows).

Beyond the grid's edge
----------------------
Points outside the grid (an overflowing projection, an engine larger than the setup, the
monotonicity probe's batch-1024 shapes) never call ONNX: t(x, f) = K(x_c, f) · base(x, f),
with x_c = x clamped to the edge coordinate by coordinate, base the model's roofline
baseline (coefficients from metrics.json: ``baseline_coef``) and K = t/base the trees'
correction, tabulated beside the grid from the raw ONNX times; then the same running max
over the clock. That is what the ONNX model answers there, made monotone the same way: the
trees see features at or below the training data's largest values, the edge is at or beyond
those, so past the edge the model *is* its baseline times the edge's correction. So the
extrapolation is the model's own, straight lines in batch, KV and prefill (p² for
attention) from the edge, and **unvalidated**: no training row was there. Without the
baseline (a bare .onnx file with no metrics.json beside it) points outside go to ONNX.

Files in a model folder: ``model.onnx`` (metadata_props: setup, trained ranges, grid domain),
``metrics.json`` (its ``model_sha256`` must match the ONNX file, else ModelError),
``MODEL_CARD.md``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from throttllem._core.perf import FunctionPerfModel, PerfModel
from throttllem._data import models_dir
from throttllem._errors import ModelError
from throttllem._onnx import onnx_session

MODEL_FILE: Final = "model.onnx"
CARD_FILE: Final = "MODEL_CARD.md"
METRICS_FILE: Final = "metrics.json"
FORMAT_VERSION: Final = "1"
FEATURES: Final = ("batch", "kv_tokens", "prefill_tokens", "clock_mhz")
# The optional fifth input: Σ L² over the prompts L a pass prefills (causal prefill attention
# costs that). A model trained with it lists it last in its features; one trained without
# it assumes every pass prefills one prompt (Σ L² = prefill_tokens²).
ATTENTION_FEATURE: Final = "prefill_attn_tokens2"
ATTENTION_FEATURES: Final = (*FEATURES, ATTENTION_FEATURE)
INPUT_NAME: Final = "X"
OUTPUT_NAME: Final = "iteration_time_s"
DEFAULT_MODEL_ROOT: Final = models_dir() / "perf"
# The baseline's terms, in the order of its coefficients (= throttllem._perf.train.BASIS_TERMS).
# "r*p^2" is the attention term of a model without the attention input, "r*a2" (a2 = Σ L²)
# that of a model with it; each model uses one of the two (the other's coefficient is 0).
BASELINE_TERMS: Final = ("1", "kv", "b", "p", "r", "r*kv", "r*b", "r*p", "r*p^2", "r*a2")
_ATTENTION_TERMS: Final = frozenset({"r*p^2", "r*a2"})
_PASS_ROW_NAMES: Final = (*FEATURES[:3], ATTENTION_FEATURE)
# Σ prompt² at which the grid reads a model's attention slope off ONNX (t is linear in it).
_ATTENTION_PROBE_TOKENS2: Final = 1e8
_REQUIRED_METADATA: Final = (
    "throttllem.perf.format", "setup", "features", "trained_clock_min_mhz",
    "trained_clock_max_mhz", "grid_batch_max", "grid_kv_max", "grid_prefill_max",
    "grid_clock_min_mhz", "grid_clock_max_mhz", "grid_clock_step_mhz",
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
AnyArray = npt.NDArray[Any]

# Grid axes. KV is uniform (iteration time is close to linear in KV); batch and prefill are
# dense where the roofline bends (small batches, short prefills) and geometric above.
GRID_DECODE_KV_POINTS: Final = 33
GRID_MIXED_KV_POINTS: Final = 17
# Compiled grids by model sha256: a process that loads the same model again (several
# forecaster instances, tests) does not pay the compile twice. Grids are read-only.
_GRID_CACHE_SIZE: Final = 4
_GRID_CACHE: dict[str, PerfGrid] = {}
# Up to this many points that prefill, the grid locates their cells on Python floats.
_SCALAR_MIXED_POINTS: Final = 8
_PREFILL_AXIS: Final = (0, 16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768,
                        1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)


# --------------------------------------------------------------------------- metrics


class Metrics(NamedTuple):
    """Accuracy as the paper reports it: on iterations per second (1 / iteration time)."""

    n: int
    r2: float
    mape_pct: float
    mae_iters_per_s: float
    time_mape_pct: float
    p99_ape_pct: float
    max_ape_pct: float
    mape_by_phase: dict[str, float]

    def line(self) -> str:
        return f"R2={self.r2:.4f} MAPE={self.mape_pct:.2f}% MAE={self.mae_iters_per_s:.3f} iters/s"


def compute_metrics(true_s: npt.ArrayLike, pred_s: npt.ArrayLike,
                    phases: Sequence[str] | AnyArray | None = None) -> Metrics:
    """R² / MAPE / MAE on iterations per second, plus time MAPE and tail errors."""
    t = np.asarray(true_s, dtype=np.float64).ravel()
    p = np.asarray(pred_s, dtype=np.float64).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError("true and predicted times must be non-empty and of one length")
    y, yh = 1.0 / t, 1.0 / p
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - yh) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan
    ape = np.abs(yh - y) / y * 100.0
    by_phase: dict[str, float] = {}
    if phases is not None:
        ph = np.asarray(phases)
        for kind in sorted(set(ph.tolist())):
            by_phase[str(kind)] = float(ape[ph == kind].mean())
    return Metrics(n=int(t.size), r2=r2, mape_pct=float(ape.mean()),
                   mae_iters_per_s=float(np.abs(yh - y).mean()),
                   time_mape_pct=float((np.abs(p - t) / t).mean() * 100.0),
                   p99_ape_pct=float(np.percentile(ape, 99)), max_ape_pct=float(ape.max()),
                   mape_by_phase=by_phase)


# --------------------------------------------------------------------------- loading


def _resolve(path: str | Path | None) -> tuple[Path, Path | None]:
    """(model.onnx path, model folder or None when given the file itself)."""
    if path is None:
        raise ModelError("no performance model given; the shipped ones are under "
                         f"{DEFAULT_MODEL_ROOT} (e.g. {DEFAULT_MODEL_ROOT / 'h100-llama3-8b-tp1'})")
    p = Path(path)
    if p.is_dir():
        return p / MODEL_FILE, p
    if p.suffix == ".onnx":
        return p, None
    if not p.exists():
        named = DEFAULT_MODEL_ROOT / str(path)
        if named.is_dir():
            return named / MODEL_FILE, named
    return p / MODEL_FILE, p


# --------------------------------------------------------------------------- grid


def batch_axis(batch_max: float) -> FloatArray:
    """0…4 every 1, then 2 points per doubling (ratio ≤ 1.5), ending at `batch_max`."""
    top = max(1, math.ceil(batch_max))
    pts = list(range(min(top, 4) + 1))
    v, step = 4, 2
    while v < top:
        for _ in range(2):
            v += step
            if v >= top:
                break
            pts.append(v)
        step *= 2
    if pts[-1] != top:
        pts.append(top)
    return np.asarray(pts, dtype=np.float64)


def prefill_axis(prefill_max: float) -> FloatArray:
    top = max(16.0, float(math.ceil(prefill_max)))
    pts = [float(v) for v in _PREFILL_AXIS if v < top]
    v = pts[-1]
    while v * 1.25 < top:
        v *= 1.25
        pts.append(round(v))
    pts.append(top)
    return np.asarray(pts, dtype=np.float64)


def _locate(axis: FloatArray, x: FloatArray) -> tuple[IntArray, FloatArray]:
    """Cell index i (axis[i] ≤ x ≤ axis[i+1]) and weight w = (x − axis[i]) / width."""
    i = np.minimum(np.maximum(np.searchsorted(axis, x, side="right") - 1, 0), len(axis) - 2)
    lo = axis[i]
    w = (x - lo) / (axis[i + 1] - lo)
    return i.astype(np.int64), np.asarray(w, dtype=np.float64)


def _locate_uniform(axis: FloatArray, x: FloatArray) -> tuple[IntArray, FloatArray]:
    """`_locate` for an evenly spaced axis starting at 0: arithmetic, no search."""
    step = float(axis[1])
    u = x * (1.0 / step)
    i = np.minimum(u.astype(np.int64), len(axis) - 2)
    return i, u - i


class Baseline(NamedTuple):
    """The model's roofline baseline (`throttllem._perf.train`): seconds
    ``A + B·r``, r = ref/f, with ``A = c0 + c1·kv + c2·b + c3·p`` (clock-free work) and
    ``B = c4 + c5·kv + c6·b + c7·p + c8·p² + c9·a2`` (work ∝ 1/f; a2 = Σ prompt², p² when
    not given); all cᵢ ≥ 0, and c8 or c9 is 0 (`BASELINE_TERMS`)."""

    coef: tuple[float, ...]  # c0 … c9 for the unscaled basis, train.BASIS_TERMS order
    ref_clock_mhz: float

    @classmethod
    def from_terms(cls, terms: Mapping[str, float], ref_clock_mhz: float) -> Baseline | None:
        """From metrics.json's ``baseline_coef`` ({term: value}); None if it is not usable."""
        try:
            # a model has one of the two attention terms (older ones only "r*p^2")
            coef = tuple(float(terms[k] if k not in _ATTENTION_TERMS else terms.get(k, 0.0))
                         for k in BASELINE_TERMS)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not all(math.isfinite(c) and c >= 0 for c in coef) or not ref_clock_mhz > 0:
            return None
        return cls(coef, float(ref_clock_mhz))

    def r(self, clocks_mhz: FloatArray) -> FloatArray:
        return np.asarray(self.ref_clock_mhz / np.maximum(clocks_mhz, 1.0), dtype=np.float64)

    def parts(self, b: FloatArray, kv: FloatArray, p: FloatArray,
              a2: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
        """(A, B) per point (`a2`: Σ prompt², p² when None)."""
        c = self.coef
        a = c[0] + c[1] * kv + c[2] * b + c[3] * p
        p2 = p * p
        return a, (c[4] + c[5] * kv + c[6] * b + c[7] * p + c[8] * p2
                   + c[9] * (p2 if a2 is None else a2))


# (row index, weight of the lower KV node, weight of the upper one) of decode points, row
# index = batch · K_d + KV node; (8 corner rows, 8 weights [n, 8, 1]) of mixed points.
_DecodeCell = tuple[IntArray, npt.NDArray[np.float32], npt.NDArray[np.float32]]
_MixedCell = tuple[IntArray, npt.NDArray[np.float32]]


class PreparedPoints(NamedTuple):
    """`PerfGrid.prepare`: the clock-independent part of a query for n points."""

    n: int
    decode_cell: _DecodeCell  # every point (see PerfGrid.prepare)
    mixed: IntArray | None  # points answered by the mixed grid
    mixed_cell: _MixedCell | None
    # points beyond the edge and their seconds at every grid clock [m, C], monotone
    beyond: tuple[IntArray | slice, FloatArray] | None = None
    # Σ prompt² of the points answered by the mixed grid (a model with the attention input)
    attn: FloatArray | None = None


@dataclass(frozen=True, eq=False)
class PerfGrid:
    """The model tabulated once; see the module docstring.

    ``decode``: [B_d, K_d, C] seconds at prefill 0 on the axes ``decode_batch`` (every
    integer 0…batch_max, so decode queries only interpolate along KV) × ``decode_kv``;
    ``mixed``: [B_m, K_m, P, C] for iterations with prefill tokens (and non-integer batches).
    float32 (halves the bytes a query gathers; 7 significant digits is plenty for times);
    both non-increasing along C (ascending clocks). ``decode_by_clock`` is ``decode`` laid
    out [C, B_d, K_d]: a query for a few clocks then gathers within one 34 kB slab per
    clock (cache-resident) instead of across the whole table.

    ``baseline`` and the ``*_ext`` tables (shaped like ``decode`` and ``mixed``) extrapolate
    beyond the grid's edge: they hold the model's tree correction K = t / baseline at each
    node (from the raw ONNX times, before the monotone fix; see `PerfGrid.rows`). None when
    the model's baseline is unknown (then the runtime asks ONNX for points outside).
    """

    clocks: FloatArray
    decode_batch: FloatArray
    decode_kv: FloatArray
    decode: npt.NDArray[np.float32]
    mixed_batch: FloatArray
    mixed_kv: FloatArray
    prefill: FloatArray
    mixed: npt.NDArray[np.float32]
    baseline: Baseline | None = None
    decode_ext: npt.NDArray[np.float32] | None = None
    mixed_ext: npt.NDArray[np.float32] | None = None
    # A model with the attention input: ``mixed`` holds its times at Σ prompt² = 0 and this
    # table, shaped like it, the seconds each token² of Σ prompt² adds (the model is linear
    # in it); both non-increasing along C. None for a model without that input.
    mixed_attn: npt.NDArray[np.float32] | None = None
    decode_by_clock: npt.NDArray[np.float32] = field(init=False, repr=False)
    _corners: IntArray = field(init=False, repr=False)
    # (mixed batch axis, prefill axis, mixed KV step, corner offsets) as Python numbers,
    # for a few points
    _scalar_axes: tuple[list[float], list[float], float, list[int]] = field(init=False,
                                                                            repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decode_by_clock",
                           np.ascontiguousarray(np.moveaxis(self.decode, -1, 0)))
        _, nk, npf, _ = self.mixed.shape
        object.__setattr__(self, "_corners", np.asarray(
            [(db * nk + dk) * npf + dp for db, dk, dp in itertools.product((0, 1), repeat=3)],
            dtype=np.int64))
        object.__setattr__(self, "_scalar_axes", (self.mixed_batch.tolist(),
                                                  self.prefill.tolist(),
                                                  float(self.mixed_kv[1]),
                                                  self._corners.tolist()))

    @property
    def nbytes(self) -> int:
        ext = sum(int(a.nbytes) for a in (self.decode_ext, self.mixed_ext, self.mixed_attn)
                  if a is not None)
        return int(self.decode.nbytes * 2 + self.mixed.nbytes) + ext

    @property
    def points(self) -> int:
        """Model evaluations tabulated (time tables only)."""
        return int(self.decode.size + self.mixed.size)

    @property
    def extrapolates(self) -> bool:
        return (self.baseline is not None and self.decode_ext is not None
                and self.mixed_ext is not None)

    @property
    def edge(self) -> tuple[float, float, float]:
        """(batch, KV tokens, prefill tokens) at the grid's far corner."""
        return float(self.mixed_batch[-1]), float(self.mixed_kv[-1]), float(self.prefill[-1])

    def clock_columns(self, clocks: FloatArray) -> IntArray | None:
        """Column indices if every clock is a grid clock, else None."""
        c0, step = float(self.clocks[0]), float(self.clocks[1] - self.clocks[0])
        idx = np.rint((clocks - c0) / step)
        if not (np.all(idx >= 0) and np.all(idx < len(self.clocks))):
            return None
        cols = idx.astype(np.int64)
        if not np.array_equal(self.clocks[cols], clocks):
            return None
        return cols

    def all_columns(self, cols: IntArray) -> bool:
        return len(cols) == len(self.clocks) and bool(np.all(cols == np.arange(len(cols))))

    def inside(self, b: FloatArray, kv: FloatArray, p: FloatArray) -> npt.NDArray[np.bool_]:
        bm, km, pm = self.edge
        return np.asarray((b >= 0) & (kv >= 0) & (p >= 0) & (b <= bm) & (kv <= km)
                          & (p <= pm))

    def rows(self, b: FloatArray, kv: FloatArray, p: FloatArray, cols: IntArray | None, *,
             maxima: tuple[float, float, float] | None = None,
             clock_major: bool = False, a2: FloatArray | None = None) -> FloatArray:
        """Seconds at clock columns `cols` (None: all) for n points with b, kv, p ≥ 0:
        [n, C'], or [C', n] with `clock_major` (`maxima`: the points' largest b, kv, p, when
        the caller has them already). `prepare` + `evaluate`.

        Inside the grid: interpolation (two rows for a decode point, eight for one that
        prefills). Outside (needs `extrapolates`; else only call it for points inside):
        t(x, f) = K(x_c, f) · baseline(x, f) with x_c = min(x, edge) coordinate by
        coordinate, at every grid clock, then the running max from the top clock down that
        made the grid monotone. That is what the ONNX model answers there, made monotone the
        same way: the trees see features clipped at or below the training data's largest
        values (thresholds lie between training values), the grid's edge is at or beyond
        them, so beyond the edge the trees' output, hence K, is K(x_c), and only the
        baseline grows. Computed once per point for all clocks (`prepare`), so a point's
        value at a clock never depends on which other clocks or points a query asks for.
        """
        return self.evaluate(self.prepare(b, kv, p, maxima=maxima, a2=a2), cols,
                             clock_major=clock_major)

    def prepare(self, b: FloatArray, kv: FloatArray, p: FloatArray, *,
                maxima: tuple[float, float, float] | None = None,
                a2: FloatArray | None = None) -> PreparedPoints:
        """Everything about n points (b, kv, p ≥ 0) that does not depend on the clock: grid
        cells and interpolation weights, and the points beyond the edge with their seconds
        at every grid clock (see `rows`). `a2`: the points' Σ prompt², used by a grid with
        the attention table (``mixed_attn``), clipped to [0, p²]; None: p² (one prompt)."""
        bm, km, pm = self.edge
        if maxima is None:
            maxima = (float(b.max(initial=0.0)), float(kv.max(initial=0.0)),
                      float(p.max(initial=0.0)))
        b_hi, kv_hi, p_hi = maxima
        any_out = b_hi > bm or kv_hi > km or p_hi > pm
        bc = np.minimum(b, bm) if b_hi > bm else b
        kc = np.minimum(kv, km) if kv_hi > km else kv
        pc = np.minimum(p, pm) if p_hi > pm else p
        # Every point gets a decode cell; those that prefill or whose batch is not a whole
        # number are then answered from the mixed grid instead (their decode cells are in
        # range, as every coordinate is clamped, and their values overwritten).
        dcell, ib = self._decode_cell(bc, kc)
        whole = bool((ib == bc).all())
        mi: IntArray | None = (np.flatnonzero((p != 0) | (ib != bc)) if not whole else
                               np.flatnonzero(p) if p_hi > 0 else None)
        if mi is not None and mi.size == 0:
            mi = None
        mcell = None if mi is None else self._mixed_cell(bc[mi], kc[mi], pc[mi])
        attn = None
        if self.mixed_attn is not None:
            a2 = p * p if a2 is None else np.minimum(np.maximum(a2, 0.0), p * p)
            if mi is not None:
                attn = a2[mi]
        else:
            a2 = None  # a model without the attention input: its baseline takes p²
        prep = PreparedPoints(len(b), dcell, mi, mcell, attn=attn)
        if not any_out:
            return prep
        base, d_ext, m_ext = self.baseline, self.decode_ext, self.mixed_ext
        if base is None or d_ext is None or m_ext is None:
            raise ValueError("points outside the grid and no baseline to extrapolate with")
        outside = (b > bm) | (kv > km) | (p > pm)
        od = np.flatnonzero(outside)
        sel: IntArray | slice = slice(None) if od.size == len(b) else od
        k = self._gather_decode(d_ext, (dcell[0][sel], dcell[1][sel], dcell[2][sel]), None)
        if mi is not None and mcell is not None:
            om = np.flatnonzero(outside[mi])
            if om.size:  # outside points answered by the mixed grid: their K from there
                pos = mi[om] if isinstance(sel, slice) else np.searchsorted(od, mi[om])
                k[pos] = self._gather_mixed(m_ext, (mcell[0][om], mcell[1][om]), None)
        a_part, b_part = base.parts(b[sel], kv[sel], p[sel], None if a2 is None else a2[sel])
        t_base = np.multiply.outer(b_part, base.r(self.clocks))
        t_base += a_part[:, None]
        k *= t_base
        # the grid's running max from the top clock down (a reversed view: rows are indexed
        # by clock column later, never walked in memory order)
        t_out = np.maximum.accumulate(k[:, ::-1], axis=1)[:, ::-1]
        return prep._replace(beyond=(sel, t_out))

    def evaluate(self, prep: PreparedPoints, cols: IntArray | None, *,
                 clock_major: bool = False) -> FloatArray:
        """`rows` for prepared points: only gathers and their weighted sums."""
        by_clock = clock_major and cols is not None
        if by_clock:
            assert cols is not None
            out = self._gather_decode_by_clock(self.decode_by_clock, prep.decode_cell, cols)
            rv = out.T  # a row view: rv[i] is point i
        else:
            out = self._gather_decode(self.decode, prep.decode_cell, cols)
            rv = out
            if clock_major:
                out = out.T
        if prep.mixed is not None and prep.mixed_cell is not None:
            vals = self._gather_mixed(self.mixed, prep.mixed_cell, cols)
            if prep.attn is not None and self.mixed_attn is not None:
                # t = t(Σ prompt² = 0) + Σ prompt² · slope: both non-increasing in the clock,
                # non-negative factor, so the sum stays monotone under rounding
                extra = self._gather_mixed(self.mixed_attn, prep.mixed_cell, cols)
                extra *= prep.attn[:, None]
                vals += extra
            rv[prep.mixed] = vals
        if prep.beyond is not None:
            sel, t_out = prep.beyond
            vals = t_out if cols is None else t_out[:, cols]
            if by_clock:  # out is [C', n]
                out[:, sel] = vals.T
            else:
                rv[sel] = vals
        return out

    def _decode_cell(self, b: FloatArray, kv: FloatArray) -> tuple[_DecodeCell, FloatArray]:
        """The decode cell of each point, and its batch truncated to a whole number (equal
        to the batch exactly when the decode grid can answer it: decode_batch is 0, 1, …)."""
        nk = self.decode.shape[1]
        ib = b.astype(np.int64)
        ik, wk = _locate_uniform(self.decode_kv, kv)
        w1 = wk.astype(np.float32)
        return (ib * nk + ik, 1.0 - w1, w1), ib.astype(np.float64)

    @staticmethod
    def _gather_decode(table: npt.NDArray[np.float32], cell: _DecodeCell,
                       cols: IntArray | None) -> FloatArray:
        """[n, C'] from a [B_d, K_d, C] table."""
        row, w0, w1 = cell
        nc = table.shape[-1]
        if cols is None:
            rows2 = table.reshape(-1, nc)
            g0 = rows2.take(row, axis=0, mode="clip")
            g1 = rows2.take(row + 1, axis=0, mode="clip")
        else:  # a few clocks: gather exactly those cells
            flat = table.reshape(-1)
            idx = row[:, None] * nc + cols[None, :]
            g0 = flat.take(idx, mode="clip")
            g1 = flat.take(idx + nc, mode="clip")
        # (1 − w)·g0 + w·g1, not g0 + w·(g1 − g0): with non-negative weights every step is
        # monotone under rounding, so monotone clock rows stay monotone bit for bit
        np.multiply(g0, w0[:, None], out=g0)
        np.multiply(g1, w1[:, None], out=g1)
        out = np.empty(g0.shape, dtype=np.float64)
        np.add(g0, g1, out=out)
        return out

    @staticmethod
    def _gather_decode_by_clock(table: npt.NDArray[np.float32], cell: _DecodeCell,
                                cols: IntArray) -> FloatArray:
        """[C', n] from a [C, B_d, K_d] table: the same products and sum as `_gather_decode`
        (so the same values, bit for bit), laid out clock by clock."""
        row, w0, w1 = cell
        slab = table.shape[1] * table.shape[2]
        flat = table.reshape(-1)
        idx = cols[:, None] * slab + row[None, :]
        g0 = flat.take(idx, mode="clip")
        g1 = flat.take(idx + 1, mode="clip")
        np.multiply(g0, w0, out=g0)
        np.multiply(g1, w1, out=g1)
        out = np.empty(g0.shape, dtype=np.float64)
        np.add(g0, g1, out=out)
        return out

    def _mixed_cell(self, b: FloatArray, kv: FloatArray, p: FloatArray) -> _MixedCell:
        if len(b) <= _SCALAR_MIXED_POINTS:
            return self._mixed_cell_scalar(b, kv, p)
        _, nk, npf, _ = self.mixed.shape
        ib, wb = _locate(self.mixed_batch, b)
        ik, wk = _locate_uniform(self.mixed_kv, kv)
        ip, wp = _locate(self.prefill, p)
        # the 8 corners of each point's cell, (db, dk, dp) in lexicographic order: rows
        # [n, 8] and trilinear weights [n, 8, 1]
        rows = ((ib * nk + ik) * npf + ip)[:, None] + self._corners[None, :]
        n = len(b)
        w = np.empty((n, 2, 2, 2))
        w[:, 0] = (1.0 - wb)[:, None, None]
        w[:, 1] = wb[:, None, None]
        w[:, :, 0] *= (1.0 - wk)[:, None, None]
        w[:, :, 1] *= wk[:, None, None]
        w[:, :, :, 0] *= (1.0 - wp)[:, None, None]
        w[:, :, :, 1] *= wp[:, None, None]
        return rows, w.reshape(n, 8, 1).astype(np.float32)

    def _mixed_cell_scalar(self, b: FloatArray, kv: FloatArray, p: FloatArray) -> _MixedCell:
        """`_mixed_cell` for a few points (a projection prefills only in the passes that admit
        a queued request): the same arithmetic on Python floats, in the same order, so the
        same cells and weights bit for bit, without numpy's per-call overhead."""
        _, nk, npf, _ = self.mixed.shape
        mb, pf, kv_step, corners = self._scalar_axes
        k_inv = 1.0 / kv_step
        rows: list[int] = []
        ws: list[float] = []
        last_b, last_p = len(mb) - 2, len(pf) - 2
        for x_b, x_k, x_p in zip(b.tolist(), kv.tolist(), p.tolist(), strict=True):
            ib = min(max(bisect.bisect_right(mb, x_b) - 1, 0), last_b)
            wb = (x_b - mb[ib]) / (mb[ib + 1] - mb[ib])
            u = x_k * k_inv
            ik = min(int(u), nk - 2)
            wk = u - ik
            ip = min(max(bisect.bisect_right(pf, x_p) - 1, 0), last_p)
            wp = (x_p - pf[ip]) / (pf[ip + 1] - pf[ip])
            first = (ib * nk + ik) * npf + ip
            rows.extend([first + c for c in corners])
            # (gb·gk)·gp over gb ∈ (1 − wb, wb), gk ∈ (1 − wk, wk), gp ∈ (1 − wp, wp), in
            # the corners' lexicographic order
            b0, k0, p0 = 1.0 - wb, 1.0 - wk, 1.0 - wp
            g00, g01, g10, g11 = b0 * k0, b0 * wk, wb * k0, wb * wk
            ws.extend((g00 * p0, g00 * wp, g01 * p0, g01 * wp, g10 * p0, g10 * wp, g11 * p0,
                       g11 * wp))
        return (np.asarray(rows, dtype=np.int64).reshape(-1, 8),
                np.asarray(ws, dtype=np.float64).reshape(-1, 8, 1).astype(np.float32))

    @staticmethod
    def _gather_mixed(table: npt.NDArray[np.float32], cell: _MixedCell,
                      cols: IntArray | None) -> FloatArray:
        rows, w = cell
        nc = table.shape[-1]
        if cols is None:
            g = table.reshape(-1, nc).take(rows, axis=0, mode="clip")  # [n, 8, C]
        else:
            g = table.reshape(-1).take(rows[..., None] * nc + cols, mode="clip")
        # Non-negative weights, products and a sum in the same order for every clock: each
        # step is monotone under IEEE rounding, so a clock row that was non-increasing on the
        # grid stays so here, bit for bit (a BLAS matmul may round columns differently).
        g *= w
        out: FloatArray = g.sum(axis=1, dtype=np.float64)
        return out


def extension_table(raw: FloatArray, nodes: tuple[FloatArray, FloatArray, FloatArray],
                    baseline: Baseline, clocks: FloatArray, *,
                    a2: FloatArray | None = None) -> npt.NDArray[np.float32] | None:
    """[n, C] float32: the tree correction K = raw / baseline at n nodes × C clocks (raw:
    the ONNX times at Σ prompt² `a2`, before any monotone fix); None when the baseline is
    not positive at every node (it then cannot carry an extrapolation)."""
    a, bb = baseline.parts(*nodes, a2)
    base = a[:, None] + bb[:, None] * baseline.r(clocks)[None, :]
    if not np.all(base > 0):
        return None
    return np.asarray(raw / base, dtype=np.float32)


def monotone_in_clock(t: FloatArray) -> FloatArray:
    """Running max from the top clock down (last axis ascending in clock): never faster at a
    lower clock. Only raises values."""
    return np.ascontiguousarray(np.maximum.accumulate(t[..., ::-1], axis=-1)[..., ::-1],
                                dtype=np.float64)


# --------------------------------------------------------------------------- runtime


class PerfRuntime:
    """A loaded performance model (see the module docstring). Use :meth:`load`.

    Concurrent calls on one instance are safe as far as ONNX Runtime's ``session.run`` is;
    the grid is read-only after load, and the one cached set of prepared points is replaced
    whole (a racing call at worst prepares its points again).
    """

    def __init__(self, session: Any, path: Path, metadata: Mapping[str, str],
                 model_sha256: str, *, baseline: Baseline | None = None) -> None:
        self._session = session
        # The model's roofline baseline (from metrics.json): lets the grid extrapolate past
        # its edge without ONNX. None: points outside the grid go to ONNX.
        self.baseline = baseline
        self.path = path
        self.metadata = dict(metadata)
        self.model_sha256 = model_sha256
        self.setup: str = metadata["setup"]
        # Whether the model takes Σ prompt² (its fifth input); see ATTENTION_FEATURE.
        self.attention = metadata.get("features") == ",".join(ATTENTION_FEATURES)
        self.trained_clock_range_mhz = (float(metadata["trained_clock_min_mhz"]),
                                        float(metadata["trained_clock_max_mhz"]))
        c_lo = float(metadata["grid_clock_min_mhz"])
        c_hi = float(metadata["grid_clock_max_mhz"])
        step = float(metadata["grid_clock_step_mhz"])
        self.clocks_mhz: FloatArray = np.arange(c_lo, c_hi + step / 2, step, dtype=np.float64)
        self.grid: PerfGrid | None = None
        self.grid_build_s = 0.0
        # clock vector bytes -> (grid columns or None, whether they are all columns in order)
        self._columns: dict[bytes, tuple[IntArray | None, bool]] = {}
        # (grid, copies of the last points asked for, their PreparedPoints): see _prepared
        self._last_points: tuple[PerfGrid, tuple[FloatArray, ...], PreparedPoints] | None = None
        # the last `prepare_passes` (its rows a copy): reused while the same rows come again
        self._last_passes: _PreparedPasses | None = None

    def __repr__(self) -> str:
        mode = "grid" if self.grid is not None else "onnx"
        return f"PerfRuntime({str(self.path)!r}, setup={self.setup!r}, {mode})"

    @classmethod
    def load(cls, path: str | Path | None, *, grid: bool = True) -> PerfRuntime:
        """Load ``model.onnx`` from a model folder (or the file itself, or a shipped model's
        name such as ``"h100-llama3-8b-tp1"``). With ``grid=True`` (default) compile the grid
        now (about a second). ModelError when the file is missing, corrupt, lacks our
        metadata, or disagrees with the ``metrics.json`` beside it."""
        onnx_path, folder = _resolve(path)
        if not onnx_path.is_file():
            raise ModelError(
                f"no performance model at {onnx_path}; train one with `throttllem train perf "
                "--data <profile.csv> --setup <setup> --out <folder>`")
        try:
            raw = onnx_path.read_bytes()
        except OSError as e:
            raise ModelError(f"cannot read {onnx_path}: {e}") from e
        sha = hashlib.sha256(raw).hexdigest()
        session = onnx_session(raw, str(onnx_path))
        meta = dict(session.get_modelmeta().custom_metadata_map)
        missing = [k for k in _REQUIRED_METADATA if k not in meta]
        if missing:
            raise ModelError(f"{onnx_path} is not a throttLL'eM performance model (metadata "
                             f"lacks {', '.join(missing)})")
        if meta["throttllem.perf.format"] != FORMAT_VERSION:
            raise ModelError(f"{onnx_path}: model format {meta['throttllem.perf.format']!r}, "
                             f"this runtime reads {FORMAT_VERSION!r}; retrain it")
        if meta["features"] not in (",".join(FEATURES), ",".join(ATTENTION_FEATURES)):
            raise ModelError(f"{onnx_path}: features {meta['features']!r}, expected "
                             f"{','.join(FEATURES)!r} or {','.join(ATTENTION_FEATURES)!r}")
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelError(f"{onnx_path}: expected one input named {INPUT_NAME!r}")
        metrics = _check_metrics(folder, sha) if folder is not None else _metrics_beside(
            onnx_path, sha)
        baseline = None
        if metrics is not None and "ref_clock_mhz" in meta:
            terms = metrics.get("baseline_coef")
            if isinstance(terms, dict):
                baseline = Baseline.from_terms(terms, float(meta["ref_clock_mhz"]))
        rt = cls(session, onnx_path, meta, sha, baseline=baseline)
        if grid:
            key = f"{sha}:{baseline is not None}"
            cached = _GRID_CACHE.get(key)
            if cached is not None:
                rt.grid = cached
            else:
                _GRID_CACHE[key] = rt.compile_grid()
                while len(_GRID_CACHE) > _GRID_CACHE_SIZE:
                    _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
        return rt

    # ------------------------------------------------------------------ ONNX

    def _run(self, x: FloatArray) -> FloatArray:
        out = self._session.run(None, {INPUT_NAME: x})[0]
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def predict_onnx(self, batch: npt.ArrayLike, kv_tokens: npt.ArrayLike,
                     prefill_tokens: npt.ArrayLike, clock_mhz: npt.ArrayLike,
                     prefill_attn_tokens2: npt.ArrayLike | None = None) -> FloatArray:
        """Seconds straight from the ONNX model (broadcast shape); the reference answer.
        `prefill_attn_tokens2` (Σ prompt²) is used by a model with that input (None:
        prefill_tokens², one prompt per pass) and ignored by one without."""
        b, kv, p, f = _broadcast(batch, kv_tokens, prefill_tokens, clock_mhz)
        arrs: list[FloatArray] = [b, kv, p, f]
        if self.attention:
            arrs = list(np.broadcast_arrays(
                *arrs, self._attention_tokens2(prefill_attn_tokens2, p)))
        shape = arrs[0].shape
        return self._run(np.stack([a.ravel() for a in arrs], axis=1)).reshape(shape)

    @staticmethod
    def _attention_tokens2(a2: npt.ArrayLike | None, p: FloatArray) -> FloatArray:
        """Σ prompt² broadcast to `p`'s shape, checked finite; p² where not given."""
        if a2 is None:
            return p * p
        a = np.asarray(a2, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{ATTENTION_FEATURE} has NaN or infinite values")
        return np.asarray(np.broadcast_to(a, np.broadcast_shapes(a.shape, p.shape)),
                          dtype=np.float64)

    def _onnx_rows(self, b: FloatArray, kv: FloatArray, p: FloatArray,
                   clocks: FloatArray, a2: FloatArray | None = None) -> FloatArray:
        """[n, len(clocks)] seconds for points × clocks through ONNX (`a2`: Σ prompt², for a
        model with that input; None: p²)."""
        n, c = len(b), len(clocks)
        x = np.empty((n * c, 5 if self.attention else 4), dtype=np.float64)
        x[:, 0] = np.repeat(b, c)
        x[:, 1] = np.repeat(kv, c)
        x[:, 2] = np.repeat(p, c)
        x[:, 3] = np.tile(clocks, n)
        if self.attention:
            x[:, 4] = np.repeat(p * p if a2 is None else a2, c)
        return self._run(x).reshape(n, c)

    # ------------------------------------------------------------------ grid

    def compile_grid(self, *, decode_kv_points: int = GRID_DECODE_KV_POINTS,
                     mixed_kv_points: int = GRID_MIXED_KV_POINTS) -> PerfGrid:
        """Evaluate the model on the grid (module docstring) and keep it; returns it."""
        import time  # noqa: PLC0415

        t0 = time.perf_counter()
        m = self.metadata
        clocks = self.clocks_mhz
        kv_max = math.ceil(float(m["grid_kv_max"]))
        d_batch = np.arange(0.0, math.ceil(float(m["grid_batch_max"])) + 1.0)
        d_kv = np.linspace(0.0, kv_max, decode_kv_points)
        m_batch = batch_axis(float(m["grid_batch_max"]))
        m_kv = np.linspace(0.0, kv_max, mixed_kv_points)
        p_axis = prefill_axis(float(m["grid_prefill_max"]))
        bb, kk = np.meshgrid(d_batch, d_kv, indexing="ij")
        d_nodes = (bb.ravel(), kk.ravel(), np.zeros(bb.size))
        decode = self._onnx_rows(*d_nodes, clocks)
        bb, kk, pp = np.meshgrid(m_batch, m_kv, p_axis, indexing="ij")
        m_nodes = (bb.ravel(), kk.ravel(), pp.ravel())
        zeros = np.zeros(bb.size) if self.attention else None
        # with the attention input: the times at Σ prompt² = 0, and the slope per token² of
        # Σ prompt² read off ONNX (the model is linear in it: its trees never see it)
        mixed = self._onnx_rows(*m_nodes, clocks, zeros)
        attn = None
        if self.attention:
            probe = np.full(bb.size, _ATTENTION_PROBE_TOKENS2)
            slope = (self._onnx_rows(*m_nodes, clocks, probe) - mixed) / _ATTENTION_PROBE_TOKENS2
            attn = np.maximum(slope, 0.0)
        d_shape = (len(d_batch), len(d_kv), len(clocks))
        m_shape = (len(m_batch), len(m_kv), len(p_axis), len(clocks))
        base = self.baseline
        d_ext = m_ext = None
        if base is not None:
            d_ext = extension_table(decode, d_nodes, base, clocks,
                                    a2=np.zeros(len(d_nodes[0])) if self.attention else None)
            m_ext = extension_table(mixed, m_nodes, base, clocks, a2=zeros)
        ok = d_ext is not None and m_ext is not None
        self.grid = PerfGrid(
            clocks=clocks, decode_batch=d_batch, decode_kv=d_kv,
            decode=monotone_in_clock(decode).astype(np.float32).reshape(d_shape),
            mixed_batch=m_batch, mixed_kv=m_kv, prefill=p_axis,
            mixed=monotone_in_clock(mixed).astype(np.float32).reshape(m_shape),
            baseline=base if ok else None,
            decode_ext=d_ext.reshape(d_shape) if ok and d_ext is not None else None,
            mixed_ext=m_ext.reshape(m_shape) if ok and m_ext is not None else None,
            mixed_attn=None if attn is None else
            monotone_in_clock(attn).astype(np.float32).reshape(m_shape))
        self.grid_build_s = time.perf_counter() - t0
        return self.grid

    # ------------------------------------------------------------------ PerfModel

    def iteration_time_s(self, batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                         clock_mhz: AnyArray,
                         prefill_attn_tokens2: AnyArray | None = None) -> AnyArray:
        """Seconds per iteration, numpy broadcasting (`throttllem._core.perf.PerfModel`).

        Grid when compiled (monotone in the clock), else ONNX. `prefill_attn_tokens2` (Σ
        prompt² of each pass's prefills, broadcast like `prefill_tokens`) is used by a model
        with that input (None: prefill_tokens², one prompt per pass) and ignored by one
        without. Raises ValueError on NaN or infinite inputs and on clocks ≤ 0.
        """
        grid = self.grid
        if grid is None:
            return self.predict_onnx(batch, kv_tokens, prefill_tokens, clock_mhz,
                                     prefill_attn_tokens2)
        b, kv, p, f = (np.asarray(a, dtype=np.float64)
                       for a in (batch, kv_tokens, prefill_tokens, clock_mhz))
        pts: tuple[FloatArray, ...] = (b, kv, p)
        if self.attention and prefill_attn_tokens2 is not None:
            pts = (b, kv, p, np.asarray(prefill_attn_tokens2, dtype=np.float64))
        shape = np.broadcast_shapes(*(a.shape for a in pts), f.shape)
        clocks = _clock_row(pts, f, shape)
        if clocks is not None:
            lead = (*shape[:-1], 1)
            flat = tuple(np.broadcast_to(a.reshape((1,) * (len(shape) - a.ndim) + a.shape),
                                         lead).reshape(-1) for a in pts)
            return self._clock_rows(grid, flat[0], flat[1], flat[2], clocks,
                                    a2=flat[3] if len(flat) > 3 else None).reshape(shape)
        if _clock_column(pts, f, shape):
            # The controller's layout: clocks down axis 0 (C, 1), passes along axis 1 (1, T);
            # answered clock-major, (C, T) contiguous.
            flat = tuple(a.reshape(-1) if a.size == shape[1] else
                         np.broadcast_to(a.reshape(1, -1) if a.ndim else a,
                                         (1, shape[1])).reshape(-1) for a in pts)
            return self._clock_rows(grid, flat[0], flat[1], flat[2], f.reshape(-1),
                                    clock_major=True, a2=flat[3] if len(flat) > 3 else None)
        bb, kk, pp, ff = _broadcast(b, kv, p, f)
        a2 = None
        if len(pts) > 3:
            a2 = self._attention_tokens2(pts[3], pp)
            bb, kk, pp, ff = (np.broadcast_to(a, a2.shape) for a in (bb, kk, pp, ff))
        return self._pointwise(grid, bb.ravel(), kk.ravel(), pp.ravel(), ff.ravel(),
                               None if a2 is None else a2.ravel()).reshape(shape)

    def prepare_passes(self, rows: FloatArray) -> _PreparedPasses | None:
        """`PreparedPerfModel`: the grid cells of (3, T) pass rows (batch, KV tokens,
        prefill tokens) or (4, T) ones (and Σ prompt², which a model without that input
        ignores), validated as `iteration_time_s` validates them; None without a grid that
        extrapolates (then `iteration_time_s` decides per query)."""
        grid = self.grid
        if grid is None or not grid.extrapolates:
            return None
        last = self._last_passes
        if (last is not None and last.grid is grid and last.rows.shape == rows.shape
                and bool((last.rows == rows).all())):
            return last  # the same passes again (a decision repeated on the same state)
        b, kv, p = rows[0], rows[1], rows[2]
        a2 = rows[3] if self.attention and rows.shape[0] > 3 else None
        if rows.shape[1]:
            lo = rows.min(axis=1).tolist()
            hi = rows.max(axis=1).tolist()
        else:
            lo = hi = [0.0] * rows.shape[0]
        for name, mn, mx in zip(_PASS_ROW_NAMES, lo, hi, strict=False):
            if not (math.isfinite(mn) and math.isfinite(mx)):
                raise ValueError(f"{name} has NaN or infinite values")
        if min(lo[:3]) < 0:  # some count is negative: 0, as in the ONNX graph
            b, kv, p = _nonnegative(b), _nonnegative(kv), _nonnegative(p)
            hi = [float(b.max(initial=0.0)), float(kv.max(initial=0.0)),
                  float(p.max(initial=0.0))]
        prepared = _PreparedPasses(grid, grid.prepare(b, kv, p, maxima=(hi[0], hi[1], hi[2]),
                                                      a2=a2), rows.copy())
        self._last_passes = prepared
        return prepared

    def prepared_time_s(self, prepared: _PreparedPasses, clocks_mhz: FloatArray) -> FloatArray:
        """(C, T) seconds of prepared passes at `clocks_mhz`: only the gathers, for grid
        clocks; any other clock vector goes through `iteration_time_s`."""
        grid, prep, rows = prepared
        cols, all_cols = self._grid_columns(grid, clocks_mhz)
        if cols is None or grid is not self.grid:
            return np.asarray(self.iteration_time_s(rows[0:1], rows[1:2], rows[2:3],
                                                    clocks_mhz.reshape(-1, 1),
                                                    rows[3:4] if rows.shape[0] > 3 else None))
        return grid.evaluate(prep, None if all_cols else cols, clock_major=True)

    def _grid_columns(self, grid: PerfGrid, clocks: FloatArray) -> tuple[IntArray | None, bool]:
        """(grid columns of the clocks or None, whether they are all columns in order),
        remembered per clock vector."""
        key = clocks.tobytes()
        hit = self._columns.get(key)
        if hit is None:
            cols = grid.clock_columns(clocks)  # None for clocks off the grid, NaN or ≤ 0
            hit = (cols, cols is not None and grid.all_columns(cols))
            if len(self._columns) >= 512:
                self._columns.clear()
            self._columns[key] = hit
        return hit

    def _clock_rows(self, grid: PerfGrid, b: FloatArray, kv: FloatArray, p: FloatArray,
                    clocks: FloatArray, *, clock_major: bool = False,
                    a2: FloatArray | None = None) -> FloatArray:
        """[n, len(clocks)] (or its transpose, contiguous, with `clock_major`) for n points,
        every point at every clock (the forecaster's query shape); `a2` their Σ prompt²
        (None: p²). Validates the inputs as `_validated` does."""
        cols, all_cols = self._grid_columns(grid, clocks)
        sel = None if all_cols else cols
        if a2 is not None and a2.size and not (math.isfinite(float(a2.min()))
                                               and math.isfinite(float(a2.max()))):
            raise ValueError(f"{ATTENTION_FEATURE} has NaN or infinite values")
        if cols is not None and grid.extrapolates:  # the hot path: never ONNX
            return grid.evaluate(self._prepared(grid, b, kv, p, a2), sel,
                                 clock_major=clock_major)
        maxima = _checked_maxima(b, kv, p, clocks)
        n = len(b)
        if cols is None:  # clocks off the grid: evaluate pointwise
            out = self._pointwise(grid, np.repeat(b, len(clocks)), np.repeat(kv, len(clocks)),
                                  np.repeat(p, len(clocks)), np.tile(clocks, n),
                                  None if a2 is None else np.repeat(a2, len(clocks))
                                  ).reshape(n, len(clocks))
            return np.ascontiguousarray(out.T) if clock_major else out
        b, kv, p = _nonnegative(b), _nonnegative(kv), _nonnegative(p)
        inside = grid.inside(b, kv, p)
        if inside.all():
            return grid.rows(b, kv, p, sel, maxima=maxima, clock_major=clock_major, a2=a2)
        # No baseline to extrapolate with: ONNX for the rows outside, made monotone
        out = np.empty((n, len(clocks)), dtype=np.float64)
        if inside.any():
            out[inside] = grid.rows(b[inside], kv[inside], p[inside], sel,
                                    a2=None if a2 is None else a2[inside])
        outside = ~inside
        full = monotone_in_clock(self._onnx_rows(b[outside], kv[outside], p[outside],
                                                 grid.clocks,
                                                 None if a2 is None else a2[outside]))
        out[outside] = full[:, cols]
        return np.ascontiguousarray(out.T) if clock_major else out

    def _prepared(self, grid: PerfGrid, b: FloatArray, kv: FloatArray,
                  p: FloatArray, a2: FloatArray | None = None) -> PreparedPoints:
        """`grid.prepare` of the points, validated; the last one is kept and reused while
        the next query asks for exactly the same points (a clock search asks for the same
        pass rows round after round, only the clocks change). Reuse is decided on the
        values, compared in full, never on the arrays' identity."""
        last = self._last_points
        pts = (b, kv, p) if a2 is None else (b, kv, p, a2)
        if (last is not None and last[0] is grid and len(last[1]) == len(pts)
                and all(c.shape == a.shape and bool((c == a).all())
                        for c, a in zip(last[1], pts, strict=True))):
            return last[2]
        maxima = _checked_maxima(b, kv, p, grid.clocks[-1:])
        copies = tuple(a.copy() for a in pts)
        if maxima is None:  # some count is negative: 0, as in the ONNX graph
            b, kv, p = _nonnegative(b), _nonnegative(kv), _nonnegative(p)
            maxima = (float(b.max(initial=0.0)), float(kv.max(initial=0.0)),
                      float(p.max(initial=0.0)))
        prep = grid.prepare(b, kv, p, maxima=maxima, a2=a2)
        self._last_points = (grid, copies, prep)
        return prep

    def _pointwise(self, grid: PerfGrid, b: FloatArray, kv: FloatArray, p: FloatArray,  # noqa: PLR0917
                   f: FloatArray, a2: FloatArray | None = None) -> FloatArray:
        """Any points: the grid (interpolated along the clock too) for clocks within the
        grid's range, ONNX for clocks beyond it (and, without a baseline to extrapolate
        with, for points outside the grid)."""
        out = np.empty(len(b), dtype=np.float64)
        b, kv, p = _nonnegative(b), _nonnegative(kv), _nonnegative(p)
        inside = (f >= grid.clocks[0]) & (f <= grid.clocks[-1])
        if not grid.extrapolates:
            inside &= grid.inside(b, kv, p)
        if inside.any():
            ic, wc = _locate(grid.clocks, f[inside])
            bi, ki, pi = b[inside], kv[inside], p[inside]
            ai = None if a2 is None else a2[inside]
            # rows at all clocks would be wasteful for scattered points: two columns each
            lo = np.empty(len(ic))
            hi = np.empty(len(ic))
            for col in np.unique(ic).tolist():
                sel = ic == col
                r = grid.rows(bi[sel], ki[sel], pi[sel], np.asarray([col, col + 1]),
                              a2=None if ai is None else ai[sel])
                lo[sel], hi[sel] = r[:, 0], r[:, 1]
            out[inside] = lo + (hi - lo) * wc
        if not inside.all():
            o = ~inside
            cols = [b[o], kv[o], p[o], f[o]]
            if self.attention:
                cols.append(p[o] * p[o] if a2 is None else a2[o])
            out[o] = self._run(np.stack(cols, axis=1))
        return out


class _PreparedPasses(NamedTuple):
    """`PerfRuntime.prepare_passes`: the grid, the prepared points and the rows."""

    grid: PerfGrid
    points: PreparedPoints
    rows: FloatArray


def _checked_maxima(b: FloatArray, kv: FloatArray, p: FloatArray,
                    f: FloatArray) -> tuple[float, float, float] | None:
    """`_validated`'s checks (same errors) on 1-D points and clocks from their minima and
    maxima (NaN propagates through both); returns the maxima of (b, kv, p), or None when a
    count is negative."""
    lo: list[float] = []
    hi: list[float] = []
    for name, a in zip(FEATURES, (b, kv, p, f), strict=True):
        mn, mx = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise ValueError(f"{name} has NaN or infinite values")
        lo.append(mn)
        hi.append(mx)
    if lo[3] <= 0:
        raise ValueError("clock_mhz must be positive")
    if min(lo[:3]) < 0:
        return None
    return hi[0], hi[1], hi[2]


def _nonnegative(a: FloatArray) -> FloatArray:
    """Negative counts as 0, as the ONNX graph (and the training) clip them."""
    return a if a.size == 0 or float(a.min()) >= 0.0 else np.maximum(a, 0.0)


def _validated(batch: npt.ArrayLike, kv: npt.ArrayLike, prefill: npt.ArrayLike,
               clock: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    arrs = tuple(np.asarray(a, dtype=np.float64) for a in (batch, kv, prefill, clock))
    for name, a in zip(FEATURES, arrs, strict=True):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has NaN or infinite values")
    if (arrs[3] <= 0).any():
        raise ValueError("clock_mhz must be positive")
    return arrs[0], arrs[1], arrs[2], arrs[3]


def _broadcast(batch: npt.ArrayLike, kv: npt.ArrayLike, prefill: npt.ArrayLike,
               clock: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    b, kv_, p, f = np.broadcast_arrays(*_validated(batch, kv, prefill, clock))
    return b, kv_, p, f


def _clock_row(pts: tuple[FloatArray, ...], f: FloatArray,
               shape: tuple[int, ...]) -> FloatArray | None:
    """When only the clock varies along the last axis (shapes like (T, 1) × (1, C)), the
    clock vector; else None (`pts`: the point coordinates)."""
    if not shape or shape[-1] <= 1:
        return None
    nd = len(shape)
    cshape = (1,) * (nd - f.ndim) + f.shape
    if any(d != 1 for d in cshape[:-1]) or cshape[-1] != shape[-1]:
        return None
    for a in pts:
        if a.ndim == nd and a.shape[-1] != 1:
            return None
        if 0 < a.ndim < nd and ((1,) * (nd - a.ndim) + a.shape)[-1] != 1:
            return None
    return f.reshape(-1)


def _clock_column(pts: tuple[FloatArray, ...], f: FloatArray, shape: tuple[int, ...]) -> bool:
    """True for the transposed layout (C, 1) clocks × (1, T) points (C ≥ 1), 2-D only."""
    if len(shape) != 2 or shape[0] < 1 or f.shape != (shape[0], 1):
        return False
    return all(a.ndim == 0 or a.shape in ((1, shape[1]), (shape[1],)) for a in pts)


def _metrics_beside(onnx_path: Path, sha: str) -> dict[str, Any] | None:
    """metrics.json next to a model file loaded by its path, if it describes this file."""
    mpath = onnx_path.parent / METRICS_FILE
    try:
        metrics = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("model_sha256") == sha else None


def _check_metrics(folder: Path, sha: str) -> dict[str, Any]:
    mpath = folder / METRICS_FILE
    if not mpath.is_file():
        raise ModelError(f"{folder} has {MODEL_FILE} but no {METRICS_FILE}: a model folder "
                         "is written whole by `throttllem train perf`")
    try:
        metrics = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{mpath} is unreadable: {e}") from e
    want = metrics.get("model_sha256") if isinstance(metrics, dict) else None
    if want != sha:
        raise ModelError(f"{folder / MODEL_FILE} (sha256 {sha[:12]}…) is not the model that "
                         f"{METRICS_FILE} describes ({str(want)[:12]}…); retrain or restore "
                         "the folder")
    assert isinstance(metrics, dict)
    return metrics


# --------------------------------------------------------------------------- scoring


def score_table(model: PerfRuntime, path: str | Path, *, use_grid: bool = False
                ) -> tuple[Metrics, dict[str, Any]]:
    """Score a model on a profile table (any table in the layout of `throttllem._perf.table`).

    Rows outside what the model saw are scored too: clocks outside the trained range are
    extrapolated by the model's baseline (the trees see the nearest trained clock), never
    rejected. Returns the metrics and notes on how many rows were out of the trained range.
    """
    from throttllem._perf.table import read_table  # noqa: PLC0415

    table = read_table(path)
    b, kv, p, f = table.features()
    a2 = table.attention_tokens2()
    unknown = np.isnan(a2)
    a2 = np.where(unknown, p * p, a2)  # not recorded: one prompt per pass, as callers do
    if use_grid and model.grid is not None:
        pred = np.asarray(model.iteration_time_s(b, kv, p, f, a2), dtype=np.float64)
    else:
        pred = model.predict_onnx(b, kv, p, f, a2)
    m = model.metadata
    lo, hi = model.trained_clock_range_mhz
    notes = {
        "rows": len(table),
        "clock_below_trained": int((f < lo).sum()),
        "clock_above_trained": int((f > hi).sum()),
        "batch_above_trained": int((b > float(m.get("trained_batch_max", "inf"))).sum()),
        "kv_above_trained": int((kv > float(m.get("trained_kv_max", "inf"))).sum()),
        "prefill_above_trained": int((p > float(m.get("trained_prefill_max", "inf"))).sum()),
        "attention_tokens2_unknown": int(unknown.sum()) if model.attention else 0,
    }
    return compute_metrics(table.iter_s, pred, table.phase), notes


def load_perf_model(spec: str) -> PerfModel:
    """The controller's performance model from a model folder or shipped model name: the ONNX
    model compiled to its grid (queries never call ONNX on the decision path)."""
    runtime = PerfRuntime.load(spec)
    return FunctionPerfModel(runtime.iteration_time_s, name=f"onnx-grid:{spec}",
                             prepared=runtime)

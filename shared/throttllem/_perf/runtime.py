"""Serving the performance model: ONNX Runtime only (no scikit-learn), and a precompiled grid.

>>> perf = PerfRuntime.load("models/perf/h100-llama3-8b-tp1")
>>> perf.iteration_time_s(batch[:, None], kv[:, None], prefill[:, None], clocks[None, :])

`PerfRuntime` satisfies `throttllem._core.perf.PerfModel`: numpy broadcasting over (batch,
kv_tokens, prefill_tokens, clock_mhz), seconds back, finite and > 0.

Two ways to answer
------------------
* **ONNX** (`PerfRuntime.predict_onnx`): the exported graph, one ``session.run`` on an
  [N, 4] array (1 intra-op thread). Exact — it *is* the model — but a 100-tree ensemble costs
  about a microsecond per point: the forecaster's full-scan query (2,000 future iterations ×
  110 clocks = 220k points) takes ~230 ms on one core.
* **Grid** (`PerfRuntime.iteration_time_s` once `compile_grid` ran; the default of
  `PerfRuntime.load`): at load time (~2 s, ~7 MB float32; cached per model in the process)
  the ONNX model is evaluated once on a dense grid over (batch, KV tokens, prefill tokens,
  supported clock): every integer batch 0…max × 33 KV points for decode-only iterations, and
  a coarser (17 batch × 17 KV × 26 prefill) grid for iterations that prefill. A query takes
  whole clock rows at once: a decode-only iteration costs two row gathers and one convex
  combination along KV; one that prefills, a trilinear combination of 8 rows. The grid is made
  monotone (non-increasing) in the clock by a running maximum from the top clock down, which
  only ever raises a time (conservative for SLOs), and the interpolation keeps it so bit for
  bit (non-negative weights, same operation order for every clock), so the clock search may
  bisect (`throttllem._core.perf.is_monotone_in_clock` holds; it does not for raw ONNX, whose
  trees wiggle by a fraction of a percent). Points outside the grid (batch, KV or prefill above
  it, clocks off the supported list or beyond it) fall back to ONNX, monotone-fixed the same
  way when the query is a row of grid clocks.

Measured by ``benchmarks/bench_perf.py`` (one core of our 2-core CI-class machine, H100 8B
TP1 twin model; 2,000 iterations recorded from the engine twin under a ×8 Azure conv trace):
forecast-shaped query (2% of iterations prefill) × 110 clocks: grid 0.55 ms p50 / ~0.7–1.3 ms
p99 (the tail is the shared machine) vs ONNX ~230 ms (~400×); one k-ary round (× 11 clocks):
grid 0.4 ms vs ONNX 22 ms; the recorded mix itself (38% of iterations admit requests) 1.8 ms.
Accuracy: on a twin profile no model saw, grid and ONNX score the same (R² 0.9996, MAPE 1.45%
on iterations/s); grid vs ONNX: 0.2–0.3% mean, ~2–3% p99 relative difference (largest for
big prefills, where the trees step).

**Decision: the forecaster uses the grid.** It is ~400× cheaper for the queries the controller
makes, monotone by construction, and as accurate as the model it tabulates; ONNX stays the
reference (``perf score`` scores the ONNX model; ``--grid`` scores the grid too) and the
fallback.

Files in a model folder: ``model.onnx`` (metadata_props: setup, trained ranges, grid domain),
``metrics.json`` (its ``model_sha256`` must match the ONNX file, else ModelError),
``MODEL_CARD.md``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from throttllem._data import models_dir
from throttllem._errors import ModelError

MODEL_FILE: Final = "model.onnx"
CARD_FILE: Final = "MODEL_CARD.md"
METRICS_FILE: Final = "metrics.json"
FORMAT_VERSION: Final = "1"
FEATURES: Final = ("batch", "kv_tokens", "prefill_tokens", "clock_mhz")
INPUT_NAME: Final = "X"
OUTPUT_NAME: Final = "iteration_time_s"
DEFAULT_MODEL_ROOT: Final = models_dir() / "perf"
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


# --------------------------------------------------------------------------- ONNX


def onnx_session(model: bytes | Path, what: str) -> Any:
    """An ONNX Runtime session on one intra-op thread; ModelError if it cannot load."""
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        raise ModelError(f"{what} is not a loadable ONNX model: {e}") from e


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
    i = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
    lo = axis[i]
    w = (x - lo) / (axis[i + 1] - lo)
    return i.astype(np.int64), np.asarray(w, dtype=np.float64)


def _locate_uniform(axis: FloatArray, x: FloatArray) -> tuple[IntArray, FloatArray]:
    """`_locate` for an evenly spaced axis starting at 0: arithmetic, no search."""
    step = float(axis[1])
    u = x * (1.0 / step)
    i = np.minimum(u.astype(np.int64), len(axis) - 2)
    return i, u - i


@dataclass(frozen=True, eq=False)
class PerfGrid:
    """The model tabulated once; see the module docstring.

    ``decode``: [B_d, K_d, C] seconds at prefill 0 on the axes ``decode_batch`` (every
    integer 0…batch_max, so decode queries only interpolate along KV) × ``decode_kv``;
    ``mixed``: [B_m, K_m, P, C] for iterations with prefill tokens (and non-integer batches).
    float32 (halves the bytes a query gathers; 7 significant digits is plenty for times);
    both non-increasing along C (ascending clocks).
    """

    clocks: FloatArray
    decode_batch: FloatArray
    decode_kv: FloatArray
    decode: npt.NDArray[np.float32]
    mixed_batch: FloatArray
    mixed_kv: FloatArray
    prefill: FloatArray
    mixed: npt.NDArray[np.float32]

    @property
    def nbytes(self) -> int:
        return int(self.decode.nbytes + self.mixed.nbytes)

    @property
    def points(self) -> int:
        return int(self.decode.size + self.mixed.size)

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
        decode = (p == 0) & (b <= self.decode_batch[-1]) & (kv <= self.decode_kv[-1])
        mixed = (b <= self.mixed_batch[-1]) & (kv <= self.mixed_kv[-1]) & (p <= self.prefill[-1])
        return np.asarray((b >= 0) & (kv >= 0) & (p >= 0) & (decode | mixed))

    def rows(self, b: FloatArray, kv: FloatArray, p: FloatArray,
             cols: IntArray | None) -> FloatArray:
        """Seconds [n, C'] for points inside the grid at clock columns `cols` (None: all)."""
        fast = (p == 0) & (b == np.floor(b)) & (b <= self.decode_batch[-1]) & (
            kv <= self.decode_kv[-1])
        if fast.all():
            return self._decode_rows(b, kv, cols)
        # Decode rows for every point (placeholders where not decode), then overwrite the
        # few that prefill: cheaper than gathering into a masked output.
        out = self._decode_rows(np.where(fast, b, 0.0), np.where(fast, kv, 0.0), cols)
        rest = ~fast
        out[rest] = self._mixed_rows(b[rest], kv[rest], p[rest], cols)
        return out

    def _decode_rows(self, b: FloatArray, kv: FloatArray, cols: IntArray | None) -> FloatArray:
        nk, nc = self.decode.shape[1], self.decode.shape[2]
        ib = b.astype(np.int64)  # decode_batch is 0, 1, 2, … and b is a whole number in it
        ik, wk = _locate_uniform(self.decode_kv, kv)
        row = ib * nk + ik
        w1 = wk.astype(np.float32)[:, None]
        w0 = (1.0 - wk).astype(np.float32)[:, None]
        if cols is None:
            table = self.decode.reshape(-1, nc)
            g0 = table.take(row, axis=0, mode="clip")
            g1 = table.take(row + 1, axis=0, mode="clip")
        else:  # a few clocks: gather exactly those cells
            flat = self.decode.reshape(-1)
            idx = row[:, None] * nc + cols[None, :]
            g0 = flat.take(idx, mode="clip")
            g1 = flat.take(idx + nc, mode="clip")
        # (1 − w)·g0 + w·g1, not g0 + w·(g1 − g0): with non-negative weights every step is
        # monotone under rounding, so monotone clock rows stay monotone bit for bit
        np.multiply(g0, w0, out=g0)
        np.multiply(g1, w1, out=g1)
        out = np.empty(g0.shape, dtype=np.float64)
        np.add(g0, g1, out=out)
        return out

    def _mixed_rows(self, b: FloatArray, kv: FloatArray, p: FloatArray,
                    cols: IntArray | None) -> FloatArray:
        _, nk, npf, nc = self.mixed.shape
        ib, wb = _locate(self.mixed_batch, b)
        ik, wk = _locate_uniform(self.mixed_kv, kv)
        ip, wp = _locate(self.prefill, p)
        # the 8 corners of each point's cell at once, (db, dk, dp) in lexicographic order:
        # rows [n, 8] and trilinear weights [n, 8], then one batched [1, 8] @ [8, C] per point
        offsets = np.asarray([(db * nk + dk) * npf + dp
                              for db, dk, dp in itertools.product((0, 1), repeat=3)])
        rows = (((ib * nk + ik) * npf + ip)[:, None] + offsets[None, :])
        wb2 = np.stack([1.0 - wb, wb], axis=1)
        wk2 = np.stack([1.0 - wk, wk], axis=1)
        wp2 = np.stack([1.0 - wp, wp], axis=1)
        w = (wb2[:, :, None, None] * wk2[:, None, :, None] * wp2[:, None, None, :]).reshape(
            -1, 8, 1)
        if cols is None:
            g = self.mixed.reshape(-1, nc).take(rows, axis=0, mode="clip")  # [n, 8, C]
        else:
            g = self.mixed.reshape(-1).take(rows[..., None] * nc + cols, mode="clip")
        # Non-negative weights, products and a sum in the same order for every clock: each
        # step is monotone under IEEE rounding, so a clock row that was non-increasing on the
        # grid stays so here, bit for bit (a BLAS matmul may round columns differently).
        g *= w.astype(np.float32)
        out: FloatArray = g.sum(axis=1, dtype=np.float64)
        return out


def monotone_in_clock(t: FloatArray) -> FloatArray:
    """Running max from the top clock down (last axis ascending in clock): never faster at a
    lower clock. Only raises values."""
    return np.ascontiguousarray(np.maximum.accumulate(t[..., ::-1], axis=-1)[..., ::-1],
                                dtype=np.float64)


# --------------------------------------------------------------------------- runtime


class PerfRuntime:
    """A loaded performance model (see the module docstring). Use :meth:`load`.

    Not thread-safe for concurrent calls on one instance beyond what ONNX Runtime allows
    (``session.run`` is); the grid is read-only after load.
    """

    def __init__(self, session: Any, path: Path, metadata: Mapping[str, str],
                 model_sha256: str) -> None:
        self._session = session
        self.path = path
        self.metadata = dict(metadata)
        self.model_sha256 = model_sha256
        self.setup: str = metadata["setup"]
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
        if meta["features"] != ",".join(FEATURES):
            raise ModelError(f"{onnx_path}: features {meta['features']!r}, expected "
                             f"{','.join(FEATURES)!r}")
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelError(f"{onnx_path}: expected one input named {INPUT_NAME!r}")
        if folder is not None:
            _check_metrics(folder, sha)
        rt = cls(session, onnx_path, meta, sha)
        if grid:
            cached = _GRID_CACHE.get(sha)
            if cached is not None:
                rt.grid = cached
            else:
                _GRID_CACHE[sha] = rt.compile_grid()
                while len(_GRID_CACHE) > _GRID_CACHE_SIZE:
                    _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
        return rt

    # ------------------------------------------------------------------ ONNX

    def _run(self, x: FloatArray) -> FloatArray:
        out = self._session.run(None, {INPUT_NAME: x})[0]
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def predict_onnx(self, batch: npt.ArrayLike, kv_tokens: npt.ArrayLike,
                     prefill_tokens: npt.ArrayLike, clock_mhz: npt.ArrayLike) -> FloatArray:
        """Seconds straight from the ONNX model (broadcast shape); the reference answer."""
        b, kv, p, f = _broadcast(batch, kv_tokens, prefill_tokens, clock_mhz)
        shape = b.shape
        x = np.stack([b.ravel(), kv.ravel(), p.ravel(), f.ravel()], axis=1)
        return self._run(x).reshape(shape)

    def _onnx_rows(self, b: FloatArray, kv: FloatArray, p: FloatArray,
                   clocks: FloatArray) -> FloatArray:
        """[n, len(clocks)] seconds for points × clocks through ONNX."""
        n, c = len(b), len(clocks)
        x = np.empty((n * c, 4), dtype=np.float64)
        x[:, 0] = np.repeat(b, c)
        x[:, 1] = np.repeat(kv, c)
        x[:, 2] = np.repeat(p, c)
        x[:, 3] = np.tile(clocks, n)
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
        decode = self._onnx_rows(bb.ravel(), kk.ravel(), np.zeros(bb.size), clocks)
        bb, kk, pp = np.meshgrid(m_batch, m_kv, p_axis, indexing="ij")
        mixed = self._onnx_rows(bb.ravel(), kk.ravel(), pp.ravel(), clocks)
        self.grid = PerfGrid(
            clocks=clocks, decode_batch=d_batch, decode_kv=d_kv,
            decode=monotone_in_clock(decode).astype(np.float32).reshape(
                len(d_batch), len(d_kv), len(clocks)),
            mixed_batch=m_batch, mixed_kv=m_kv, prefill=p_axis,
            mixed=monotone_in_clock(mixed).astype(np.float32).reshape(
                len(m_batch), len(m_kv), len(p_axis), len(clocks)))
        self.grid_build_s = time.perf_counter() - t0
        return self.grid

    # ------------------------------------------------------------------ PerfModel

    def iteration_time_s(self, batch: AnyArray, kv_tokens: AnyArray, prefill_tokens: AnyArray,
                         clock_mhz: AnyArray) -> AnyArray:
        """Seconds per iteration, numpy broadcasting (`throttllem._core.perf.PerfModel`).

        Grid when compiled (monotone in the clock), else ONNX. Raises ValueError on NaN or
        infinite inputs and on clocks ≤ 0.
        """
        arrs = _validated(batch, kv_tokens, prefill_tokens, clock_mhz)
        grid = self.grid
        if grid is None:
            return self.predict_onnx(*arrs)
        b, kv, p, f = arrs
        shape = np.broadcast_shapes(b.shape, kv.shape, p.shape, f.shape)
        clocks = _clock_row(b, kv, p, f, shape)
        if clocks is None and _clock_column(b, kv, p, f, shape):
            # The controller's layout: clocks down axis 0 (C, 1), passes along axis 1 (1, T).
            pb, pkv, pp = (np.broadcast_to(a.reshape(1, -1) if a.ndim else a,
                                           (1, shape[1])).reshape(-1) for a in (b, kv, p))
            return self._clock_rows(grid, pb, pkv, pp, f.reshape(-1)).T
        if clocks is None:
            bb, kk, pp, ff = np.broadcast_arrays(b, kv, p, f)
            return self._pointwise(grid, bb.ravel(), kk.ravel(), pp.ravel(),
                                   ff.ravel()).reshape(shape)
        lead = (*shape[:-1], 1)
        pb, pkv, pp = (np.broadcast_to(a.reshape((1,) * (len(shape) - a.ndim) + a.shape), lead)
                       .reshape(-1) for a in (b, kv, p))
        return self._clock_rows(grid, pb, pkv, pp, clocks).reshape(shape)

    def _clock_rows(self, grid: PerfGrid, b: FloatArray, kv: FloatArray, p: FloatArray,
                    clocks: FloatArray) -> FloatArray:
        """[n, len(clocks)] for n points, every point at every clock (the forecaster's
        query shape)."""
        key = clocks.tobytes()
        hit = self._columns.get(key)
        if hit is None:
            cols = grid.clock_columns(clocks)
            hit = (cols, cols is not None and grid.all_columns(cols))
            if len(self._columns) >= 16:
                self._columns.clear()
            self._columns[key] = hit
        cols, all_cols = hit
        n = len(b)
        if cols is not None:
            sel = None if all_cols else cols
            inside = grid.inside(b, kv, p)
            if inside.all():
                return grid.rows(b, kv, p, sel)
            out = np.empty((n, len(clocks)), dtype=np.float64)
            if inside.any():
                out[inside] = grid.rows(b[inside], kv[inside], p[inside], sel)
            outside = ~inside
            full = monotone_in_clock(self._onnx_rows(b[outside], kv[outside], p[outside],
                                                     grid.clocks))
            out[outside] = full[:, cols]
            return out
        # Clocks off the grid: evaluate pointwise.
        return self._pointwise(grid, np.repeat(b, len(clocks)), np.repeat(kv, len(clocks)),
                               np.repeat(p, len(clocks)), np.tile(clocks, n)
                               ).reshape(n, len(clocks))

    def _pointwise(self, grid: PerfGrid, b: FloatArray, kv: FloatArray, p: FloatArray,
                   f: FloatArray) -> FloatArray:
        """Any points: grid interpolation along the clock too where inside, else ONNX."""
        out = np.empty(len(b), dtype=np.float64)
        inside = grid.inside(b, kv, p) & (f >= grid.clocks[0]) & (f <= grid.clocks[-1])
        if inside.any():
            ic, wc = _locate(grid.clocks, f[inside])
            bi, ki, pi = b[inside], kv[inside], p[inside]
            # rows at all clocks would be wasteful for scattered points: two columns each
            lo = np.empty(len(ic))
            hi = np.empty(len(ic))
            for col in np.unique(ic).tolist():
                sel = ic == col
                r = grid.rows(bi[sel], ki[sel], pi[sel], np.asarray([col, col + 1]))
                lo[sel], hi[sel] = r[:, 0], r[:, 1]
            out[inside] = lo + (hi - lo) * wc
        if not inside.all():
            o = ~inside
            x = np.stack([b[o], kv[o], p[o], f[o]], axis=1)
            out[o] = self._run(x)
        return out


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


def _clock_row(b: FloatArray, kv: FloatArray, p: FloatArray, f: FloatArray,
               shape: tuple[int, ...]) -> FloatArray | None:
    """When only the clock varies along the last axis (shapes like (T, 1) × (1, C)), the
    clock vector; else None."""
    if not shape or shape[-1] <= 1:
        return None
    nd = len(shape)
    cshape = (1,) * (nd - f.ndim) + f.shape
    if any(d != 1 for d in cshape[:-1]) or cshape[-1] != shape[-1]:
        return None
    for a in (b, kv, p):
        if a.ndim == nd and a.shape[-1] != 1:
            return None
        if 0 < a.ndim < nd and ((1,) * (nd - a.ndim) + a.shape)[-1] != 1:
            return None
    return f.reshape(-1)


def _clock_column(b: FloatArray, kv: FloatArray, p: FloatArray, f: FloatArray,
                  shape: tuple[int, ...]) -> bool:
    """True for the transposed layout (C, 1) clocks × (1, T) points, 2-D only."""
    if len(shape) != 2 or shape[0] <= 1 or f.shape != (shape[0], 1):
        return False
    return all(a.ndim == 0 or a.shape in ((1, shape[1]), (shape[1],)) for a in (b, kv, p))


def _check_metrics(folder: Path, sha: str) -> None:
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
    if use_grid and model.grid is not None:
        pred = np.asarray(model.iteration_time_s(b, kv, p, f), dtype=np.float64)
    else:
        pred = model.predict_onnx(b, kv, p, f)
    m = model.metadata
    lo, hi = model.trained_clock_range_mhz
    notes = {
        "rows": len(table),
        "clock_below_trained": int((f < lo).sum()),
        "clock_above_trained": int((f > hi).sum()),
        "batch_above_trained": int((b > float(m.get("trained_batch_max", "inf"))).sum()),
        "kv_above_trained": int((kv > float(m.get("trained_kv_max", "inf"))).sum()),
        "prefill_above_trained": int((p > float(m.get("trained_prefill_max", "inf"))).sum()),
    }
    return compute_metrics(table.iter_s, pred, table.phase), notes

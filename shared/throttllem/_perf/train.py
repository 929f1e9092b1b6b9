"""Training the performance model and exporting it to ONNX (needs the ``train`` extra:
scikit-learn, skl2onnx, onnx; serving needs only onnxruntime, see `throttllem._perf.runtime`).

Model
-----
Seconds per iteration from x = (decode batch b, KV tokens kv, prefill tokens p, SM clock f),
as a physics baseline times a gradient-boosted correction:

    t(x) = base(x) · exp(g(b, kv, p, clip(f, f_lo, f_hi)))

* ``base`` is a roofline-shaped linear model, fitted by non-negative least squares on relative
  error, with r = f_ref/f (f_ref = the GPU's top clock):
  ``c0 + c1·kv + c2·b + c3·p + r·(c4 + c5·kv + c6·b + c7·p + c8·p²)`` (p in thousands).
  The clock-free terms are the memory-bound work (weight stream, KV reads), the r-terms the
  compute-bound work that scales as 1/f. All cᵢ ≥ 0, so the baseline never gets faster with
  more work or a lower clock. With fewer than `SMALL_DATA_ROWS` training rows only the physical
  subset {c0, c1, c4, c6, c7, c8} is fitted (memory-bound constant and KV, clocked batch and
  prefill GEMMs): fewer free parameters for tiny tables such as the 59-row measured one.
* ``g`` is a scikit-learn ``HistGradientBoostingRegressor`` on log(t / base), with the raw
  features (trees are invariant to monotone transforms, so 1/f adds nothing). It learns what
  the straight lines miss: the smooth roofline knee between weight streaming and GEMMs, the HBM
  issue-rate knee at low clocks, prefill attention. Without the baseline the same trees reach
  ~2× the MAPE at the 10% split (see `metrics.json` → ``ablation``).
* The trees see the clock clipped to the trained range [f_lo, f_hi]; the baseline sees the
  real clock, so a clock outside the range is extrapolated by the physics (compute ∝ 1/f), not
  by constant trees. Batch/KV/prefill beyond the training range: trees saturate, the baseline
  extrapolates linearly. Negative inputs are clipped to 0.

The paper (throttLL'eM, HPCA 2025) predicts iterations per second; we predict seconds (what the
forecaster sums) and report R², MAPE and MAE on iterations per second, as the paper does.

ONNX
----
One graph: input ``X`` double [N, 4] (batch, kv_tokens, prefill_tokens, clock_mhz), output
``iteration_time_s`` double [N, 1]. Exported with skl2onnx through a converter registered for
`PerfRegressor` (the baseline as ``MatMul`` on a basis built in-graph; the trees as one
``ai.onnx.ml.TreeEnsembleRegressor`` written from the fitted ``HistGradientBoostingRegressor``
with double thresholds, because skl2onnx 1.20's own converter for it fails under scikit-learn
1.9: "Expected an int, got a boolean" on ``nodes_missing_value_tracks_true``). Training checks
ONNX Runtime against scikit-learn on every training row and a probe of the whole state space
(clocks outside the range included); a max relative difference above `PARITY_RTOL` is a
ModelError. Model metadata (``metadata_props``) carries the setup, the trained ranges and the
grid domain the runtime compiles.

    throttllem train perf --data runs/profile.csv --setup h100-llama3-8b-tp1
    throttllem train perf --data twin --setup h100-llama2-13b-tp2 --samples 12000 --seed 0
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import numpy.typing as npt

from throttllem._data import models_dir
from throttllem._errors import ConfigError, ModelError
from throttllem._onnx import onnx_session
from throttllem._perf.runtime import (
    ATTENTION_FEATURES,
    BASELINE_TERMS,
    CARD_FILE,
    FEATURES,
    FORMAT_VERSION,
    INPUT_NAME,
    METRICS_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    Baseline,
    Metrics,
    compute_metrics,
)
from throttllem._perf.table import ProfileTable, concat, read_table
from throttllem._setup import load_setup

FloatArray = npt.NDArray[np.float64]

BASIS_TERMS: Final = BASELINE_TERMS
PHYSICAL_TERMS: Final = frozenset({"1", "kv", "r", "r*b", "r*p", "r*p^2", "r*a2"})
SMALL_DATA_ROWS: Final = 200
PARITY_RTOL: Final = 1e-5
# Basis column scales, so NNLS works on numbers of order 1 (kv in 1e5 tokens, b in 100s,
# p in 1000s); folded into the exported coefficients.
_SCALE: Final = np.array([1.0, 1e-5, 1e-2, 1e-3, 1.0, 1e-5, 1e-2, 1e-3, 1e-6, 1e-6])
# The attention term each kind of model does not use (see runtime.BASELINE_TERMS).
_UNUSED_TERM: Final = {False: "r*a2", True: "r*p^2"}
DEFAULT_OUT_ROOT: Final = models_dir() / "perf"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters (chosen on the twin tables of both setups, see the model card)."""

    max_iter: int = 100
    max_leaf_nodes: int = 15
    learning_rate: float = 0.3
    min_samples_leaf: int | None = None  # None: clip(n_train // 20, 3, 20)
    l2_regularization: float = 0.0
    seed: int = 0


def _threadpool_limits() -> Any:
    """threadpoolctl.threadpool_limits (a scikit-learn dependency; untyped, hence the import)."""
    return importlib.import_module("threadpoolctl").threadpool_limits


def _basis(x: FloatArray, ref_clock_mhz: float) -> FloatArray:
    """The baseline's 10 basis columns, *unscaled* (see `_SCALE`); a2 = Σ prompt² from the
    fifth column when `x` has one, else p² (one prompt per pass)."""
    b, kv, p = (np.maximum(x[:, i], 0.0) for i in range(3))
    r = ref_clock_mhz / np.maximum(x[:, 3], 1.0)
    one = np.ones_like(b)
    a2 = np.maximum(x[:, 4], 0.0) if x.shape[1] > 4 else p * p
    return np.stack([one, kv, b, p, r, r * kv, r * b, r * p, r * p * p, r * a2], axis=1)


def _tree_features(x: FloatArray, clock_lo: float, clock_hi: float) -> FloatArray:
    return np.stack([np.maximum(x[:, 0], 0.0), np.maximum(x[:, 1], 0.0),
                     np.maximum(x[:, 2], 0.0), np.clip(x[:, 3], clock_lo, clock_hi)], axis=1)


class PerfRegressor:
    """Physics baseline × boosted trees (module docstring); scikit-learn estimator style.

    ``fit(X, seconds)`` with X columns (batch, kv_tokens, prefill_tokens, clock_mhz[,
    prefill_attn_tokens2]); ``predict(X)`` → seconds. With the fifth column the baseline's
    attention term is r·Σ prompt² instead of r·p² (``attention_``); the trees never see it,
    so the model is linear in Σ prompt² (the runtime's grid relies on that). Fitted
    attributes end in ``_``.
    """

    def __init__(self, *, ref_clock_mhz: float = 1980.0, config: TrainConfig | None = None) -> None:
        self.ref_clock_mhz = ref_clock_mhz
        self.config = config or TrainConfig()

    def fit(self, x: npt.ArrayLike, seconds: npt.ArrayLike) -> PerfRegressor:
        from sklearn.ensemble import HistGradientBoostingRegressor  # noqa: PLC0415

        nnls = importlib.import_module("scipy.optimize").nnls
        threadpool_limits = _threadpool_limits()
        xa = np.asarray(x, dtype=np.float64)
        t = np.asarray(seconds, dtype=np.float64)
        if (xa.ndim != 2 or xa.shape[1] not in (len(FEATURES), len(ATTENTION_FEATURES))
                or len(t) != len(xa)):
            raise ConfigError(f"X must be [n, {len(FEATURES)}] ({', '.join(FEATURES)}) or "
                              f"[n, {len(ATTENTION_FEATURES)}] (and {ATTENTION_FEATURES[-1]}) "
                              "and seconds [n]")
        if len(t) < 2 or not np.all(np.isfinite(xa)) or not np.all(t > 0):
            raise ConfigError("training needs at least 2 rows of finite features and "
                              "positive times")
        n = len(t)
        self.n_train_ = n
        self.clock_lo_ = float(xa[:, 3].min())
        self.clock_hi_ = float(xa[:, 3].max())
        self.basis_ = "full" if n >= SMALL_DATA_ROWS else "physical"
        self.attention_ = xa.shape[1] == len(ATTENTION_FEATURES)
        unused = _UNUSED_TERM[self.attention_]
        keep = np.array([(self.basis_ == "full" or term in PHYSICAL_TERMS) and term != unused
                         for term in BASIS_TERMS])
        a = _basis(xa, self.ref_clock_mhz) * _SCALE
        rows = a[:, keep] / t[:, None]  # relative error: (A c - t)/t
        norm = np.linalg.norm(rows, axis=0)
        norm[norm == 0] = 1.0
        c_kept, _ = nnls(rows / norm, np.ones(n), maxiter=50 * rows.shape[1])
        coef = np.zeros(len(BASIS_TERMS))
        coef[keep] = c_kept / norm
        self.coef_ = coef * _SCALE  # for the unscaled basis
        base = self.baseline(xa)
        if not np.all(base > 0):
            raise ModelError("the fitted baseline is not positive on every training row")
        cfg = self.config
        msl = cfg.min_samples_leaf or int(np.clip(n // 20, 3, 20))
        self.trees_ = HistGradientBoostingRegressor(
            max_iter=cfg.max_iter, max_leaf_nodes=cfg.max_leaf_nodes,
            learning_rate=cfg.learning_rate, min_samples_leaf=msl,
            l2_regularization=cfg.l2_regularization, early_stopping=False,
            random_state=cfg.seed)
        # One thread: deterministic sums (byte-identical retrains) and no OpenMP spinning on
        # a shared 2-core machine.
        with threadpool_limits(1):
            self.trees_.fit(_tree_features(xa, self.clock_lo_, self.clock_hi_),
                            np.log(t / base))
        return self

    def baseline(self, x: npt.ArrayLike) -> FloatArray:
        xa = np.asarray(x, dtype=np.float64)
        return np.asarray(_basis(xa, self.ref_clock_mhz) @ self.coef_, dtype=np.float64)

    def log_correction(self, x: npt.ArrayLike) -> FloatArray:
        threadpool_limits = _threadpool_limits()
        xa = np.asarray(x, dtype=np.float64)
        with threadpool_limits(1):
            return np.asarray(self.trees_.predict(
                _tree_features(xa, self.clock_lo_, self.clock_hi_)), dtype=np.float64)

    def predict(self, x: npt.ArrayLike) -> FloatArray:
        xa = np.asarray(x, dtype=np.float64)
        return np.asarray(self.baseline(xa) * np.exp(self.log_correction(xa)), dtype=np.float64)


class TreesOnlyRegressor:
    """Ablation: the same trees on log(seconds) with no baseline (the paper's plain GBT)."""

    def __init__(self, config: TrainConfig | None = None) -> None:
        self.config = config or TrainConfig()

    def fit(self, x: npt.ArrayLike, seconds: npt.ArrayLike) -> TreesOnlyRegressor:
        from sklearn.ensemble import HistGradientBoostingRegressor  # noqa: PLC0415

        threadpool_limits = _threadpool_limits()
        xa = np.asarray(x, dtype=np.float64)
        n = len(xa)
        cfg = self.config
        self.trees_ = HistGradientBoostingRegressor(
            max_iter=cfg.max_iter, max_leaf_nodes=cfg.max_leaf_nodes,
            learning_rate=cfg.learning_rate,
            min_samples_leaf=cfg.min_samples_leaf or int(np.clip(n // 20, 3, 20)),
            early_stopping=False, random_state=cfg.seed)
        with threadpool_limits(1):
            self.trees_.fit(xa, np.log(np.asarray(seconds, dtype=np.float64)))
        return self

    def predict(self, x: npt.ArrayLike) -> FloatArray:
        with _threadpool_limits()(1):
            return np.asarray(np.exp(self.trees_.predict(np.asarray(x, dtype=np.float64))),
                              dtype=np.float64)


# --------------------------------------------------------------------------- ONNX export


def _shape_calculator(operator: Any) -> None:
    from skl2onnx.common.data_types import DoubleTensorType  # noqa: PLC0415

    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = DoubleTensorType([n, 1])


def _tree_attributes(trees: Any) -> dict[str, Any]:
    """``TreeEnsembleRegressor`` attributes of a fitted HistGradientBoostingRegressor.

    HGBR sends x to the left child when ``x <= num_threshold`` (NaN follows
    ``missing_go_to_left``; our inputs are never NaN), so nodes are BRANCH_LEQ with the
    double threshold; leaf values already include the learning rate.
    """
    from onnx import numpy_helper  # noqa: PLC0415

    tree_ids: list[int] = []
    node_ids: list[int] = []
    features: list[int] = []
    modes: list[str] = []
    values: list[float] = []
    true_ids: list[int] = []
    false_ids: list[int] = []
    missing: list[int] = []
    leaf_tree: list[int] = []
    leaf_node: list[int] = []
    leaf_weight: list[float] = []
    for tree_id, per_iter in enumerate(trees._predictors):
        (predictor,) = per_iter
        for node_id, node in enumerate(predictor.nodes):
            tree_ids.append(tree_id)
            node_ids.append(node_id)
            if node["is_leaf"]:
                features.append(0)
                modes.append("LEAF")
                values.append(0.0)
                true_ids.append(0)
                false_ids.append(0)
                missing.append(0)
                leaf_tree.append(tree_id)
                leaf_node.append(node_id)
                leaf_weight.append(float(node["value"]))
            else:
                features.append(int(node["feature_idx"]))
                modes.append("BRANCH_LEQ")
                values.append(float(node["num_threshold"]))
                true_ids.append(int(node["left"]))
                false_ids.append(int(node["right"]))
                missing.append(int(node["missing_go_to_left"]))
    base = float(np.asarray(trees._baseline_prediction).ravel()[0])
    return {
        "n_targets": 1, "aggregate_function": "SUM", "post_transform": "NONE",
        "nodes_treeids": tree_ids, "nodes_nodeids": node_ids, "nodes_featureids": features,
        "nodes_modes": modes, "nodes_truenodeids": true_ids, "nodes_falsenodeids": false_ids,
        "nodes_missing_value_tracks_true": missing,
        "nodes_values_as_tensor": numpy_helper.from_array(np.asarray(values, dtype=np.float64)),
        "target_treeids": leaf_tree, "target_nodeids": leaf_node,
        "target_ids": [0] * len(leaf_tree),
        "target_weights_as_tensor": numpy_helper.from_array(
            np.asarray(leaf_weight, dtype=np.float64)),
        "base_values_as_tensor": numpy_helper.from_array(np.asarray([base], dtype=np.float64)),
    }


def _converter(scope: Any, operator: Any, container: Any) -> None:
    from onnx import TensorProto  # noqa: PLC0415

    model: PerfRegressor = operator.raw_operator
    x = operator.inputs[0].full_name
    out = operator.outputs[0].full_name
    opv = container.target_opset

    def name(hint: str) -> str:
        return str(scope.get_unique_variable_name(hint))

    def const(hint: str, value: npt.ArrayLike, dtype: Any = np.float64) -> str:
        arr = np.asarray(value, dtype=dtype)
        n = name(hint)
        proto = TensorProto.INT64 if arr.dtype == np.int64 else TensorProto.DOUBLE
        container.add_initializer(n, proto, list(arr.shape), arr.ravel().tolist())
        return n

    def node(op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        o = name(hint)
        container.add_node(op, inputs, [o], name=name(op), op_version=opv, **attrs)
        return o

    zero = const("zero", [0.0])
    cols = []
    attention = bool(getattr(model, "attention_", False))
    for i, col in enumerate(ATTENTION_FEATURES if attention else FEATURES):
        sliced = node("Slice", [x, const(f"s{i}", [i], np.int64), const(f"e{i}", [i + 1], np.int64),
                                const(f"a{i}", [1], np.int64)], col)
        cols.append(sliced)
    b, kv, p = (node("Max", [c, zero], f"{FEATURES[i]}_pos") for i, c in enumerate(cols[:3]))
    clock = cols[3]
    f_base = node("Max", [clock, const("one_mhz", [1.0])], "clock_floor")
    r = node("Div", [const("ref_clock", [model.ref_clock_mhz]), f_base], "r")
    one = node("Add", [node("Mul", [b, zero], "zeros"), const("one", [1.0])], "ones")
    rkv = node("Mul", [r, kv], "r_kv")
    rb = node("Mul", [r, b], "r_b")
    rp = node("Mul", [r, p], "r_p")
    # the attention term: r·p² without the attention input, r·Σ prompt² with it (the
    # model's coefficient of the other term is 0, so it is left out of the graph)
    coef = np.asarray(model.coef_, dtype=np.float64)
    if attention:
        a2 = node("Max", [cols[4], zero], "prefill_attn_tokens2_pos")
        attn = node("Mul", [r, a2], "r_a2")
        coef = np.concatenate((coef[:8], coef[9:10]))
    else:
        attn = node("Mul", [rp, p], "r_p2")
        coef = coef[:9]
    basis = node("Concat", [one, kv, b, p, r, rkv, rb, rp, attn], "basis", axis=1)
    base = node("MatMul", [basis, const("coef", coef.reshape(-1, 1))], "baseline_s")
    f_clip = node("Clip", [clock, const("clock_lo", model.clock_lo_),
                           const("clock_hi", model.clock_hi_)], "clock_clipped")
    tree_in = node("Concat", [b, kv, p, f_clip], "tree_features", axis=1)
    g = name("log_correction_f32")
    container.add_node("TreeEnsembleRegressor", [tree_in], [g], op_domain="ai.onnx.ml",
                       op_version=3, name=name("TreeEnsembleRegressor"),
                       **_tree_attributes(model.trees_))
    g64 = node("Cast", [g], "log_correction", to=TensorProto.DOUBLE)
    factor = node("Exp", [g64], "correction")
    container.add_node("Mul", [base, factor], [out], name=name("Mul"), op_version=opv)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED  # noqa: PLW0603 (one-time registration with skl2onnx)
    if _REGISTERED:
        return
    from skl2onnx import update_registered_converter  # noqa: PLC0415

    update_registered_converter(PerfRegressor, "ThrottllemPerfRegressor", _shape_calculator,
                                _converter)
    _REGISTERED = True


def to_onnx(model: PerfRegressor, metadata: dict[str, str]) -> bytes:
    """The fitted model as one ONNX graph (see the module docstring) with `metadata`."""
    import warnings  # noqa: PLC0415

    import onnx  # noqa: PLC0415
    from skl2onnx import convert_sklearn  # noqa: PLC0415
    from skl2onnx.common.data_types import DoubleTensorType  # noqa: PLC0415

    _register()
    with warnings.catch_warnings():
        # skl2onnx/onnx emit deprecation chatter while converting; not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        onx = convert_sklearn(
            model, name="throttllem_perf",
            initial_types=[(INPUT_NAME, DoubleTensorType(
                [None, len(ATTENTION_FEATURES if model.attention_ else FEATURES)]))],
            final_types=[(OUTPUT_NAME, DoubleTensorType([None, 1]))],
            target_opset={"": 17, "ai.onnx.ml": 3})
    # skl2onnx collects opset imports in a set: order them, or the bytes change with
    # PYTHONHASHSEED and a retrain is not byte-identical
    imports = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    for domain, version in imports:
        onx.opset_import.add(domain=domain, version=version)
    onx.producer_name = "throttllem"
    onx.doc_string = ("throttLL'eM performance model: seconds per iteration from ("
                      + ", ".join(ATTENTION_FEATURES if model.attention_ else FEATURES) + ")")
    onnx.helper.set_model_props(onx, metadata)
    onnx.checker.check_model(onx)
    data: bytes = onx.SerializeToString()
    return data


def parity(model: PerfRegressor, onnx_bytes: bytes, x: FloatArray) -> float:
    """Max relative difference between ONNX Runtime and scikit-learn on rows `x`."""
    sess = onnx_session(onnx_bytes, "the freshly exported model")
    ort_s = np.asarray(sess.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float64)})[0],
                       dtype=np.float64).ravel()
    skl_s = model.predict(x)
    return float(np.max(np.abs(ort_s - skl_s) / skl_s))


def parity_probe(model: PerfRegressor, grid: dict[str, float], seed: int) -> FloatArray:
    """Random points over the whole state space, clocks past both ends included."""
    rng = np.random.default_rng(seed)
    n = 4000
    hi_clock = grid["clock_max_mhz"]
    x = np.stack([
        rng.integers(0, int(grid["batch_max"] * 1.5) + 2, n).astype(np.float64),
        rng.uniform(0, grid["kv_max"] * 1.5, n).round(),
        np.where(rng.uniform(size=n) < 0.5, 0.0, rng.uniform(0, grid["prefill_max"] * 1.5, n)),
        rng.uniform(100.0, hi_clock * 1.2, n).round(),
    ], axis=1)
    if not model.attention_:
        return x
    # Σ prompt² between that of many short prompts and that of one (p²)
    return np.concatenate((x, (x[:, 2] ** 2 * rng.uniform(0.05, 1.0, n))[:, None]), axis=1)


# --------------------------------------------------------------------------- evaluation


def _xy(table: ProfileTable, attention: bool) -> tuple[FloatArray, FloatArray]:
    b, kv, p, f = table.features()
    cols = [b, kv, p, f, table.attention_tokens2()] if attention else [b, kv, p, f]
    return np.stack(cols, axis=1), table.iter_s


def use_attention(table: ProfileTable, attention: str) -> tuple[bool, str]:
    """Whether to train with the Σ prompt² input (`attention`: ``auto``, ``on``, ``off``)
    and why; ``auto`` uses it when every row's Σ prompt² is known, ``on`` insists on it."""
    if attention not in ("auto", "on", "off"):
        raise ConfigError(f"attention must be auto, on or off, not {attention!r}")
    if attention == "off":
        return False, "off (asked for)"
    unknown = int(np.isnan(table.attention_tokens2()).sum())
    if not unknown:
        return True, "every row's Σ prompt² is known"
    why = (f"{unknown} of {len(table)} rows lack Σ prompt² (mixed rows, or prefill rows of "
           "several prompts, without a prefill_attn_tokens2 cell)")
    if attention == "on":
        raise ConfigError(f"{table.path}: cannot train with the attention input: {why}")
    return False, why


def _split_metrics(make: Any, x: FloatArray, t: FloatArray, phases: Sequence[str], *,
                   frac: float, seed: int, repeats: int, stratify: bool = False
                   ) -> dict[str, Any]:
    """Train on `frac` of the rows, score on the rest; `repeats` seeded random splits (for
    tables under 1000 rows the 90% split is a repeated 10-fold cross-validation)."""
    n = len(t)
    rng = np.random.default_rng(seed)
    ph = np.asarray(phases)
    runs: list[Metrics] = []
    if frac >= 0.9 and n < 1000:
        folds_n = 10
        for _ in range(repeats):
            perm = rng.permutation(n)
            pred = np.empty(n)
            for fold in np.array_split(perm, folds_n):
                train = np.setdiff1d(perm, fold)
                pred[fold] = make().fit(x[train], t[train]).predict(x[fold])
            runs.append(compute_metrics(t, pred, ph))
        how = (f"{repeats} x 10-fold cross-validation (each row predicted by a model that "
               "never saw it)")
    else:
        for _ in range(repeats):
            k = max(2, round(frac * n))
            train = _stratified(rng, ph, k) if stratify else rng.permutation(n)[:k]
            test = np.setdiff1d(np.arange(n), train)
            pred = make().fit(x[train], t[train]).predict(x[test])
            runs.append(compute_metrics(t[test], pred, ph[test]))
        how = (f"{repeats} random split(s), {'stratified by phase, ' if stratify else ''}"
               f"train {max(2, round(frac * n))} / test {n - max(2, round(frac * n))} rows")
    return _summarise(runs, how)


def _stratified(rng: np.random.Generator, ph: npt.NDArray[Any], k: int) -> npt.NDArray[np.int64]:
    """k rows with every phase present at least once, in proportion otherwise."""
    kinds = sorted(set(ph.tolist()))
    picks: list[int] = []
    for kind in kinds:
        idx = np.flatnonzero(ph == kind)
        m = max(1, round(k * len(idx) / len(ph)))
        picks.extend(rng.choice(idx, size=min(m, len(idx)), replace=False).tolist())
    return np.asarray(sorted(picks[:max(k, len(kinds))]), dtype=np.int64)


def _summarise(runs: Sequence[Metrics], how: str) -> dict[str, Any]:
    def agg(key: str) -> dict[str, float]:
        v = np.asarray([getattr(m, key) for m in runs], dtype=np.float64)
        return {"mean": float(v.mean()), "median": float(np.median(v)),
                "min": float(v.min()), "max": float(v.max())}

    first = runs[0]
    out: dict[str, Any] = {
        "how": how, "runs": len(runs), "n_test": first.n,
        "r2": float(np.mean([m.r2 for m in runs])),
        "mape_pct": float(np.mean([m.mape_pct for m in runs])),
        "mae_iters_per_s": float(np.mean([m.mae_iters_per_s for m in runs])),
        "time_mape_pct": float(np.mean([m.time_mape_pct for m in runs])),
        "p99_ape_pct": float(np.mean([m.p99_ape_pct for m in runs])),
        "max_ape_pct": float(np.max([m.max_ape_pct for m in runs])),
        "mape_pct_by_phase": {k: float(np.mean([m.mape_by_phase.get(k, math.nan) for m in runs]))
                              for k in sorted({k for m in runs for k in m.mape_by_phase})},
    }
    if len(runs) > 1:
        out["spread"] = {k: agg(k) for k in ("r2", "mape_pct", "mae_iters_per_s")}
    return out


# --------------------------------------------------------------------------- the command


def _grid_domain(setup: str, x: FloatArray) -> dict[str, float]:
    p = load_setup(setup)
    g = p.gpu
    return {
        "batch_max": float(max(p.engine.max_batch, x[:, 0].max())),
        "kv_max": float(max(p.engine.kv_blocks * p.engine.block_tokens, x[:, 1].max())),
        "prefill_max": float(max(p.engine.max_batched_tokens, p.model.max_model_len,
                                 x[:, 2].max())),
        "clock_min_mhz": float(g.clock_min_mhz), "clock_max_mhz": float(g.clock_max_mhz),
        "clock_step_mhz": float(g.clock_step_mhz),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_training_data(data: Sequence[str], setup: str, *, samples: int, seed: int,
                       log: TextIO) -> tuple[ProfileTable, list[dict[str, str]]]:
    """Tables from paths, ``data:<relative>`` (the shared data folder) or ``twin`` (profile
    the setup's twin now, in memory, with `samples` and `seed`)."""
    from throttllem._data import data_file  # noqa: PLC0415

    tables: list[ProfileTable] = []
    sources: list[dict[str, str]] = []
    for item in data:
        if item == "twin":
            import tempfile  # noqa: PLC0415

            from throttllem._perf.profiler import TWIN_NOISE_SIGMA, run_profile  # noqa: PLC0415

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "twin.csv"
                run_profile(setup=setup, out=path, samples=samples, seed=seed,
                            log=log)
                tables.append(read_table(path))
                digest = _sha256(path.read_bytes())
            sources.append({"source": f"twin profile of {setup}: {samples} iterations, seed "
                                      f"{seed}, noise sigma {TWIN_NOISE_SIGMA}",
                            "sha256": digest, "rows": str(samples)})
            continue
        path = data_file(item.removeprefix("data:")) if item.startswith("data:") else Path(item)
        table = read_table(path)
        tables.append(table)
        label = item if item.startswith("data:") else str(path)
        sources.append({"source": label, "sha256": _sha256(path.read_bytes()),
                        "rows": str(len(table))})
    return concat(tables), sources


def train_perf_model(data: Sequence[str], setup: str, out_dir: str | Path | None = None, *,
                     samples: int = 12_000, seed: int = 0, config: TrainConfig | None = None,
                     repeats: int | None = None, command: str = "", attention: str = "auto",
                     log: TextIO | None = None) -> dict[str, Any]:
    """Evaluate at the 90% and 10% splits, fit on all rows, export, check parity, write
    ``model.onnx``, ``metrics.json`` and ``MODEL_CARD.md``; returns the metrics."""
    log = sys.stderr if log is None else log
    cfg = config or TrainConfig(seed=seed)
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / setup
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    profile = load_setup(setup)
    table, sources = load_training_data(data, setup, samples=samples, seed=seed, log=log)
    with_attention, attention_why = use_attention(table, attention)
    x, t = _xy(table, with_attention)
    print(f"train perf: attention input (Σ prompt²) {'on' if with_attention else 'off'}: "
          f"{attention_why}", file=log)
    features = ATTENTION_FEATURES if with_attention else FEATURES
    if len(t) < 10:
        raise ConfigError(f"{table.path}: {len(t)} rows; training needs at least 10")
    ref = float(profile.gpu.clock_max_mhz)
    n = len(t)
    reps = repeats if repeats is not None else (1 if n >= 1000 else 5)
    reps10 = repeats if repeats is not None else (1 if n >= 1000 else 20)

    def make() -> PerfRegressor:
        return PerfRegressor(ref_clock_mhz=ref, config=cfg)

    print(f"train perf: {n} rows ({', '.join(s['source'] for s in sources)}); evaluating "
          "90% / 10% splits", file=log)
    splits: dict[str, Any] = {
        "90": _split_metrics(make, x, t, table.phase, frac=0.9, seed=cfg.seed, repeats=reps),
        "10": _split_metrics(make, x, t, table.phase, frac=0.1, seed=cfg.seed + 1, repeats=reps10),
    }
    if n < 1000:
        splits["10_stratified"] = _split_metrics(make, x, t, table.phase, frac=0.1,
                                                 seed=cfg.seed + 2, repeats=reps10,
                                                 stratify=True)
    ablation = {
        "trees_only_10": _split_metrics(lambda: TreesOnlyRegressor(cfg), x, t, table.phase,
                                        frac=0.1, seed=cfg.seed + 1, repeats=reps10),
    }
    model = make().fit(x, t)
    grid = _grid_domain(setup, x)
    metadata = {
        "throttllem.perf.format": FORMAT_VERSION,
        "setup": setup,
        "features": ",".join(features),
        "output": OUTPUT_NAME,
        "ref_clock_mhz": repr(ref),
        "trained_clock_min_mhz": repr(model.clock_lo_),
        "trained_clock_max_mhz": repr(model.clock_hi_),
        "trained_batch_max": repr(float(x[:, 0].max())),
        "trained_kv_max": repr(float(x[:, 1].max())),
        "trained_prefill_max": repr(float(x[:, 2].max())),
        "basis": model.basis_,
        "rows": str(n),
        "data_sha256": ",".join(s["sha256"] for s in sources),
        **{f"grid_{k}": repr(v) for k, v in grid.items()},
    }
    onnx_bytes = to_onnx(model, metadata)
    probe = parity_probe(model, grid, cfg.seed)
    worst = max(parity(model, onnx_bytes, x), parity(model, onnx_bytes, probe))
    if not worst <= PARITY_RTOL:
        raise ModelError(f"ONNX Runtime disagrees with scikit-learn: max relative difference "
                         f"{worst:.3g} > {PARITY_RTOL:g}")
    grid_check = _grid_agreement(onnx_bytes, metadata, x, t, table.phase, baseline=
                                 Baseline(tuple(model.coef_.tolist()), ref))
    metrics: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": out.resolve().name,
        "setup": setup,
        "model_sha256": _sha256(onnx_bytes),
        "data": sources,
        "rows": n,
        "rows_by_phase": {k: int(v) for k, v in zip(*np.unique(table.phase, return_counts=True),
                                                    strict=True)},
        "trained_clock_range_mhz": [model.clock_lo_, model.clock_hi_],
        "features": list(features),
        "attention_input": attention_why,
        "basis": model.basis_,
        "baseline_coef": {k: v for k, v in zip(BASIS_TERMS, model.coef_.tolist(), strict=True)
                          if k != _UNUSED_TERM[with_attention]},
        "config": asdict(cfg),
        "trees": int(model.trees_.n_iter_),
        "onnx_bytes": len(onnx_bytes),
        "onnx_vs_sklearn_max_rel_diff": worst,
        "splits": splits,
        "ablation": ablation,
        "grid_domain": grid,
        "grid_vs_onnx_on_training_rows": grid_check,
        "retrain": command,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(onnx_bytes)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / CARD_FILE).write_text(model_card(metrics, profile.description), encoding="utf-8")
    s90, s10 = splits["90"], splits["10"]
    print(f"train perf: wrote {out / MODEL_FILE} ({len(onnx_bytes) / 1e3:.0f} kB), "
          f"ONNX-vs-sklearn max rel diff {worst:.2g}; held-out R2={s90['r2']:.4f} "
          f"MAPE={s90['mape_pct']:.2f}% at 90%, R2={s10['r2']:.4f} MAPE={s10['mape_pct']:.2f}% "
          "at 10%", file=log)
    return metrics


def _grid_agreement(onnx_bytes: bytes, metadata: dict[str, str], x: FloatArray, t: FloatArray,
                    phases: Sequence[str], *, baseline: Baseline) -> dict[str, float]:
    """Compile the serving grid of the exported model and compare it with ONNX on the
    training rows (agreement, and both models' in-sample MAPE)."""
    from throttllem._perf.runtime import PerfRuntime  # noqa: PLC0415

    rt = PerfRuntime(onnx_session(onnx_bytes, "the exported model"), Path("(in memory)"),
                     metadata, _sha256(onnx_bytes), baseline=baseline)
    rt.compile_grid()
    b, kv, p, f = (x[:, i] for i in range(4))
    a2 = x[:, 4] if x.shape[1] > 4 else None
    onnx_s = rt.predict_onnx(b, kv, p, f, a2)
    grid_s = np.asarray(rt.iteration_time_s(b, kv, p, f, a2), dtype=np.float64)
    rel = np.abs(grid_s - onnx_s) / onnx_s * 100.0
    return {"median_pct": float(np.median(rel)), "p99_pct": float(np.percentile(rel, 99)),
            "max_pct": float(rel.max()),
            "onnx_mape_pct": compute_metrics(t, onnx_s, phases).mape_pct,
            "grid_mape_pct": compute_metrics(t, grid_s, phases).mape_pct}


# --------------------------------------------------------------------------- model card


def _row(label: str, m: dict[str, Any]) -> str:
    return (f"| {label} | {m['r2']:.4f} | {m['mape_pct']:.2f}% | {m['mae_iters_per_s']:.3f} | "
            f"{m['time_mape_pct']:.2f}% | {m['p99_ape_pct']:.2f}% | {m['n_test']} | {m['how']} |")


def model_card(m: dict[str, Any], description: str) -> str:
    """MODEL_CARD.md from the metrics (everything in it is in metrics.json too)."""
    splits = m["splits"]
    attention = "prefill_attn_tokens2" in m["features"]
    twin = any(s["source"].startswith("twin profile") for s in m["data"])
    kind = ("a **twin** profile: simulated iterations (the twin's time model; see the setup "
            "profile's sources for what is measured, fitted or derived there)" if twin else
            "**measured** iterations")
    lines = [
        f"# Performance model `{m['name']}`",
        "",
        f"Seconds per engine iteration for setup `{m['setup']}` ({description}), from (decode "
        "batch, KV tokens, prefill tokens, SM clock" + (", Σ prompt² of the pass's prefills"
                                                        if attention else "")
        + "), trained on " + kind + ". Served by "
        "`throttllem._perf.runtime.PerfRuntime` (ONNX Runtime; the forecaster uses its "
        "precompiled grid, see below).",
        "",
        "## Data",
        "",
    ]
    for s in m["data"]:
        lines.append(f"- {s['source']} — {s['rows']} rows, sha256 `{s['sha256'][:16]}…`")
    phases = ", ".join(f"{k} {v}" for k, v in m["rows_by_phase"].items())
    lo, hi = m["trained_clock_range_mhz"]
    lines += [
        "",
        f"{m['rows']} rows ({phases}); observed SM clocks {lo:.0f}–{hi:.0f} MHz. One row per "
        "iteration (twin) or per measured configuration (GPU tables: median of repeats). The "
        "clock feature is the clock the GPU was *observed* at, not the one requested.",
        "",
        "## Features and model",
        "",
        f"Input `X` = [{', '.join(m['features'])}] (double, [N, {len(m['features'])}]); "
        "output `iteration_time_s` [N, 1]. Table rows map to features as: decode → (batch, "
        "batch × ctx, 0), prefill → (0, 0, batch × tokens), mixed → (batch, kv_tokens, "
        "prefill_tokens) (see `throttllem._perf.table`)." + (
            " The fifth input, prefill_attn_tokens2, is Σ L² over the prompts L the pass "
            "prefills (causal prefill attention costs that; the profile column of that "
            "name, see `ProfileTable.attention_tokens2`); a caller that does not give it gets "
            "prefill_tokens² (one prompt per pass, an upper bound). Why this model has it: "
            f"{m.get('attention_input', '')}." if attention else
            " No Σ prompt² input (" + m.get("attention_input", "trained before it existed")
            + "): the model assumes every pass prefills one prompt."),
        "",
        "t = base · exp(g): `base` = non-negative least-squares roofline "
        "c0 + c1·kv + c2·b + c3·p + r·(c4 + c5·kv + c6·b + c7·p + "
        + ("c8·Σ prompt²" if attention else "c8·p²") + "), r = f_top/f "
        f"(basis: {m['basis']}); g = HistGradientBoostingRegressor "
        f"({m['trees']} trees, ≤ {m['config']['max_leaf_nodes']} leaves, learning rate "
        f"{m['config']['learning_rate']}) on log(t/base), clock clipped to the trained range"
        + (" (the trees do not see Σ prompt², so t is linear in it)" if attention else "")
        + ". "
        "Clocks outside "
        f"{lo:.0f}–{hi:.0f} MHz are extrapolated by the baseline alone (compute ∝ 1/f): "
        "**unvalidated there**." + (
            "" if lo - m["grid_domain"]["clock_min_mhz"] < 100 else
            f" This model saw only {lo:.0f}–{hi:.0f} MHz (the clocks the card chose by "
            "itself): a controller must not trust it below that, so restrict the clock "
            "search to `PerfRuntime.trained_clock_range_mhz`."),
        "",
        f"ONNX: {m['onnx_bytes'] / 1e3:.0f} kB; ONNX Runtime vs scikit-learn max relative "
        f"difference {m['onnx_vs_sklearn_max_rel_diff']:.2g} on every training row and 4000 "
        "probe points (clocks 100 MHz to 1.2× the top clock).",
        "",
        "## Accuracy on held-out iterations",
        "",
        "As in the throttLL'eM paper: R², MAPE and MAE on **iterations per second** "
        "(1 / iteration time); also the MAPE of the time itself and the 99th percentile of "
        "the absolute percentage error.",
        "",
        "| training split | R² | MAPE | MAE (iters/s) | time MAPE | p99 APE | test rows | how |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        _row("90%", splits["90"]),
        _row("10%", splits["10"]),
    ]
    if "10_stratified" in splits:
        lines.append(_row("10%, stratified by phase", splits["10_stratified"]))
    lines.append(_row("10%, ablation: trees only, no baseline",
                      m["ablation"]["trees_only_10"]))
    lines += ["", "MAPE by phase (held out): " + "; ".join(
        f"{label}: " + ", ".join(f"{k} {v:.2f}%" for k, v in splits[key]
                                 ["mape_pct_by_phase"].items())
        for key, label in (("90", "90%"), ("10", "10%"))) + "."]
    if int(m["rows"]) < 1000:
        s10 = splits["10"]
        spread = s10.get("spread")  # only with more than one draw (`--repeats` > 1)
        if spread is not None:
            drawn = (f"spread over {s10['runs']} draws: MAPE "
                     f"{spread['mape_pct']['min']:.1f}–{spread['mape_pct']['max']:.1f}%, "
                     f"median {spread['mape_pct']['median']:.1f}%")
        else:
            drawn = (f"a single draw here, MAPE {s10['mape_pct']:.1f}%: no spread to report; "
                     "retrain with `--repeats` above 1 to see it")
        lines += [
            "",
            f"**Small table.** The 10% split trains on {max(2, round(0.1 * m['rows']))} rows. "
            "A random draw often holds no prefill row at all, and then prefill cannot be "
            f"predicted ({drawn}). The stratified row forces at "
            "least one row of each phase into training. These numbers say how little data "
            "is enough, not how good the shipped model is: it is trained on all rows.",
        ]
    gd = m["grid_domain"]
    ga = m["grid_vs_onnx_on_training_rows"]
    lines += [
        "",
        "## Serving",
        "",
        "`PerfRuntime.load(dir)` loads the ONNX once (ONNX Runtime, 1 intra-op thread) and, by "
        "default, compiles it into a dense grid over (batch, KV, prefill, clock): batch "
        f"0–{gd['batch_max']:.0f}, KV 0–{gd['kv_max']:.0f} tokens, prefill "
        f"0–{gd['prefill_max']:.0f} tokens, clocks {gd['clock_min_mhz']:.0f}–"
        f"{gd['clock_max_mhz']:.0f} MHz every {gd['clock_step_mhz']:.0f} MHz, made monotone "
        "(non-increasing) in the clock with a running max from the top clock down, and "
        "answered by multilinear interpolation. "
        f"On the training rows the grid differs from ONNX by {ga['median_pct']:.2f}% "
        f"(median; p99 {ga['p99_pct']:.1f}%, max {ga['max_pct']:.1f}%), and fits them as "
        f"well (MAPE {ga['grid_mape_pct']:.2f}% vs {ga['onnx_mape_pct']:.2f}% for ONNX).",
        "",
        "Points beyond the grid's edge (a projection that overflows the KV cache, an engine "
        "larger than this setup) are extrapolated from the edge with the model's own "
        "baseline (`baseline_coef` in metrics.json), not by ONNX: past its training data "
        "the model *is* its roofline baseline times the trees' correction at the edge, and "
        "the grid computes that, kept monotone in the clock by a running max over the "
        "correction (which only raises a time). **Unvalidated there**: the model never saw "
        "such iterations, and the baseline's straight lines are all it has to go on.",
        "",
        "**The forecaster uses the grid** (`PerfRuntime.iteration_time_s`): a clock-search "
        "round (2,000 future iterations × a few clocks) costs a fraction of a millisecond "
        "on one core against tens of milliseconds through ONNX Runtime (a full 110-clock "
        "scan: under a millisecond against a quarter of a second), it is monotone in the "
        "clock by construction (so the clock search may bisect), and it is as accurate as "
        "the model it tabulates. ONNX (`PerfRuntime.predict_onnx`) is the reference (and "
        "answers clocks beyond the grid's). Numbers: `python benchmarks/bench_perf.py`.",
        "",
        "## How to retrain",
        "",
        "From the repository root (the same command without the main CLI: "
        "`python -m throttllem._cli_perf train perf …`):",
        "",
        "```bash",
        m["retrain"] or "throttllem train perf --data <table.csv> --setup <setup>",
        "```",
        "",
        "Deterministic: the same command on the same data gives the same `model.onnx` "
        f"(sha256 `{m['model_sha256'][:16]}…`). Score it on any table in the profile layout: "
        "`throttllem perf score --model <this folder> --data <table.csv>`.",
        "",
    ]
    return "\n".join(lines)

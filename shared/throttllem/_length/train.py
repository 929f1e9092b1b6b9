"""Training the generation-length model and exporting it to ONNX (needs the ``train`` extra:
scikit-learn, skl2onnx, onnx; serving needs only onnxruntime).

Model
-----
Two gradient-boosted quantile regressors (scikit-learn ``GradientBoostingRegressor``,
``loss="quantile"``, alpha = 0.5 and 0.9, fitted on sparse features) on ``log1p(output
tokens)``; quantiles commute with the monotone log, so ``expm1`` of the predictions are the
median and p90 of the length. (``HistGradientBoostingRegressor`` would train faster but
skl2onnx 1.20 fails to convert it under scikit-learn 1.9: "Expected an int, got a boolean" in
``nodes_missing_value_tracks_true``; ``GradientBoostingRegressor`` converts cleanly.)
Features (all computed *inside* the ONNX graph from its inputs):

* TF-IDF of the prompt's word unigrams/bigrams (``TfidfVectorizer``, ASCII word pattern
  ``[a-zA-Z0-9_]+`` so scikit-learn's ``re`` and ONNX Runtime's RE2 tokenize identically),
* one-hot of the generator (serving model) name: a request knows which model serves it, and
  mean answer length differs by ~1.5× between models. A share of training rows has it blanked
  (``generator_dropout``) so that an unknown / new model gets a sensible generic prediction,
* one-hot of the task kind (AlpacaEval's ``dataset`` field; blanked the same way since live
  requests rarely carry it),
* the prompt's token count (:func:`~throttllem._length.tokens.count_tokens`).

Requested ``max_tokens`` is *not* a feature: AlpacaEval requests have none. The runtime clips
both quantiles to it instead, which is exact (an answer never exceeds its cap).

Calibration (split-conformal, cross-fitted): out-of-fold predictions on the training prompts
(grouped K-fold by prompt) give a log-offset for the median (so half of the answers fall below
it) and for the upper quantile (so ≥ 90% fall below it, conformalized quantile regression).
The offsets, ``upper = max(upper, median)``, the ``expm1`` and a floor of 1 token are part of
the ONNX graph.

ONNX graph
----------
Inputs (all ``[N, 1]``): ``prompt`` (string), ``generator`` (string, "" = unknown), ``task``
(string, "" = unknown), ``prompt_tokens`` (float). Output ``lengths`` float ``[N, 2]``: the
median and upper-quantile length in tokens. Metadata (``custom_metadata_map``): token rule,
model version, quantiles, training mean length (the score baseline), known generators/tasks.
The prompt token count is a separate input because the counting rule is Python (it is fast:
~0.02 ms per prompt) and the same function must produce labels and features.

Exact scikit-learn ↔ ONNX Runtime parity needs care with skl2onnx 1.20 (each is checked on the
test rows at export, ModelError beyond ``PARITY_TOLERANCE_LOG``):

* ``sublinear_tf`` is silently ignored by the converter, so it is off;
* an n-gram whose words are not all unigrams of the vocabulary is exported as one token that
  never matches, so the vocabulary is closed under n-gram components;
* lower-casing is ASCII-only on both sides (:func:`~throttllem._length.tokens.ascii_lower`, and
  our own ``StringNormalizer`` with locale "C": ONNX Runtime's default en_US.UTF-8 locale is
  often not installed and the model would not load);
* skl2onnx orders opset imports by set iteration: they are sorted so retrains are
  byte-identical.
The graph uses the ``com.microsoft`` Tokenizer op, i.e. it runs on ONNX Runtime specifically.

Split
-----
By prompt text (hash of seed + instruction, :func:`~throttllem._length.data.is_heldout_prompt`),
so a test prompt is never seen in training under any generator; additionally one whole model
file (``holdout_generator``) is kept out of training to measure generalization to a new model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from throttllem._errors import ConfigError, ModelError
from throttllem._length.data import (
    CARD_FILE,
    METRICS_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    QUANTILES,
    UNKNOWN,
    LengthExample,
    as_jsonable,
    is_heldout_prompt,
    length_metrics,
    load_examples,
    prompt_group,
    resolve_data_paths,
)
from throttllem._length.tokens import TOKEN_RULE, ascii_lower
from throttllem._onnx import onnx_session

TOKEN_PATTERN = r"[a-zA-Z0-9_]+"
PARITY_TOLERANCE_LOG = 1e-3
"""Largest accepted |log1p(onnx) - log1p(sklearn)| over the evaluation prompts."""
AUTO_HOLDOUT_GENERATOR = "gpt-4o-2024-05-13"
"""Held out by default: a hosted model we never serve, so every served model stays in training."""
ERROR_QUANTILE_LEVELS = tuple(round(i / 100, 2) for i in range(101))

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained model (hashed into the model version)."""

    seed: int = 0
    test_fraction: float = 0.2
    holdout_generator: str | None = "auto"
    """A generator (model file) kept out of training to measure generalization; "auto" picks
    gpt-4o-2024-05-13 when present (a model we never serve), else none; None for none."""
    max_features: int = 1000
    ngram_max: int = 2
    min_df: int = 3
    n_estimators: int = 300
    max_depth: int = 4
    learning_rate: float = 0.05
    subsample: float = 0.7
    min_samples_leaf: int = 20
    generator_dropout: float = 0.25
    task_dropout: float = 0.25
    calib_folds: int = 3
    max_prompts: int | None = None
    """Use only this many distinct prompts (a deterministic subset; for fast tests)."""


@dataclass(frozen=True)
class TrainReport:
    out_dir: Path
    model_path: Path
    card_path: Path
    metrics_path: Path
    model_version: str
    metrics: dict[str, Any]
    seconds: float
    config: TrainConfig = field(default_factory=TrainConfig)
    estimator: QuantileLengthModel | None = field(default=None, repr=False, compare=False)
    """The fitted scikit-learn side (not saved; ONNX is the artifact)."""


# ---------------------------------------------------------------------------------------------
# the estimator that is exported (scikit-learn side)


def _column(values: Sequence[str]) -> npt.NDArray[np.object_]:
    return np.asarray(list(values), dtype=object).reshape(-1, 1)


class QuantileLengthModel:
    """Featurizer + two quantile regressors + conformal offsets; converts to one ONNX graph."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.vectorizer_: Any = None
        self.generator_encoder_: Any = None
        self.task_encoder_: Any = None
        self.regressors_: list[Any] = []
        self.offsets_: list[float] = [0.0, 0.0]
        self.generators_: list[str] = []
        self.tasks_: list[str] = []

    # features ------------------------------------------------------------------------------
    def _features(
        self,
        prompts: Sequence[str],
        generators: Sequence[str],
        tasks: Sequence[str],
        prompt_tokens: Sequence[float] | FloatArray,
    ) -> Any:
        """Sparse float32 ``[N, F]``: TF-IDF | generator one-hot | task one-hot | tokens."""
        sp: Any = importlib.import_module("scipy.sparse")  # untyped; comes with scikit-learn

        text = self.vectorizer_.transform([ascii_lower(p) for p in prompts])
        gen = self.generator_encoder_.transform(_column(generators))
        task = self.task_encoder_.transform(_column(tasks))
        ntok = sp.csr_matrix(np.asarray(prompt_tokens, dtype=np.float32).reshape(-1, 1))
        return sp.hstack([text, gen, task, ntok], format="csr", dtype=np.float32)

    def fit(self, rows: Sequence[LengthExample], rng: np.random.Generator) -> QuantileLengthModel:
        from sklearn.ensemble import GradientBoostingRegressor  # noqa: PLC0415
        from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: PLC0415
        from sklearn.preprocessing import OneHotEncoder  # noqa: PLC0415

        cfg = self.config
        prompts = [r.prompt for r in rows]
        self.generators_ = sorted({r.generator for r in rows} - {UNKNOWN})
        self.tasks_ = sorted({r.task for r in rows} - {UNKNOWN})
        gens = [UNKNOWN if rng.random() < cfg.generator_dropout else r.generator for r in rows]
        tasks = [UNKNOWN if rng.random() < cfg.task_dropout else r.task for r in rows]
        docs = sorted({ascii_lower(p) for p in prompts})
        common: dict[str, Any] = {
            "token_pattern": TOKEN_PATTERN,
            "ngram_range": (1, cfg.ngram_max),
            "sublinear_tf": False,  # skl2onnx silently ignores sublinear_tf: keep it off
            "lowercase": False,  # done by ascii_lower here and a StringNormalizer in the graph
            "dtype": np.float32,
        }
        chosen = TfidfVectorizer(
            max_features=cfg.max_features,
            min_df=min(cfg.min_df, max(1, len(docs) // 10)),
            **common,
        ).fit(docs)
        # skl2onnx can only express an n-gram whose words are all in the vocabulary; otherwise
        # it exports "w1 w2" as one token that never matches (a silent mismatch with
        # scikit-learn). Close the vocabulary under n-gram components and refit the idf.
        terms = set(chosen.vocabulary_)
        terms |= {w for t in chosen.vocabulary_ for w in t.split(" ")}
        self.vectorizer_ = TfidfVectorizer(vocabulary=sorted(terms), **common).fit(docs)
        # explicit categories: "" (and any unseen name) encodes as all zeros, "unknown"
        self.generator_encoder_ = OneHotEncoder(
            categories=[self.generators_ or ["?"]], handle_unknown="ignore"
        ).fit(_column(gens))
        self.task_encoder_ = OneHotEncoder(
            categories=[self.tasks_ or ["?"]], handle_unknown="ignore"
        ).fit(_column(tasks))
        x = self._features(prompts, gens, tasks, [r.prompt_tokens for r in rows])
        y = np.log1p(np.asarray([r.output_tokens for r in rows], dtype=np.float64))
        self.regressors_ = [
            GradientBoostingRegressor(
                loss="quantile",
                alpha=q,
                n_estimators=cfg.n_estimators,
                max_depth=cfg.max_depth,
                learning_rate=cfg.learning_rate,
                subsample=cfg.subsample,
                min_samples_leaf=cfg.min_samples_leaf,
                random_state=cfg.seed,
            ).fit(x, y)
            for q in QUANTILES
        ]
        return self

    def predict_log_raw(
        self,
        prompts: Sequence[str],
        generators: Sequence[str],
        tasks: Sequence[str],
        prompt_tokens: Sequence[float] | FloatArray,
    ) -> FloatArray:
        """Uncalibrated log1p predictions, ``[N, 2]``."""
        x = self._features(prompts, generators, tasks, prompt_tokens)
        cols = [np.asarray(r.predict(x), dtype=np.float64) for r in self.regressors_]
        out: FloatArray = np.column_stack(cols)
        return out

    def predict(
        self,
        prompts: Sequence[str],
        generators: Sequence[str],
        tasks: Sequence[str],
        prompt_tokens: Sequence[float] | FloatArray,
    ) -> FloatArray:
        """Calibrated lengths in tokens, ``[N, 2]`` (median, upper); what the ONNX graph does."""
        logs = self.predict_log_raw(prompts, generators, tasks, prompt_tokens)
        med = logs[:, 0] + self.offsets_[0]
        up = np.maximum(logs[:, 1] + self.offsets_[1], med)
        out: FloatArray = np.maximum(np.expm1(np.column_stack([med, up])), 1.0)
        return out


# ---------------------------------------------------------------------------------------------
# ONNX conversion


def _shape_calculator(operator: Any) -> None:
    from skl2onnx.common.data_types import FloatTensorType  # noqa: PLC0415

    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = FloatTensorType([n, 2])


def _converter(scope: Any, operator: Any, container: Any) -> None:
    from onnx import TensorProto  # noqa: PLC0415
    from skl2onnx.algebra.onnx_operator import OnnxSubEstimator  # noqa: PLC0415
    from skl2onnx.algebra.onnx_ops import (  # noqa: PLC0415
        OnnxAdd,
        OnnxCast,
        OnnxConcat,
        OnnxExp,
        OnnxIdentity,
        OnnxMax,
        OnnxReshape,
        OnnxStringNormalizer,
        OnnxSub,
    )
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType  # noqa: PLC0415

    opv = container.target_opset
    model: QuantileLengthModel = operator.raw_operator
    prompt, generator, task, ntok = operator.inputs

    def f32(x: Any) -> Any:
        return OnnxCast(x, to=TensorProto.FLOAT, op_version=opv)

    # ASCII lower-casing, identical to ascii_lower(): StringNormalizer wants a 1-D input, and
    # locale "C" (always installed, unlike ORT's default en_US.UTF-8) maps only A-Z. Python's
    # str.lower() would differ (U+0130 and U+212A lower-case to ASCII letters).
    flat = OnnxReshape(prompt, np.array([-1], dtype=np.int64), op_version=opv)
    lowered = OnnxStringNormalizer(
        flat, case_change_action="LOWER", is_case_sensitive=True, locale="C", op_version=opv
    )
    prompt_lower = scope.declare_local_variable("prompt_lower", StringTensorType([None, 1]))
    OnnxReshape(
        lowered, np.array([-1, 1], dtype=np.int64), op_version=opv, output_names=[prompt_lower]
    ).add_to(scope, container)
    text = f32(OnnxSubEstimator(model.vectorizer_, prompt_lower, op_version=opv))
    gen = f32(OnnxSubEstimator(model.generator_encoder_, generator, op_version=opv))
    tsk = f32(OnnxSubEstimator(model.task_encoder_, task, op_version=opv))
    n_features = int(model.regressors_[0].n_features_in_)
    # typed intermediate variables: sub-estimator parsers need to know their input type
    feats = scope.declare_local_variable("features", FloatTensorType([None, n_features]))
    OnnxConcat(text, gen, tsk, f32(ntok), axis=1, op_version=opv, output_names=[feats]).add_to(
        scope, container
    )
    med_raw, up_raw = (OnnxSubEstimator(reg, feats, op_version=opv) for reg in model.regressors_)
    med = OnnxAdd(med_raw, np.array([model.offsets_[0]], dtype=np.float32), op_version=opv)
    up = OnnxAdd(up_raw, np.array([model.offsets_[1]], dtype=np.float32), op_version=opv)
    up = OnnxMax(up, med, op_version=opv)
    both = OnnxConcat(med, up, axis=1, op_version=opv)
    tokens = OnnxSub(
        OnnxExp(both, op_version=opv), np.array([1.0], dtype=np.float32), op_version=opv
    )
    floored = OnnxMax(tokens, np.array([1.0], dtype=np.float32), op_version=opv)
    final = OnnxIdentity(floored, op_version=opv, output_names=operator.outputs[:1])
    final.add_to(scope, container)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED  # noqa: PLW0603 (one-time registration with skl2onnx)
    if _REGISTERED:
        return
    from skl2onnx import update_registered_converter  # noqa: PLC0415

    update_registered_converter(
        QuantileLengthModel, "ThrottllemQuantileLengthModel", _shape_calculator, _converter
    )
    _REGISTERED = True


def to_onnx(model: QuantileLengthModel, metadata: dict[str, str]) -> tuple[bytes, str]:
    """The whole pipeline as one ONNX model (string inputs) with ``metadata`` attached, and its
    model version: ``length-gbq-`` + a digest of the graph and the metadata, so the version
    changes exactly when the model does (and a retrain of the same data and code repeats it).
    """
    from skl2onnx import convert_sklearn  # noqa: PLC0415
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType  # noqa: PLC0415

    _register()
    initial_types = [
        ("prompt", StringTensorType([None, 1])),
        ("generator", StringTensorType([None, 1])),
        ("task", StringTensorType([None, 1])),
        ("prompt_tokens", FloatTensorType([None, 1])),
    ]
    # skl2onnx 1.20 / onnx 1.23 emit no warnings here, so none are filtered: pytest's
    # filterwarnings=error surfaces any new one
    onx = convert_sklearn(
        model,
        "throttllem-length",
        initial_types=initial_types,
        final_types=[(OUTPUT_NAME, FloatTensorType([None, 2]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    if any(
        n.op_type == "StringNormalizer" and not any(a.name == "locale" for a in n.attribute)
        for n in onx.graph.node
    ):  # would need en_US.UTF-8 at load time
        raise ModelError("exported graph has a StringNormalizer without a locale")
    onx.doc_string = (
        "throttLL'eM generation-length model: median and upper-quantile answer length in "
        f"{TOKEN_RULE} tokens"
    )
    # skl2onnx collects opset domains in a set: fix their order so retrains are byte-identical
    opsets = sorted(((o.domain, o.version) for o in onx.opset_import), key=lambda t: t[0])
    del onx.opset_import[:]
    for domain, version in opsets:
        entry = onx.opset_import.add()
        entry.domain, entry.version = domain, version
    del onx.metadata_props[:]
    digest = hashlib.sha256(onx.SerializeToString())
    digest.update(json.dumps(metadata, sort_keys=True).encode())
    version = f"length-gbq-{digest.hexdigest()[:12]}"
    for key, value in sorted({**metadata, "model_version": version}.items()):
        prop = onx.metadata_props.add()
        prop.key, prop.value = key, value
    data: bytes = onx.SerializeToString()
    return data, version


def _ort_predict(
    model_bytes: bytes, rows: Sequence[LengthExample], generators: Sequence[str]
) -> FloatArray:
    sess = onnx_session(model_bytes, "the freshly exported length model")
    feeds = {
        "prompt": _column([r.prompt for r in rows]),
        "generator": _column(generators),
        "task": _column([r.task for r in rows]),
        "prompt_tokens": np.asarray([[r.prompt_tokens] for r in rows], dtype=np.float32),
    }
    return np.asarray(sess.run([OUTPUT_NAME], feeds)[0], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# training


def _select_holdout(requested: str | None, generators: set[str]) -> str | None:
    if requested is None or requested == "":
        return None
    if requested == "auto":
        auto = AUTO_HOLDOUT_GENERATOR
        return auto if auto in generators and len(generators) > 1 else None
    if requested not in generators:
        raise ConfigError(
            f"holdout generator {requested!r} is not in the data ({sorted(generators)})"
        )
    if len(generators) < 2:
        raise ConfigError("cannot hold out the only generator in the data")
    return requested


def _conformal_level(q: float, n: int) -> float:
    return float(min(1.0, np.ceil((n + 1) * q) / max(n, 1)))


def _calibrate(
    rows: Sequence[LengthExample], cfg: TrainConfig
) -> tuple[list[float], dict[str, float]]:
    """Cross-fitted offsets (log space) so the median / upper hit their nominal levels."""
    if cfg.calib_folds < 2:
        return [0.0, 0.0], {}
    folds = np.asarray([prompt_group(r.prompt, seed=cfg.seed, folds=cfg.calib_folds) for r in rows])
    y = np.log1p(np.asarray([r.output_tokens for r in rows], dtype=np.float64))
    oof = np.zeros((len(rows), 2))
    for k in range(cfg.calib_folds):
        fit_rows = [r for r, f in zip(rows, folds, strict=True) if f != k]
        ev_rows = [r for r, f in zip(rows, folds, strict=True) if f == k]
        if not fit_rows or not ev_rows:
            return [0.0, 0.0], {}
        m = QuantileLengthModel(cfg).fit(fit_rows, np.random.default_rng([cfg.seed, k]))
        oof[folds == k] = m.predict_log_raw(
            [r.prompt for r in ev_rows],
            [r.generator for r in ev_rows],
            [r.task for r in ev_rows],
            [r.prompt_tokens for r in ev_rows],
        )
    off_med = float(np.quantile(y - oof[:, 0], QUANTILES[0]))
    off_up = float(np.quantile(y - oof[:, 1], _conformal_level(QUANTILES[1], len(rows))))
    raw_cov = float(np.mean(y <= oof[:, 1]))
    return [off_med, off_up], {
        "offset_log_median": off_med,
        "offset_log_upper": off_up,
        "uncalibrated_oof_coverage_upper": raw_cov,
    }


def _length_only_baseline(train: Sequence[LengthExample], seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingRegressor  # noqa: PLC0415

    x = np.asarray([[r.prompt_tokens] for r in train], dtype=np.float64)
    y = np.log1p(np.asarray([r.output_tokens for r in train], dtype=np.float64))
    return GradientBoostingRegressor(
        loss="quantile",
        alpha=0.5,
        n_estimators=100,
        max_depth=2,
        learning_rate=0.05,
        min_samples_leaf=40,
        random_state=seed,
    ).fit(x, y)


def _opsets(model_bytes: bytes) -> dict[str, int]:
    import onnx  # noqa: PLC0415

    proto = onnx.load_from_string(model_bytes)
    return {o.domain: int(o.version) for o in proto.opset_import}


def _data_digest(files: Sequence[Path]) -> str:
    """Short digest of the training files (names and bytes), for provenance."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def train_length_model(
    paths: Sequence[Path | str],
    out_dir: Path | str,
    *,
    seed: int = 0,
    config: TrainConfig | None = None,
    log: Any = None,
) -> TrainReport:
    """Train, evaluate, export and write ``model.onnx``, ``MODEL_CARD.md`` and ``metrics.json``
    into ``out_dir``; ``paths`` are AlpacaEval-style files or folders of them.

    Raises ModelError when ONNX Runtime disagrees with scikit-learn beyond
    :data:`PARITY_TOLERANCE_LOG`.
    """
    started = time.perf_counter()
    cfg = replace(config or TrainConfig(), seed=seed)
    say = log if log is not None else (lambda _msg: None)
    files = resolve_data_paths(paths)
    examples = load_examples(files)
    if cfg.max_prompts is not None:
        by_hash = sorted(
            {e.prompt for e in examples}, key=lambda p: hashlib.sha256(p.encode()).hexdigest()
        )
        keep = set(by_hash[: cfg.max_prompts])
        examples = [e for e in examples if e.prompt in keep]
    generators = {e.generator for e in examples}
    holdout = _select_holdout(cfg.holdout_generator, generators)
    is_test = [
        is_heldout_prompt(e.prompt, seed=cfg.seed, test_fraction=cfg.test_fraction)
        for e in examples
    ]
    train = [e for e, t in zip(examples, is_test, strict=True) if not t and e.generator != holdout]
    test = [e for e, t in zip(examples, is_test, strict=True) if t and e.generator != holdout]
    test_holdout = [
        e for e, t in zip(examples, is_test, strict=True) if t and e.generator == holdout
    ]
    all_holdout = [e for e in examples if e.generator == holdout]
    if len(train) < 20 or not test:
        raise ConfigError(f"too little data to train ({len(train)} train, {len(test)} test rows)")
    say(
        f"{len(files)} files, {len(examples)} examples: {len(train)} train, {len(test)} test, "
        f"holdout generator {holdout!r} ({len(test_holdout)} test rows)"
    )

    offsets, calib = _calibrate(train, cfg)
    model = QuantileLengthModel(cfg).fit(train, np.random.default_rng([cfg.seed, 99]))
    model.offsets_ = offsets
    y_train = np.asarray([r.output_tokens for r in train], dtype=np.float64)
    train_mean = float(y_train.mean())
    metadata = {
        "token_rule": TOKEN_RULE,
        "data_digest": _data_digest(files),
        "quantiles": ",".join(str(q) for q in QUANTILES),
        "train_mean_tokens": f"{train_mean:.6f}",
        "train_p90_tokens": f"{float(np.quantile(y_train, 0.9)):.6f}",
        "generators": json.dumps(model.generators_),
        "tasks": json.dumps(model.tasks_),
        "inputs": "prompt:string[N,1];generator:string[N,1];task:string[N,1];"
        "prompt_tokens:float[N,1]",
        "outputs": f"{OUTPUT_NAME}:float[N,2]=(median,upper) tokens",
        "split": json.dumps(
            {"seed": cfg.seed, "test_fraction": cfg.test_fraction, "holdout_generator": holdout}
        ),
        "trained_on": json.dumps([f.name for f in files]),
    }
    model_bytes, version = to_onnx(model, metadata)

    def evaluate(
        rows: Sequence[LengthExample], generators_in: Sequence[str]
    ) -> tuple[FloatArray, FloatArray]:
        skl = model.predict(
            [r.prompt for r in rows],
            generators_in,
            [r.task for r in rows],
            [r.prompt_tokens for r in rows],
        )
        onx = _ort_predict(model_bytes, rows, generators_in)
        return skl, onx

    skl_test, onx_test = evaluate(test, [r.generator for r in test])
    parity_log = float(np.max(np.abs(np.log1p(skl_test) - np.log1p(onx_test))))
    parity_tokens = float(np.max(np.abs(skl_test - onx_test)))
    if not parity_log <= PARITY_TOLERANCE_LOG:
        raise ModelError(f"ONNX Runtime disagrees with scikit-learn: max |Δlog| = {parity_log:.2e}")

    true_test = np.asarray([r.output_tokens for r in test], dtype=np.float64)
    metrics: dict[str, Any] = {
        "model_version": version,
        "token_rule": TOKEN_RULE,
        "quantiles": list(QUANTILES),
        "rows": {
            "train": len(train),
            "test": len(test),
            "test_holdout_generator": len(test_holdout),
        },
        "prompts": {"train": len({r.prompt for r in train}), "test": len({r.prompt for r in test})},
        "train_mean_tokens": train_mean,
        "test": length_metrics(true_test, onx_test[:, 0], onx_test[:, 1]),
        "test_generator_unknown": {},
        "baselines": {},
        "holdout_generator": None,
        "per_generator": {},
        "calibration": calib,
        "onnx_parity": {
            "max_abs_diff_tokens": parity_tokens,
            "max_abs_diff_log1p": parity_log,
            "rows": len(test),
        },
        "onnx_bytes": len(model_bytes),
        "onnx_opsets": _opsets(model_bytes),
    }
    unknown = _ort_predict(model_bytes, test, [UNKNOWN] * len(test))
    metrics["test_generator_unknown"] = length_metrics(true_test, unknown[:, 0], unknown[:, 1])
    p90_train = float(np.quantile(y_train, 0.9))
    metrics["baselines"]["corpus_mean"] = length_metrics(
        true_test, np.full_like(true_test, train_mean), np.full_like(true_test, p90_train)
    )
    gen_mean = {
        g: float(np.mean([r.output_tokens for r in train if r.generator == g]))
        for g in generators - {holdout}
    }
    metrics["baselines"]["generator_mean"] = length_metrics(
        true_test, np.asarray([gen_mean.get(r.generator, train_mean) for r in test])
    )
    base = _length_only_baseline(train, cfg.seed)
    base_pred = np.expm1(
        base.predict(np.asarray([[r.prompt_tokens] for r in test], dtype=np.float64))
    )
    metrics["baselines"]["prompt_length_only"] = length_metrics(true_test, base_pred)
    for g in sorted(generators - {holdout}):
        idx = [i for i, r in enumerate(test) if r.generator == g]
        if idx:
            metrics["per_generator"][g] = length_metrics(
                true_test[idx], onx_test[idx, 0], onx_test[idx, 1]
            )
    if holdout is not None and test_holdout:
        ho_true = np.asarray([r.output_tokens for r in test_holdout], dtype=np.float64)
        ho = _ort_predict(model_bytes, test_holdout, [r.generator for r in test_holdout])
        all_true = np.asarray([r.output_tokens for r in all_holdout], dtype=np.float64)
        ho_all = _ort_predict(model_bytes, all_holdout, [r.generator for r in all_holdout])
        metrics["holdout_generator"] = {
            "generator": holdout,
            "heldout_prompts": length_metrics(ho_true, ho[:, 0], ho[:, 1]),
            "heldout_prompts_corpus_mean_baseline": length_metrics(
                ho_true, np.full_like(ho_true, train_mean), np.full_like(ho_true, p90_train)
            ),
            "all_prompts": length_metrics(all_true, ho_all[:, 0], ho_all[:, 1]),
        }
    ratio = onx_test[:, 0] / np.maximum(true_test, 1.0)
    metrics["error_distribution"] = {
        "what": "quantiles of median prediction / true length on the held-out test prompts",
        "levels": list(ERROR_QUANTILE_LEVELS),
        "ratio_pred_over_true": [float(v) for v in np.quantile(ratio, ERROR_QUANTILE_LEVELS)],
    }
    metrics["config"] = asdict(cfg)
    metrics["train_seconds"] = time.perf_counter() - started

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, card_path, metrics_path = out / MODEL_FILE, out / CARD_FILE, out / METRICS_FILE
    model_path.write_bytes(model_bytes)
    metrics_path.write_text(
        json.dumps(as_jsonable(metrics), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    card_path.write_text(_model_card(metrics, files, cfg), encoding="utf-8")
    say(f"wrote {model_path} ({len(model_bytes) / 1e6:.2f} MB), {card_path}, {metrics_path}")
    return TrainReport(
        out_dir=out,
        model_path=model_path,
        card_path=card_path,
        metrics_path=metrics_path,
        model_version=version,
        metrics=metrics,
        seconds=time.perf_counter() - started,
        config=cfg,
        estimator=model,
    )


# ---------------------------------------------------------------------------------------------
# model card


def _row(name: str, m: dict[str, float]) -> str:
    cov = f"{100 * m['coverage_upper']:.1f}%" if "coverage_upper" in m else "–"
    return (
        f"| {name} | {int(m['n'])} | {m['mae']:.1f} | {100 * m['mape']:.1f}% | "
        f"{100 * m['within25']:.1f}% | {cov} |"
    )


_CARD = """\
# Generation-length model (throttLL'eM)

Predicts how many tokens an LLM will generate for a prompt: the median (q = 0.5) and an upper
quantile (q = 0.9). Generated by `throttllem train length`; do not edit by hand.

- model version: `{version}`
- token rule: `{rule}` (approximate Llama-3 BPE counts, `throttllem._length.tokens`; the same
  rule gives the labels, the prompt-length feature and the scores)
- quantiles: {quantiles}
- training-corpus mean length (the score baseline): {train_mean:.1f} tokens
- file: `model.onnx` ({mb:.2f} MB; opsets {opsets}); serving needs only onnxruntime
- training time: {seconds:.0f} s ({cpus} CPU cores)

## Data

AlpacaEval model outputs (tatsu-lab/alpaca_eval, CC BY-NC 4.0, research use): 805 user-style
instructions answered by each model; the label is the token count of the answer.
Files: {files}.

## Split

- By prompt text: {test_pct:.0f}% of the instructions (hash of seed {seed} and the text) are
  test prompts in *every* file, so no test prompt is seen in training under any model.
- Rows: {n_train} train ({p_train} prompts), {n_test} test ({p_test} prompts).
- Held-out model file (never trained on): `{holdout}`.

## Model and features

Two `GradientBoostingRegressor(loss="quantile")` (alpha = 0.5 and 0.9) on log(1 + tokens):
{n_estimators} trees of depth {max_depth}, learning rate {lr}, subsample {subsample},
at least {msl} samples per leaf. Features, all computed inside the ONNX graph:

- TF-IDF of the prompt's word 1–{ngram}-grams (at most {max_features} terms; ASCII word
  pattern so that scikit-learn and ONNX Runtime tokenize the same way);
- one-hot generator (serving model) name, blanked on {gen_drop:.0f}% of the training rows so
  that "" or an unseen name gets a generic prediction;
- one-hot task kind (AlpacaEval `dataset`), blanked on {task_drop:.0f}% of the rows;
- the prompt's token count (a separate float input, counted with the token rule).

Requested `max_tokens` is not a feature (AlpacaEval has none); the runtime clips both quantiles
to it when a request carries one. Both quantiles are calibrated by cross-fitted split-conformal
log-offsets ({folds} folds grouped by prompt; median {off_med:+.3f}, upper {off_up:+.3f});
upper ≥ median is enforced in the graph.

ONNX inputs (all `[N, 1]`): `prompt` string, `generator` string ("" = unknown), `task` string
("" = unknown), `prompt_tokens` float. Output `lengths` float `[N, 2]` = (median, upper) tokens.

## Results (held-out prompts)

MAE in tokens; MAPE = mean |median − true| / true; within ±25% = share of answers with
|median − true| ≤ 0.25·true; coverage = share of answers no longer than the upper quantile
(nominal 90%).

| predictor | rows | MAE | MAPE | within ±25% | upper coverage |
| --- | --- | --- | --- | --- | --- |
{results}

Per generator (held-out prompts):

| generator | rows | MAE | MAPE | within ±25% | upper coverage |
| --- | --- | --- | --- | --- | --- |
{per_generator}

ONNX Runtime vs scikit-learn on the {n_test} test rows: max |Δ| = {parity_tokens:.2e} tokens
({parity_log:.2e} in log1p).

## Limits

- Answer length is only weakly predictable from the prompt: the median is off by more than
  ±25% for most requests; plan with the upper quantile.
- Trained on English chat instructions answered by 7B–70B chat models; other workloads (code
  completion, long-context summarization) need retraining.
- Token counts follow the approximate rule, not a real tokenizer.
- `metrics.json` stores the empirical distribution of median/true on the test rows, which
  `OraclePredictor(relative_error="measured")` samples from.

## Retrain (from the repository root; about a minute on 2 cores)

```
throttllem train length --data ../shared/data/alpaca-eval-outputs --out models/length/
# equivalently, without the main CLI:
python -m throttllem._length.cli train length \\
    --data ../shared/data/alpaca-eval-outputs --out models/length/
```

Training is deterministic: the same data and code give the same model version.
Score any AlpacaEval-style file (last line `MAE=… within25=…% baseline_MAE=…`):

```
throttllem length score --model models/length \\
    --data ../shared/data/alpaca-eval-outputs/<file>.json [--heldout-only]
```

By default every row of the file is scored, *including the prompts the model was trained on*
(on an AlpacaEval file, the {train_pct:.0f}% of the rows on the training side of the split), so
those figures are optimistic. The second line of the output says which rows were scored and how
many have prompts on the training side of the split; `--heldout-only` scores only the held-out
prompts, which gives figures comparable to the tables above.
"""


def _model_card(metrics: dict[str, Any], files: Sequence[Path], cfg: TrainConfig) -> str:
    b = metrics["baselines"]
    ho = metrics["holdout_generator"]
    rows = [
        _row("this model", metrics["test"]),
        _row("this model, generator not given", metrics["test_generator_unknown"]),
        _row("baseline: training-corpus mean (its p90 as upper)", b["corpus_mean"]),
        _row("baseline: per-generator mean", b["generator_mean"]),
        _row("baseline: prompt-length-only model (median)", b["prompt_length_only"]),
    ]
    if ho:
        name = ho["generator"]
        rows += [
            _row(f"held-out model `{name}`, held-out prompts", ho["heldout_prompts"]),
            _row(
                f"corpus mean on `{name}`, held-out prompts",
                ho["heldout_prompts_corpus_mean_baseline"],
            ),
            _row(f"held-out model `{name}`, all prompts", ho["all_prompts"]),
        ]
    calib = metrics["calibration"]
    return _CARD.format(
        version=metrics["model_version"],
        rule=metrics["token_rule"],
        quantiles=", ".join(str(q) for q in metrics["quantiles"]),
        train_mean=metrics["train_mean_tokens"],
        mb=metrics["onnx_bytes"] / 1e6,
        opsets=", ".join(f"{d or 'ai.onnx'} {v}" for d, v in metrics["onnx_opsets"].items()),
        seconds=metrics["train_seconds"],
        cpus=os.cpu_count(),
        files=", ".join(f"`{f.name}`" for f in files),
        test_pct=100 * cfg.test_fraction,
        train_pct=100 * (1 - cfg.test_fraction),
        seed=cfg.seed,
        n_train=metrics["rows"]["train"],
        p_train=metrics["prompts"]["train"],
        n_test=metrics["rows"]["test"],
        p_test=metrics["prompts"]["test"],
        holdout=ho["generator"] if ho else "none",
        n_estimators=cfg.n_estimators,
        max_depth=cfg.max_depth,
        lr=cfg.learning_rate,
        subsample=cfg.subsample,
        msl=cfg.min_samples_leaf,
        ngram=cfg.ngram_max,
        max_features=cfg.max_features,
        gen_drop=100 * cfg.generator_dropout,
        task_drop=100 * cfg.task_dropout,
        folds=cfg.calib_folds,
        off_med=calib.get("offset_log_median", 0.0),
        off_up=calib.get("offset_log_upper", 0.0),
        results="\n".join(rows),
        per_generator="\n".join(_row(f"`{g}`", m) for g, m in metrics["per_generator"].items()),
        parity_tokens=metrics["onnx_parity"]["max_abs_diff_tokens"],
        parity_log=metrics["onnx_parity"]["max_abs_diff_log1p"],
    )

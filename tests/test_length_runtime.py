"""Serving the shipped length model (models/length) with ONNX Runtime only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from throttllem import ModelError
from throttllem._data import data_file
from throttllem._length.data import (
    CARD_FILE,
    METRICS_FILE,
    MODEL_FILE,
    is_heldout_prompt,
    length_metrics,
    load_examples,
)
from throttllem._length.runtime import DEFAULT_MODEL_DIR, LengthModel
from throttllem._length.tokens import count_tokens_many


@pytest.fixture(scope="module")
def model() -> LengthModel:
    return LengthModel.load(generator="Meta-Llama-3-8B-Instruct")


@pytest.fixture(scope="module")
def metrics() -> dict[str, object]:
    data: dict[str, object] = json.loads((DEFAULT_MODEL_DIR / METRICS_FILE).read_text())
    return data


def test_shipped_model_is_small_and_versioned(model: LengthModel) -> None:
    assert (DEFAULT_MODEL_DIR / MODEL_FILE).stat().st_size < 5_000_000
    assert model.model_version.startswith("length-gbq-")
    assert model.token_rule == "approx-bpe-v1"
    assert model.quantiles == (0.5, 0.9)
    assert model.model_version in (DEFAULT_MODEL_DIR / CARD_FILE).read_text()
    assert "Meta-Llama-3-8B-Instruct" in model.generators


def test_shipped_metrics_reproduce_on_heldout_prompts(
    model: LengthModel, metrics: dict[str, object]
) -> None:
    """Re-scoring the held-out prompts with the runtime gives the numbers in metrics.json,
    and they beat the corpus-mean baseline with calibrated coverage."""
    split = json.loads(model.metadata["split"])
    holdout = split["holdout_generator"]
    examples = [
        e
        for e in load_examples(
            [data_file("alpaca-eval-outputs/Meta-Llama-3-8B-Instruct.json").parent]
        )
        if e.generator != holdout
        and is_heldout_prompt(e.prompt, seed=split["seed"], test_fraction=split["test_fraction"])
    ]
    median, upper = model.predict(
        [e.prompt for e in examples],
        [e.prompt_tokens for e in examples],
        generator=[e.generator for e in examples],
        task=[e.task for e in examples],
    )
    got = length_metrics([e.output_tokens for e in examples], median, upper)
    want = metrics["test"]
    assert isinstance(want, dict)
    assert got["n"] == want["n"]
    assert got["mae"] == pytest.approx(want["mae"], rel=1e-4)
    assert got["within25"] == pytest.approx(want["within25"], abs=1e-3)
    baseline = metrics["baselines"]
    assert isinstance(baseline, dict)
    assert got["mae"] < 0.95 * baseline["corpus_mean"]["mae"]
    assert got["mae"] < baseline["prompt_length_only"]["mae"]
    assert 0.85 <= got["coverage_upper"] <= 0.95
    assert np.all(upper >= median)


def test_predict_shapes_defaults_and_caps(model: LengthModel) -> None:
    prompts = ["Write a haiku about GPUs.", "Explain TCP congestion control in detail.", ""]
    median, upper = model.predict(prompts)
    assert median.shape == upper.shape == (3,)
    assert median.dtype == np.float64
    assert np.all(median >= 1.0)
    assert np.all(upper >= median)
    # counted prompt tokens == passing them explicitly
    m2, u2 = model.predict(prompts, count_tokens_many(prompts))
    np.testing.assert_array_equal(median, m2)
    np.testing.assert_array_equal(upper, u2)
    # max_tokens clips both quantiles; None leaves a request uncapped
    mc, uc = model.predict(prompts, max_tokens=[5, None, 50])
    assert mc[0] == uc[0] == 5.0
    assert (mc[1], uc[1]) == (median[1], upper[1])
    assert uc[2] <= 50.0
    # batched == one by one
    for i, p in enumerate(prompts):
        one_m, one_u = model.predict([p])
        assert one_m[0] == pytest.approx(median[i], rel=1e-6)
        assert one_u[0] == pytest.approx(upper[i], rel=1e-6)
    # generator matters; unknown names fall back to the generic prediction
    a, _ = model.predict(prompts[:1], generator="Meta-Llama-3.1-8B-Instruct-Turbo")
    b, _ = model.predict(prompts[:1], generator="never-seen-model")
    c, _ = model.predict(prompts[:1], generator="")
    assert b[0] == c[0]
    assert a[0] != c[0]


def test_predict_rejects_bad_arguments(model: LengthModel) -> None:
    empty_m, empty_u = model.predict([])
    assert empty_m.shape == empty_u.shape == (0,)
    with pytest.raises(TypeError):
        model.predict("one string")
    with pytest.raises(ValueError, match="prompt_tokens"):
        model.predict(["a", "b"], [1])
    with pytest.raises(ValueError, match="generator"):
        model.predict(["a", "b"], generator=["x"])
    with pytest.raises(ValueError, match="max_tokens"):
        model.predict(["a", "b"], max_tokens=[1])


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "length"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    return folder


def test_missing_model_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        LengthModel.load(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        LengthModel.load(tmp_path / "nope" / MODEL_FILE)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_model_raises_model_error(tmp_path: Path, damage: str) -> None:
    folder = _copy(tmp_path)
    file = folder / MODEL_FILE
    raw = file.read_bytes()
    file.write_bytes(
        {"garbage": b"not an onnx model" * 10, "truncated": raw[: len(raw) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(ModelError):
        LengthModel.load(folder)


def test_model_from_another_token_rule_is_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    proto = onnx.load(str(folder / MODEL_FILE))
    for prop in proto.metadata_props:
        if prop.key == "token_rule":
            prop.value = "approx-bpe-v0"
    onnx.save(proto, str(folder / MODEL_FILE))
    with pytest.raises(ModelError, match="token rule"):
        LengthModel.load(folder)


def test_card_or_metrics_disagreeing_with_model_is_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    metrics = json.loads((folder / METRICS_FILE).read_text())
    metrics["model_version"] = "length-gbq-000000000000"
    (folder / METRICS_FILE).write_text(json.dumps(metrics))
    with pytest.raises(ModelError, match="describes model"):
        LengthModel.load(folder)
    (folder / METRICS_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        LengthModel.load(folder)
    (folder / METRICS_FILE).unlink()
    (folder / CARD_FILE).write_text("# some other model\n")
    with pytest.raises(ModelError, match="does not describe"):
        LengthModel.load(folder)
    (folder / CARD_FILE).unlink()
    assert LengthModel.load(folder).model_version  # the ONNX file alone is enough


def test_an_unrelated_onnx_model_is_refused(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(tmp_path / MODEL_FILE))
    with pytest.raises(ModelError, match="not a throttLL'eM length model"):
        LengthModel.load(tmp_path)

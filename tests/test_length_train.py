"""Training → ONNX export → ONNX Runtime, on a small real subset (real scikit-learn, skl2onnx
and onnxruntime; no mocks), plus the train/score CLI pieces."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from throttllem._data import data_file
from throttllem._errors import ConfigError
from throttllem._length.cli import add_length_parser, add_train_length_parser
from throttllem._length.data import is_heldout_prompt, load_examples
from throttllem._length.runtime import LengthModel
from throttllem._length.train import (
    PARITY_TOLERANCE_LOG,
    TrainConfig,
    TrainReport,
    train_length_model,
)

GENERATORS = ["Meta-Llama-3.1-8B-Instruct-Turbo", "Mixtral-8x7B-Instruct-v0.1", "gpt-4o-2024-05-13"]
SMALL = TrainConfig(max_prompts=300, n_estimators=60, calib_folds=2, max_features=300)
LAST_LINE = re.compile(r"^MAE=\d+\.\d within25=\d+\.\d% baseline_MAE=\d+\.\d$")


def _files() -> list[Path]:
    return [data_file(f"alpaca-eval-outputs/{g}.json") for g in GENERATORS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainReport:
    return train_length_model(_files(), tmp_path_factory.mktemp("length"), seed=0, config=SMALL)


def test_writes_the_three_artifacts(trained: TrainReport) -> None:
    assert trained.model_path.is_file()
    assert trained.model_path.stat().st_size < 5_000_000
    metrics = json.loads(trained.metrics_path.read_text())
    assert metrics["model_version"] == trained.model_version
    assert metrics["token_rule"] == "approx-bpe-v1"
    card = trained.card_path.read_text()
    assert trained.model_version in card
    assert "approx-bpe-v1" in card
    assert "throttllem train length --data" in card
    assert metrics["holdout_generator"]["generator"] == "gpt-4o-2024-05-13"


def test_split_is_by_prompt_and_holds_out_a_generator(trained: TrainReport) -> None:
    examples = load_examples(_files())
    keep = {e.prompt for e in examples}  # subset rule is internal; recompute the split
    test_prompts = {p for p in keep if is_heldout_prompt(p, seed=0, test_fraction=0.2)}
    assert 0.1 < len(test_prompts) / len(keep) < 0.3
    rows = trained.metrics["rows"]
    assert rows["train"] > 0
    assert rows["test"] > 0
    assert rows["test_holdout_generator"] > 0
    assert trained.metrics["prompts"]["test"] == rows["test"] / 2  # 2 training generators


def test_onnx_matches_scikit_learn(trained: TrainReport) -> None:
    assert trained.metrics["onnx_parity"]["max_abs_diff_log1p"] <= PARITY_TOLERANCE_LOG
    # independently, on odd strings the training data never had
    assert trained.estimator is not None
    prompts = [
        "",
        "!!!",
        "日本語のテキスト",
        "Write a POEM about İstanbul.",
        "word " * 3000,
        "List 10 facts about the Moon.\n\n1.",
        "Ünïcödé façade naïve café",
    ]
    gens = [
        "Mixtral-8x7B-Instruct-v0.1",
        "",
        "unknown-model",
        "Meta-Llama-3.1-8B-Instruct-Turbo",
        "",
        "Mixtral-8x7B-Instruct-v0.1",
        "",
    ]
    tasks = ["koala", "", "vicuna", "nope", "", "oasst", ""]
    ntok = [float(len(p) // 4) for p in prompts]
    skl = trained.estimator.predict(prompts, gens, tasks, ntok)
    model = LengthModel.load(trained.out_dir)
    median, upper = model.predict(prompts, [int(n) for n in ntok], generator=gens, task=tasks)
    np.testing.assert_allclose(median, skl[:, 0], rtol=1e-4)
    np.testing.assert_allclose(upper, skl[:, 1], rtol=1e-4)


def test_beats_the_mean_baseline_on_heldout_prompts(trained: TrainReport) -> None:
    m = trained.metrics
    assert m["test"]["mae"] < m["baselines"]["corpus_mean"]["mae"]
    assert m["test"]["mae"] < m["baselines"]["prompt_length_only"]["mae"]


def test_quantiles_are_ordered_and_upper_covers(trained: TrainReport) -> None:
    model = LengthModel.load(trained.out_dir)
    examples = [
        e
        for e in load_examples(_files()[:2])
        if is_heldout_prompt(e.prompt, seed=0, test_fraction=0.2)
    ]
    median, upper = model.predict(
        [e.prompt for e in examples], generator=[e.generator for e in examples]
    )
    assert np.all(upper >= median)
    assert np.all(median >= 1.0)
    true = np.array([e.output_tokens for e in examples])
    coverage = float(np.mean(true <= upper))
    assert 0.75 <= coverage <= 0.99
    assert 0.3 <= float(np.mean(true <= median)) <= 0.7


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Same data and code → byte-identical ONNX, even in another process with another hash
    seed (set iteration order must not leak into the file)."""
    tiny = TrainConfig(max_prompts=80, n_estimators=15, calib_folds=2, max_features=100)
    files = [str(f) for f in _files()[:2]]
    a = train_length_model(files, tmp_path / "a", config=tiny)
    script = (
        "import sys; from throttllem._length.train import TrainConfig, train_length_model; "
        "cfg = TrainConfig(max_prompts=80, n_estimators=15, calib_folds=2, max_features=100); "
        "train_length_model(sys.argv[2:], sys.argv[1], config=cfg)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b"), *files], check=True, env=env)
    assert (tmp_path / "b" / "model.onnx").read_bytes() == a.model_path.read_bytes()
    c = train_length_model(files, tmp_path / "c", seed=1, config=tiny)
    assert c.model_version != a.model_version


def test_rejects_bad_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        train_length_model([tmp_path / "missing.json"], tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ConfigError):
        train_length_model([bad], tmp_path / "out")
    with pytest.raises(ConfigError):
        train_length_model(
            _files()[:1], tmp_path / "out", config=TrainConfig(holdout_generator="no-such-model")
        )


def _root() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="throttllem")
    sub = root.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    add_train_length_parser(train.add_subparsers(dest="train_command", required=True))
    add_length_parser(sub)
    return root


def test_score_cli_last_line(trained: TrainReport, capsys: pytest.CaptureFixture[str]) -> None:
    args = _root().parse_args(
        [
            "length",
            "score",
            "--model",
            str(trained.out_dir),
            "--data",
            str(_files()[0]),
            "--heldout-only",
        ]
    )
    assert args.func(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert LAST_LINE.match(last), last
    baseline = float(last.rsplit("baseline_MAE=", 1)[1])
    assert baseline > float(last.split()[0].removeprefix("MAE="))


def test_score_cli_says_whether_the_scored_rows_include_training_prompts(
    trained: TrainReport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = _files()[0]  # a file the model was trained on
    heldout = [
        is_heldout_prompt(e.prompt, seed=0, test_fraction=0.2) for e in load_examples([file])
    ]
    n_heldout, n_train_side = sum(heldout), len(heldout) - sum(heldout)
    out_json = tmp_path / "all.json"
    base = ["length", "score", "--model", str(trained.out_dir), "--data", str(file)]
    args = _root().parse_args([*base, "--json", str(out_json)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == (
        f"scored rows: all {len(heldout)}, INCLUDING {n_train_side} with prompts on the "
        f"training side of the model's split ({file.name}: data it was trained on), "
        f"{n_heldout} held out; --heldout-only scores the {n_heldout} held-out rows only"
    )
    assert LAST_LINE.match(lines[-1]), lines[-1]
    rows = json.loads(out_json.read_text())["rows"]
    assert rows == {
        "scored": len(heldout),
        "training_split_prompts": n_train_side,
        "heldout_prompts": n_heldout,
        "heldout_only": False,
        "files_in_training_data": [file.name],
    }

    args = _root().parse_args([*base, "--heldout-only"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith(f", {n_heldout} examples")
    assert lines[1] == f"scored rows: {n_heldout}, held-out prompts only (none of them trained on)"
    assert LAST_LINE.match(lines[-1]), lines[-1]

    # A file the model never saw: its training-side prompts are only *maybe* trained on.
    other = tmp_path / "other.json"
    other.write_text(file.read_text())
    args = _root().parse_args([*base[:-1], str(other)])
    assert args.func(args) == 0
    assert "(trained on if they are also in its training data)" in (
        capsys.readouterr().out.splitlines()[1]
    )


def test_score_cli_reports_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _root().parse_args(
        ["length", "score", "--model", str(tmp_path), "--data", str(_files()[0])]
    )
    assert args.func(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-model"
    args = _root().parse_args(
        [
            "train",
            "length",
            "--data",
            str(_files()[0]),
            "--data",
            str(_files()[1]),
            "--out",
            str(out),
            "--max-prompts",
            "60",
            "--holdout-generator",
            "none",
        ]
    )
    assert args.func(args) == 0
    assert LAST_LINE.match(capsys.readouterr().out.strip().splitlines()[-1])
    assert LengthModel.load(out).metadata["split"] == json.dumps(
        {"seed": 0, "test_fraction": 0.2, "holdout_generator": None}
    )

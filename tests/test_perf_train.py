"""Training the performance model: real scikit-learn, real skl2onnx, real ONNX Runtime.

One small twin profile is trained once per module (a few seconds); tests check ONNX parity,
held-out accuracy, determinism, the written card, and the train/score command lines.
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from throttllem import _cli_perf as cli
from throttllem._data import data_file
from throttllem._perf.profiler import run_profile
from throttllem._perf.runtime import PerfRuntime, score_table
from throttllem._perf.table import read_table
from throttllem._perf.train import PerfRegressor, parity, to_onnx, train_perf_model

SETUP = "h100-llama3-8b-tp1"
LAST_LINE = re.compile(r"^R2=-?\d+\.\d{4} MAPE=\d+\.\d{2}% MAE=\d+\.\d{3} iters/s$")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("perf")


@pytest.fixture(scope="module")
def trained(workdir: Path) -> tuple[Path, dict[str, object]]:
    data = workdir / "train.csv"
    run_profile(setup=SETUP, out=data, samples=3000, seed=11, log=io.StringIO())
    out = workdir / "model"
    metrics = train_perf_model([str(data)], SETUP, out, seed=0, repeats=1,
                               command="(test)", log=io.StringIO())
    return out, metrics


@pytest.fixture(scope="module")
def test_table(workdir: Path) -> Path:
    path = workdir / "test.csv"
    run_profile(setup=SETUP, out=path, samples=1500, seed=99, log=io.StringIO())
    return path


def test_writes_model_card_and_metrics(trained: tuple[Path, dict[str, object]]) -> None:
    out, metrics = trained
    assert {p.name for p in out.iterdir()} == {"model.onnx", "metrics.json", "MODEL_CARD.md"}
    assert (out / "model.onnx").stat().st_size < 3_000_000
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["model_sha256"] == metrics["model_sha256"]
    card = (out / "MODEL_CARD.md").read_text()
    for needle in ("| 90% |", "| 10% |", "R²", "MAPE", "MAE (iters/s)", "How to retrain",
                   "(test)", "iterations per second"):
        assert needle in card


def test_onnx_runtime_matches_scikit_learn(trained: tuple[Path, dict[str, object]],
                                          test_table: Path) -> None:
    _, metrics = trained
    assert float(metrics["onnx_vs_sklearn_max_rel_diff"]) < 1e-6  # type: ignore[arg-type]
    # independently: refit on the test table, export, compare on rows and far-off points
    t = read_table(test_table)
    b, kv, p, f = t.features()
    x = np.stack([b, kv, p, f], axis=1)
    model = PerfRegressor().fit(x, t.iter_s)
    onnx_bytes = to_onnx(model, {"throttllem.perf.format": "1"})
    far = np.array([[0, 0, 0, 100.0], [4000, 5e6, 1e5, 5000.0], [-3, -10, -1, 345.0],
                    [7.5, 123.4, 0.0, 1234.5]])
    assert parity(model, onnx_bytes, x) < 1e-6
    assert parity(model, onnx_bytes, far) < 1e-6


def test_held_out_accuracy_on_a_small_twin_profile(trained: tuple[Path, dict[str, object]],
                                                   test_table: Path) -> None:
    _, metrics = trained
    splits = metrics["splits"]
    assert isinstance(splits, dict)
    for key in ("90", "10"):
        assert splits[key]["r2"] > 0.99, splits[key]
        assert splits[key]["mape_pct"] < 3.0, splits[key]
    # and on rows drawn with another seed, through ONNX Runtime
    rt = PerfRuntime.load(trained[0], grid=False)
    m, notes = score_table(rt, test_table)
    assert m.r2 > 0.99
    assert m.mape_pct < 3.0
    assert m.mae_iters_per_s < 2.0
    assert notes["rows"] == 1500


def test_retraining_is_deterministic(trained: tuple[Path, dict[str, object]],
                                     workdir: Path) -> None:
    out2 = workdir / "again"
    m2 = train_perf_model([str(workdir / "train.csv")], SETUP, out2, seed=0, repeats=1,
                          log=io.StringIO())
    assert m2["model_sha256"] == trained[1]["model_sha256"]
    assert (out2 / "model.onnx").read_bytes() == (trained[0] / "model.onnx").read_bytes()


def test_measured_table_trains_with_small_data_basis(workdir: Path) -> None:
    out = workdir / "measured"
    m = train_perf_model(["data:gpu-profiles/h100-sxm-llama3-8b-shape.csv"], SETUP, out,
                         repeats=2, log=io.StringIO())
    assert m["rows"] == 59
    assert m["basis"] == "physical"
    assert m["trained_clock_range_mhz"] == [1560.0, 1980.0]
    assert "10_stratified" in m["splits"]  # type: ignore[operator]
    assert m["splits"]["90"]["r2"] > 0.99  # type: ignore[index]
    assert "Small table" in (out / "MODEL_CARD.md").read_text()



def test_small_table_with_one_repeat_writes_its_card(tmp_path: Path) -> None:
    """`train perf --data <small csv> --repeats 1`: every split is one draw, so there is no
    spread to quote; the card says so (it used to fail with KeyError 'spread' after
    model.onnx and metrics.json were already written)."""
    small = tmp_path / "small.csv"
    small.write_text(data_file("gpu-profiles/h100-sxm-llama3-8b-shape.csv").read_text())
    out = tmp_path / "m"
    code, _ = _run_cli(["train", "perf", "--data", str(small), "--setup", SETUP, "--out",
                        str(out), "--repeats", "1"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "metrics.json", "MODEL_CARD.md"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] < 1000
    assert "spread" not in metrics["splits"]["10"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "Small table" in card
    assert "a single draw here" in card
    PerfRuntime.load(out, grid=False)  # the folder is whole and consistent

def _run_cli(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = cli.main(argv)
    return code, buf.getvalue()


def test_score_cli_last_line(trained: tuple[Path, dict[str, object]], test_table: Path,
                             tmp_path: Path) -> None:
    code, out = _run_cli(["perf", "score", "--model", str(trained[0]), "--data",
                          str(test_table), "--grid", "--json", str(tmp_path / "s.json")])
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert LAST_LINE.match(last), last
    assert json.loads((tmp_path / "s.json").read_text())["grid"]["r2"] > 0.99


def test_score_is_robust_to_rows_outside_training(tmp_path: Path) -> None:
    """The shipped measured-table model (clocks 1560–1980 MHz, batch ≤ 384) scored on rows
    at 345 MHz, batch 1024 and 500k KV tokens: extrapolated, counted, never a crash."""
    src = data_file("gpu-profiles/h100-sxm-llama3-8b-shape.csv").read_text().splitlines()
    rows = [*src, "decode,1024,400,1,80.0,,,,,345,", "decode,8,62500,1,30.0,,,,,2100,",
            "prefill,16,4096,4096,2000.0,,,,,1000,"]
    path = tmp_path / "odd.csv"
    path.write_text("\n".join(rows) + "\n")
    code, out = _run_cli(["perf", "score", "--model", "h100-llama3-8b-tp1-measured",
                          "--data", str(path)])
    assert code == 0
    assert "clock below 2, above 1" in out
    assert LAST_LINE.match(out.strip().splitlines()[-1])


def test_train_cli_and_its_errors(workdir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run_cli(["train", "perf", "--data", str(workdir / "test.csv"), "--setup", SETUP,
                        "--out", str(tmp_path / "m"), "--repeats", "1"])
    assert code == 0
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert f"throttllem train perf --data {workdir / 'test.csv'} --setup {SETUP}" in card
    assert _run_cli(["train", "perf", "--data", str(tmp_path / "none.csv"), "--setup",
                     SETUP])[0] == 2
    assert "cannot read profile table" in capsys.readouterr().err
    assert _run_cli(["perf", "score", "--model", str(tmp_path / "nowhere"), "--data",
                     str(workdir / "test.csv")])[0] == 2
    assert "no performance model" in capsys.readouterr().err


def test_registration_functions_plug_into_a_main_cli(tmp_path: Path) -> None:
    """What throttllem._cli does: its own root parser and `train` group, ours added to them
    beside a colleague's `train length`."""
    import argparse  # noqa: PLC0415

    root = argparse.ArgumentParser(prog="throttllem")
    sub = root.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train_sub = train.add_subparsers(dest="model", required=True)
    train_sub.add_parser("length")
    cli.add_profile_parser(sub)
    cli.add_train_perf_parser(train_sub)
    cli.add_perf_parser(sub)
    out = tmp_path / "p.csv"
    args = root.parse_args(["profile", "--target", "twin", "--samples", "50", "--out", str(out)])
    with redirect_stdout(io.StringIO()):
        assert args.func(args) == 0
    assert len(read_table(out)) == 50
    args = root.parse_args(["train", "perf", "--data", str(out), "--setup", SETUP])
    assert args.func is cli.cmd_train_perf
    assert args.out is None
    args = root.parse_args(["perf", "score", "--model", "m", "--data", str(out)])
    assert args.func is cli.cmd_perf_score

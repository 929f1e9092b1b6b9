"""The performance-model runtime: the PerfModel contract (shapes, broadcasting, positivity,
monotone in the clock), grid vs ONNX agreement, and ModelError on a missing/corrupt model.

Uses the shipped model models/perf/h100-llama3-8b-tp1 (real ONNX Runtime, no mocks).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from throttllem._core.perf import PerfModel, is_monotone_in_clock
from throttllem._errors import ModelError
from throttllem._perf.profiler import run_profile
from throttllem._perf.runtime import DEFAULT_MODEL_ROOT, PerfRuntime, batch_axis, score_table

MODEL = DEFAULT_MODEL_ROOT / "h100-llama3-8b-tp1"


@pytest.fixture(scope="module")
def rt() -> PerfRuntime:
    return PerfRuntime.load(MODEL)


@pytest.fixture(scope="module")
def rt_onnx() -> PerfRuntime:
    return PerfRuntime.load(MODEL, grid=False)


def test_satisfies_the_perfmodel_protocol(rt: PerfRuntime, rt_onnx: PerfRuntime) -> None:
    assert isinstance(rt, PerfModel)
    assert isinstance(rt_onnx, PerfModel)
    assert rt.setup == "h100-llama3-8b-tp1"
    assert rt.clocks_mhz[0] == 345
    assert rt.clocks_mhz[-1] == 1980
    assert len(rt.clocks_mhz) == 110
    lo, hi = rt.trained_clock_range_mhz
    assert 345 <= lo < 400
    assert hi == 1980


@pytest.mark.parametrize("which", ["grid", "onnx"])
def test_broadcasting_contract(rt: PerfRuntime, rt_onnx: PerfRuntime, which: str) -> None:
    m = rt if which == "grid" else rt_onnx
    t_n = 7
    b = np.arange(1, t_n + 1, dtype=np.float64)[:, None] * 10
    kv = b * 500
    p = np.zeros((t_n, 1))
    p[3] = 1024
    clocks = rt.clocks_mhz[None, ::7]
    out = np.asarray(m.iteration_time_s(b, kv, p, clocks))
    assert out.shape == (t_n, clocks.size)
    assert np.all(np.isfinite(out))
    assert np.all(out > 0)
    # the same answer point by point, and with other broadcastable shapes
    one = np.asarray(m.iteration_time_s(b[2, 0], kv[2, 0], 0.0, clocks[0, 4]))
    assert one.shape == ()
    assert one == pytest.approx(out[2, 4], rel=1e-9)
    flat = np.asarray(m.iteration_time_s(b[:, 0], kv[:, 0], p[:, 0], 1500.0))
    assert flat.shape == (t_n,)
    three = np.asarray(m.iteration_time_s(b[None], kv[None], p[None], clocks[None]))
    np.testing.assert_allclose(three[0], out, rtol=1e-12)
    # columns asked in another order, and one clock per row
    rev = np.asarray(m.iteration_time_s(b, kv, p, clocks[:, ::-1]))
    np.testing.assert_allclose(rev[:, ::-1], out, rtol=1e-12)
    diag = np.asarray(m.iteration_time_s(b[:, 0], kv[:, 0], p[:, 0], clocks[0, :t_n]))
    np.testing.assert_allclose(diag, np.diag(out[:, :t_n]), rtol=1e-9)
    # physics sanity: more KV or batch never faster; prefill costs time
    assert np.all(np.diff(out, axis=0)[:2] >= 0)
    assert out[3, -1] > out[2, -1] * 2


def test_grid_is_monotone_in_clock_and_passes_the_core_probe(rt: PerfRuntime) -> None:
    clocks = tuple(int(c) for c in rt.clocks_mhz)
    assert is_monotone_in_clock(rt, clocks)
    rng = np.random.default_rng(1)
    b = rng.integers(0, 300, 400).astype(float)[:, None]  # some beyond the grid's 256
    kv = rng.uniform(0, 5e5, (400, 1)).round()
    p = np.where(rng.uniform(size=(400, 1)) < 0.3, rng.uniform(1, 9000, (400, 1)).round(), 0)
    t = np.asarray(rt.iteration_time_s(b, kv, p, rt.clocks_mhz[None, :]))
    assert np.all(np.diff(t, axis=1) <= 0)


def test_grid_agrees_with_onnx(rt: PerfRuntime, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 3000
    b = rng.integers(1, 257, n).astype(np.float64)
    kv = np.minimum(b * rng.uniform(1, 4000, n), 4.4e5).round()
    p = np.where(rng.uniform(size=n) < 0.2, rng.integers(16, 8192, n), 0).astype(np.float64)
    f = rng.choice(rt.clocks_mhz, n)
    grid = np.asarray(rt.iteration_time_s(b, kv, p, f))
    onnx = rt.predict_onnx(b, kv, p, f)
    rel = np.abs(grid - onnx) / onnx
    dec = p == 0
    assert np.median(rel[dec]) < 0.002
    assert np.percentile(rel[dec], 99) < 0.02
    assert np.median(rel[~dec]) < 0.015
    assert np.percentile(rel[~dec], 99) < 0.10
    # against real rows (a twin profile no model has seen) the grid is as accurate as ONNX
    path = tmp_path / "t.csv"
    run_profile(setup=rt.setup, out=path, samples=1500, seed=123,
                log=io.StringIO())
    grid_m, _ = score_table(rt, path, use_grid=True)
    onnx_m, _ = score_table(rt, path)
    assert grid_m.mape_pct < onnx_m.mape_pct + 0.2
    assert grid_m.r2 > 0.995
    # a grid node itself (integer batch, KV node, top clock) is the ONNX value, up to the
    # float32 storage and the monotone fix (which only raises)
    g = rt.grid
    assert g is not None
    node = np.asarray(rt.iteration_time_s(64.0, g.decode_kv[3], 0.0, 1980.0))
    assert node == pytest.approx(rt.predict_onnx(64.0, g.decode_kv[3], 0.0, 1980.0), rel=1e-6)


class _NoOnnx:
    """Stands in for the ONNX Runtime session: any run is a test failure."""

    def run(self, *_: object) -> None:
        raise AssertionError("ONNX Runtime was called on the grid's path")


def test_points_outside_the_grid_extrapolate_without_onnx(rt: PerfRuntime,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    g = rt.grid
    assert g is not None
    assert g.extrapolates
    bm, km, pm = g.edge
    rng = np.random.default_rng(5)
    n = 2000
    b = rng.integers(0, int(bm * 4), n).astype(np.float64)
    kv = rng.uniform(0, km * 4, n).round()
    p = np.where(rng.uniform(size=n) < 0.4, rng.uniform(0, pm * 2, n).round(), 0.0)
    b[:4], kv[:4], p[:4] = [4096.0, 10.0, 300.0, 64.5], [2e6, 1e3, 5e5, 9e5], [0, 0, 9000, 100]
    out = (b > bm) | (kv > km) | (p > pm)
    assert out.mean() > 0.8
    clocks = rt.clocks_mhz[None, :]
    ref = np.maximum.accumulate(rt.predict_onnx(b[:, None], kv[:, None], p[:, None],
                                                clocks)[:, ::-1], axis=1)[:, ::-1]
    monkeypatch.setattr(rt, "_session", _NoOnnx())
    t = np.asarray(rt.iteration_time_s(b[:, None], kv[:, None], p[:, None], clocks))
    # the controller's layout (clocks down, passes along) and a few clocks: the same values
    cols = [0, 44, 45, 109]
    tc = np.asarray(rt.iteration_time_s(b[None, :], kv[None, :], p[None, :],
                                        rt.clocks_mhz[cols, None]))
    assert np.array_equal(tc.T, t[:, cols])
    assert np.all(np.diff(t, axis=1) <= 0)  # monotone in the clock, outside too
    # What the ONNX model (made monotone) answers there, computed from the grid's edge and
    # the model's baseline: single points differ by the grid's own interpolation error at
    # the edge, nothing is biased
    rel = t[out] / ref[out] - 1.0
    assert abs(rel.mean()) < 0.005
    assert np.percentile(np.abs(rel), 99) < 0.08
    # On a node of the edge (whole batch, KV node, no prefill) nothing is interpolated: it is
    # the ONNX model made monotone, to float32 precision
    node_b = np.array([300.0, 1000.0, 77.0, 4000.0])
    node_kv = np.array([g.decode_kv[5], g.decode_kv[-1] * 3, km * 2, 0.0])
    monkeypatch.undo()
    onnx = np.maximum.accumulate(rt.predict_onnx(node_b[:, None], node_kv[:, None], 0.0,
                                                 clocks)[:, ::-1], axis=1)[:, ::-1]
    monkeypatch.setattr(rt, "_session", _NoOnnx())
    tn = np.asarray(rt.iteration_time_s(node_b[:, None], node_kv[:, None], 0.0, clocks))
    np.testing.assert_allclose(tn, onnx, rtol=2e-6)
    # negative counts are 0, as in the ONNX graph
    assert np.asarray(rt.iteration_time_s(-5.0, -1.0, -3.0, 1980.0)) == np.asarray(
        rt.iteration_time_s(0.0, 0.0, 0.0, 1980.0))
    monkeypatch.undo()
    # clocks off the supported list interpolate, and beyond it go to ONNX
    off = np.asarray(rt.iteration_time_s(10.0, 1e3, 0.0, np.array([1000.0, 2500.0, 200.0])))
    assert off[1] < off[0] < off[2]
    assert off[1] == pytest.approx(rt.predict_onnx(10.0, 1e3, 0.0, 2500.0), rel=1e-12)


def test_without_the_baseline_points_outside_go_to_onnx(tmp_path: Path) -> None:
    """A bare model file (no metrics.json beside it, so no baseline coefficients): the grid
    answers inside, ONNX (made monotone) outside."""
    beside = PerfRuntime.load(MODEL / "model.onnx")  # metrics.json beside it: extrapolates
    assert beside.grid is not None
    assert beside.grid.extrapolates
    alone = tmp_path / "alone.onnx"
    shutil.copy(MODEL / "model.onnx", alone)
    rt = PerfRuntime.load(alone)
    assert rt.baseline is None
    assert rt.grid is not None
    assert not rt.grid.extrapolates
    b = np.array([[4096.0], [10.0]])
    kv = np.array([[2e6], [1e3]])
    p = np.zeros((2, 1))
    clocks = rt.clocks_mhz[None, :]
    t = np.asarray(rt.iteration_time_s(b, kv, p, clocks))
    onnx = rt.predict_onnx(b, kv, p, clocks)
    np.testing.assert_allclose(t[0], np.maximum.accumulate(onnx[0, ::-1])[::-1], rtol=1e-12)
    np.testing.assert_allclose(t[1], np.asarray(beside.iteration_time_s(b, kv, p, clocks))[1],
                               rtol=1e-12)


@pytest.mark.parametrize("name", ["h100-llama3-8b-tp1", "h100-llama2-13b-tp2"])
def test_grid_covers_what_the_setups_controller_queries(name: str) -> None:
    """Batch up to the engine's max batch, KV up to its KV capacity, prefill up to a pass's
    token budget or the longest prompt (the first prefill of a pass may exceed the budget):
    the controller's projections of that setup stay inside the grid (only a projection that
    overflows the KV cache leaves it, and then extrapolates)."""
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    rt = PerfRuntime.load(name)
    assert rt.grid is not None
    e = load_profile(rt.setup).engine
    bm, km, pm = rt.grid.edge
    assert bm >= e.max_batch
    assert km >= e.kv_blocks * e.block_tokens
    assert pm >= max(e.max_batched_tokens, load_profile(rt.setup).model.max_model_len)


def test_bad_inputs_raise_value_error(rt: PerfRuntime) -> None:
    with pytest.raises(ValueError, match="clock_mhz must be positive"):
        rt.iteration_time_s(1, 1, 0, np.array([1980.0, 0.0]))
    with pytest.raises(ValueError, match="kv_tokens has NaN"):
        rt.iteration_time_s(1, np.nan, 0, 1980.0)


def test_batch_axis() -> None:
    ax = batch_axis(256)
    assert ax[0] == 0
    assert ax[-1] == 256
    assert np.all(np.diff(ax) > 0)
    assert np.all(ax[1:][ax[1:] > 4] / ax[:-1][ax[1:] > 4] <= 1.5)
    assert batch_axis(384)[-1] == 384


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(MODEL, dst)
    return dst


def test_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no performance model at"):
        PerfRuntime.load(tmp_path / "absent")
    d = _copy(tmp_path)
    (d / "model.onnx").write_bytes(b"\x08\x07not really protobuf" * 10)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        PerfRuntime.load(d, grid=False)
    d = _copy(tmp_path / "b")
    raw = bytearray((d / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the card's checksum no longer matches
    (d / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(ModelError):
        PerfRuntime.load(d, grid=False)
    d = _copy(tmp_path / "c")
    (d / "metrics.json").unlink()
    with pytest.raises(ModelError, match=r"no metrics\.json"):
        PerfRuntime.load(d, grid=False)
    d = _copy(tmp_path / "d")
    metrics = json.loads((d / "metrics.json").read_text())
    metrics["model_sha256"] = "0" * 64
    (d / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ModelError, match=r"is not the model that metrics\.json describes"):
        PerfRuntime.load(d, grid=False)
    # the ONNX file alone loads (no card to check against)
    assert PerfRuntime.load(MODEL / "model.onnx", grid=False).setup == "h100-llama3-8b-tp1"


def test_onnx_without_our_metadata_is_refused(tmp_path: Path) -> None:
    import onnx  # noqa: PLC0415

    m = onnx.load(str(MODEL / "model.onnx"))
    del m.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match="not a throttLL'eM performance model"):
        PerfRuntime.load(path, grid=False)

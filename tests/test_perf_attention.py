"""The Σ prompt² input (prefill attention) of the performance model, end to end: the profile
column and what is derived without it, training with and without it, ONNX and the grid,
models without it ignoring it, and the forecast carrying it per projected pass.

Real scikit-learn, skl2onnx and ONNX Runtime; a small twin profile trained once per module.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from throttllem._core.forecast import InstanceState, project
from throttllem._core.slo import SloClass
from throttllem._core.slo_check import RequestSlo, prepare
from throttllem._errors import ConfigError
from throttllem._gpulab.loop import FakePassRunner, profile_passes, sweep_shapes
from throttllem._perf.profiler import run_profile
from throttllem._perf.runtime import (
    ATTENTION_FEATURES,
    DEFAULT_MODEL_ROOT,
    FEATURES,
    PerfRuntime,
    score_table,
)
from throttllem._perf.table import ALL_COLUMNS, read_table, write_table
from throttllem._perf.train import train_perf_model

SETUP = "h100-llama3-8b-tp1"
LEGACY_MODEL = DEFAULT_MODEL_ROOT / "h100-llama3-8b-tp1"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("attention")


@pytest.fixture(scope="module")
def profile(workdir: Path) -> Path:
    path = workdir / "twin.csv"
    run_profile(setup=SETUP, out=path, samples=1500, seed=5, log=io.StringIO())
    return path


@pytest.fixture(scope="module")
def model(workdir: Path, profile: Path) -> tuple[PerfRuntime, dict[str, object]]:
    out = workdir / "model"
    metrics = train_perf_model([str(profile)], SETUP, out, seed=0, repeats=1,
                               command="(test)", log=io.StringIO())
    return PerfRuntime.load(out), metrics


def _csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join((header, *rows)) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the table


def test_twin_profile_records_the_sum_of_squared_prompts(profile: Path) -> None:
    table = read_table(profile)
    a2 = table.attention_tokens2()
    b, _, p, _ = table.features()
    assert not np.isnan(a2).any()
    decode = np.asarray(table.phase) == "decode"
    assert (a2[decode] == 0).all()
    pre = ~decode
    # Σ L² of prompts that add up to p lies in [p² / k, p²], k ≥ 1 prompts
    assert (a2[pre] <= p[pre] ** 2).all()
    assert (a2[pre] >= 1).all()
    assert (a2[pre] < p[pre] ** 2).any()  # some passes prefill several prompts
    del b


def test_what_is_derived_without_the_column(tmp_path: Path) -> None:
    header = "phase,batch,ctx,tokens,iter_ms,sm_clock_mhz,prefill_tokens,kv_tokens"
    t = read_table(_csv(tmp_path / "t.csv", header,
                        "decode,8,100,1,10,1980,,",
                        "prefill,1,300,300,20,1980,300,0",
                        "prefill,3,200,200,30,1980,,",  # base layout: 3 prompts of 200
                        "prefill,2,150,150,25,1980,301,0",  # uneven prompts, rounded
                        "mixed,4,50,1,40,1980,500,200"))
    a2 = t.attention_tokens2()
    assert a2[:3].tolist() == [0.0, 300.0**2, 3 * 200.0**2]
    assert math.isnan(a2[3])
    assert math.isnan(a2[4])


@pytest.mark.parametrize(("cell", "why"), [("-1", ">= 0"), ("250001", "not a sum of squared"),
                                           ("0", "not a sum of squared")])
def test_bad_sums_of_squares_are_refused(tmp_path: Path, cell: str, why: str) -> None:
    header = "phase,batch,ctx,tokens,iter_ms,sm_clock_mhz,prefill_tokens,kv_tokens," \
             "prefill_attn_tokens2"
    path = _csv(tmp_path / "t.csv", header, f"mixed,4,50,1,40,1980,500,200,{cell}")
    with pytest.raises(ConfigError, match=r"line 2, column prefill_attn_tokens2.*" + why):
        read_table(path)


def test_the_gpu_sweep_profile_records_it(tmp_path: Path) -> None:
    runner = FakePassRunner(lambda b, kv, p, a2: 5.0 + 0.01 * b + 1e-6 * a2,
                            kv_capacity_tokens=500_000, keep_specs=True)
    shapes = sweep_shapes(30, seed=1, kv_cap_tokens=400_000)
    rows = profile_passes(runner, shapes, kv_bytes_per_token=131072, budget_s=60.0, reps=1)
    path = tmp_path / "gpu.csv"
    write_table(path, rows)
    assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(ALL_COLUMNS)
    got = read_table(path).attention_tokens2().tolist()
    assert got == [float(sum(x * x for x in s.prefill_len)) for s in shapes[:len(rows)]]


# --------------------------------------------------------------------------- the model


def test_a_table_with_it_trains_a_model_that_takes_it(
        model: tuple[PerfRuntime, dict[str, object]], workdir: Path) -> None:
    rt, metrics = model
    assert rt.attention
    assert metrics["features"] == list(ATTENTION_FEATURES)
    coef = metrics["baseline_coef"]
    assert isinstance(coef, dict)
    assert "r*a2" in coef
    assert "r*p^2" not in coef
    card = (workdir / "model" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "prefill_attn_tokens2" in card
    assert "Σ prompt²" in card


def test_the_model_is_linear_in_it_and_defaults_to_one_prompt(
        model: tuple[PerfRuntime, dict[str, object]]) -> None:
    rt, _ = model
    b, kv, p, f = 32.0, 32_000.0, 4096.0, 1500.0
    a2 = p * p * np.linspace(0.0, 1.0, 5)
    t = rt.predict_onnx(b, kv, p, f, a2)
    np.testing.assert_allclose(np.diff(t), np.diff(t)[0], rtol=1e-9)
    assert (np.diff(t) >= 0).all()  # more attention work never makes a pass faster
    assert rt.predict_onnx(b, kv, p, f) == pytest.approx(t[-1], rel=1e-12)
    assert float(rt.iteration_time_s(b, kv, p, f)) == pytest.approx(
        float(rt.iteration_time_s(b, kv, p, f, p * p)), rel=1e-12)


def test_grid_agrees_with_onnx_and_stays_monotone(
        model: tuple[PerfRuntime, dict[str, object]], profile: Path) -> None:
    rt, _ = model
    table = read_table(profile)
    b, kv, p, f = table.features()
    a2 = table.attention_tokens2()
    grid = np.asarray(rt.iteration_time_s(b, kv, p, f, a2))
    onnx = rt.predict_onnx(b, kv, p, f, a2)
    rel = np.abs(grid - onnx) / onnx
    # the grid interpolates what ONNX answers: agreement as for the model without it
    assert float(np.median(rel)) < 0.02
    clocks = rt.clocks_mhz[None, :]
    t = np.asarray(rt.iteration_time_s(b[:, None], kv[:, None], p[:, None], clocks,
                                       a2[:, None]))
    assert (np.diff(t, axis=1) <= 0).all()


def test_prepared_passes_carry_it_and_give_the_same_times(
        model: tuple[PerfRuntime, dict[str, object]]) -> None:
    rt, _ = model
    rng = np.random.default_rng(0)
    n = 400
    p = np.where(rng.uniform(size=n) < 0.2, rng.integers(16, 8000, n), 0).astype(float)
    rows = np.stack([rng.integers(0, 256, n).astype(float), rng.uniform(0, 4e5, n).round(), p,
                     p * p * rng.uniform(0.2, 1.0, n)])
    clocks = rt.clocks_mhz[[3, 40, 100]]
    prepared = rt.prepare_passes(rows)
    assert prepared is not None
    got = rt.prepared_time_s(prepared, clocks)
    want = rt.iteration_time_s(rows[0:1], rows[1:2], rows[2:3], clocks[:, None], rows[3:4])
    np.testing.assert_array_equal(got, want)
    few = rows[:, np.flatnonzero(p)[:5]].copy()  # ≤ 8 prefill passes: the scalar cell path
    np.testing.assert_array_equal(
        rt.prepared_time_s(rt.prepare_passes(few), clocks),
        rt.iteration_time_s(few[0:1], few[1:2], few[2:3], clocks[:, None], few[3:4]))
    np.testing.assert_allclose(rt.iteration_time_s(few[0], few[1], few[2], clocks[1], few[3]),
                               rt.predict_onnx(few[0], few[1], few[2], clocks[1], few[3]),
                               rtol=0.05)
    three = rt.prepared_time_s(rt.prepare_passes(rows[:3].copy()), clocks)
    np.testing.assert_array_equal(three, rt.iteration_time_s(rows[0:1], rows[1:2], rows[2:3],
                                                             clocks[:, None]))
    assert (got <= three).all()
    assert (got < three).any()


def test_points_beyond_the_grid_carry_it_too(model: tuple[PerfRuntime, dict[str, object]]
                                             ) -> None:
    rt, _ = model
    b, kv, p = np.array([400.0, 8.0]), np.array([9e5, 2e3]), np.array([20_000.0, 30_000.0])
    for a2 in (p * p, p * p / 5):
        grid = np.asarray(rt.iteration_time_s(b, kv, p, np.full(2, 1980.0), a2))
        onnx = rt.predict_onnx(b, kv, p, np.full(2, 1980.0), a2)
        np.testing.assert_allclose(grid, onnx, rtol=0.02)


def test_a_model_without_it_ignores_it() -> None:
    rt = PerfRuntime.load(LEGACY_MODEL)
    assert not rt.attention
    assert rt.metadata["features"] == ",".join(FEATURES)
    b, kv, p = np.array([0.0, 16.0, 64.0]), np.array([0.0, 1e4, 8e4]), np.array([2048.0] * 3)
    a2 = np.array([2048.0**2, 1024.0**2 * 2, 512.0**2 * 4])
    f = np.full(3, 1500.0)
    np.testing.assert_array_equal(rt.iteration_time_s(b, kv, p, f, a2),
                                  rt.iteration_time_s(b, kv, p, f))
    np.testing.assert_array_equal(rt.predict_onnx(b, kv, p, f, a2), rt.predict_onnx(b, kv, p, f))
    rows = np.stack([b, kv, p, a2])
    clocks = rt.clocks_mhz[[10, 90]]
    np.testing.assert_array_equal(rt.prepared_time_s(rt.prepare_passes(rows), clocks),
                                  rt.prepared_time_s(rt.prepare_passes(rows[:3].copy()), clocks))


def test_attention_off_and_on(profile: Path, tmp_path: Path) -> None:
    m = train_perf_model([str(profile)], SETUP, tmp_path / "off", seed=0, repeats=1,
                         attention="off", log=io.StringIO())
    assert m["features"] == list(FEATURES)
    assert not PerfRuntime.load(tmp_path / "off").attention
    header = "phase,batch,ctx,tokens,iter_ms,sm_clock_mhz,prefill_tokens,kv_tokens"
    rows = [f"decode,{b},500,1,{6 + 0.02 * b},1980,," for b in range(1, 20)]
    rows += ["mixed,4,50,1,40,1980,500,200"]
    unknown = _csv(tmp_path / "mixed.csv", header, *rows)
    with pytest.raises(ConfigError, match="1 of 20 rows lack"):
        train_perf_model([str(unknown)], SETUP, tmp_path / "on", seed=0, repeats=1,
                         attention="on", log=io.StringIO())
    auto = train_perf_model([str(unknown)], SETUP, tmp_path / "auto", seed=0, repeats=1,
                            log=io.StringIO())
    assert auto["features"] == list(FEATURES)
    assert "lack" in str(auto["attention_input"])


def test_score_uses_the_column(model: tuple[PerfRuntime, dict[str, object]],
                               profile: Path) -> None:
    rt, _ = model
    metrics, notes = score_table(rt, profile)
    assert notes["attention_tokens2_unknown"] == 0
    assert metrics.n > 0


# --------------------------------------------------------------------------- the forecast


def _state(prompts: list[int]) -> InstanceState:
    q = np.asarray(prompts, dtype=np.int64)
    return InstanceState(
        running_prompt_tokens=np.asarray([500, 900], dtype=np.int64),
        running_generated_tokens=np.asarray([10, 3], dtype=np.int64),
        running_predicted_tokens=np.asarray([40.0, 80.0]),
        running_upper_tokens=np.asarray([60.0, 120.0]),
        queued_prompt_tokens=q, queued_predicted_tokens=np.full(q.size, 30.0),
        queued_upper_tokens=np.full(q.size, 50.0), kv_block_tokens=16, kv_blocks_total=4000,
        max_batch=256, max_batched_tokens=2048)


def test_the_projection_carries_it_per_pass() -> None:
    prompts = [700, 600, 1500, 3000, 40, 40]
    proj = project(_state(prompts))
    want = np.zeros(proj.n_iterations, dtype=np.int64)
    for j, ln in enumerate(prompts):
        want[proj.first_token_iter[2 + j]] += ln * ln
    np.testing.assert_array_equal(proj.prefill_attn_tokens2, want)
    assert (proj.prefill_attn_tokens2 < proj.prefill_tokens**2).any()  # shared passes
    m = proj.n_requests
    slo = RequestSlo.from_classes([SloClass(name="t", tbt_ms=200.0)] * m,
                                  prompt_tokens=[500, 900, *prompts],
                                  arrival_s=np.zeros(m),
                                  first_token_s=np.where(proj.generated_tokens > 0, -1.0,
                                                         np.nan))
    problem = prepare(proj, slo, now_s=0.0)
    assert problem.pass_rows.shape == (4, proj.n_iterations)
    np.testing.assert_array_equal(problem.pass_rows[3], want)

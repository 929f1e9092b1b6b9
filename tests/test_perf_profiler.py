"""The offline profiler: twin tables (schema, valid clocks, determinism), the derived 13B TP2
profile, and the GPU target's pure parts (plan, memory cap, rows) up to the torch import."""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest

from throttllem._errors import ConfigError, GpuError
from throttllem._gpulab.decoder import (
    LLAMA3_8B,
    GpuBucket,
    GpuProfileOptions,
    bucket_row,
    gpu_sweep_plan,
    kv_capacity_tokens,
    run_gpu_profile,
    summarize_ms,
)
from throttllem._perf.profiler import limits_of, run_profile, twin_sweep_plan
from throttllem._perf.table import ALL_COLUMNS, read_table
from throttllem._twin import clockmodel as cm
from throttllem._twin import load_profile

SETUPS = ("h100-llama3-8b-tp1", "h100-llama2-13b-tp2")


@pytest.mark.parametrize("setup", SETUPS)
def test_twin_profile_schema_and_clock_validity(tmp_path: Path, setup: str) -> None:
    out = tmp_path / "p.csv"
    n = run_profile(setup=setup, out=out, samples=600, seed=3, log=io.StringIO())
    assert n == 600
    assert out.read_text().splitlines()[0] == ",".join(ALL_COLUMNS)
    t = read_table(out)
    prof = load_profile(setup)
    supported = set(prof.gpu.supported_clocks_mhz)
    assert set(t.requested_clock_mhz.astype(int).tolist()) <= supported
    assert set(t.sm_clock_mhz.astype(int).tolist()) <= supported
    assert np.all(t.sm_clock_mhz <= t.requested_clock_mhz)  # the cap only lowers the clock
    assert np.any(t.sm_clock_mhz < t.requested_clock_mhz)  # and does, for big iterations
    assert all(t.clock_locked)
    assert set(t.target) == {"twin"}
    assert set(t.phase) == {"decode", "prefill", "mixed"}
    b, kv, p, _ = t.features()
    cap = prof.engine.kv_blocks * prof.engine.block_tokens
    assert b.max() <= prof.engine.max_batch
    assert np.all(kv + p <= max(cap, prof.engine.max_batched_tokens, prof.model.max_model_len))
    assert np.all((b >= 1) | (p > 0))
    # a decode row's time is the twin's at the observed clock, times the documented ~1%
    # noise (prefill rows also depend on Σ prompt², which the features do not carry)
    dec = p == 0
    est = cm.iteration_time_s(prof, batch=b[dec], kv_tokens=kv[dec], prefill_tokens=0,
                              clock_mhz=t.sm_clock_mhz[dec])
    ratio = np.log(t.iter_s[dec] / est)
    assert abs(ratio.std() - 0.01) < 0.004
    assert np.all(np.abs(ratio) < 0.3)


def test_twin_profile_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path in (a, b):
        run_profile(setup=SETUPS[0], out=path, samples=200, seed=7,
                    log=io.StringIO())
    assert a.read_bytes() == b.read_bytes()
    run_profile(setup=SETUPS[0], out=b, samples=200, seed=8, log=io.StringIO())
    assert a.read_bytes() != b.read_bytes()


def test_sweep_plan_covers_batch_and_kv_fill() -> None:
    lim = limits_of(SETUPS[0])
    plan = twin_sweep_plan(lim, 3000, 0)
    dec = [pt for pt in plan if pt.phase == "decode"]
    batches = np.array([pt.batch for pt in dec])
    fill = np.array([pt.kv_tokens / min(lim.kv_capacity_tokens, pt.batch *
                                        (lim.max_model_len - 1)) for pt in dec])
    assert batches.min() == 1
    assert batches.max() >= lim.max_batch - 5
    assert fill.min() < 0.05
    assert fill.max() > 0.95
    assert np.all(fill <= 1.0)
    assert all(pt.prefill_tokens <= max(lim.max_batched_tokens, lim.max_model_len)
               for pt in plan)
    assert {pt.clock_mhz for pt in plan} <= set(lim.clocks_mhz)
    with pytest.raises(ConfigError):
        twin_sweep_plan(lim, 0, 0)


def test_13b_tp2_profile_is_derived_and_sensible() -> None:
    p8, p13 = (load_profile(s) for s in SETUPS)
    assert p13.engine.tp_degree == 2
    assert p13.model.layers == 40
    assert p13.model.kv_heads == 40
    assert "derived" in p13.sources["time.kv_ms_per_ktoken"]
    assert "not measured" in p13.description.lower() or "derived" in p13.description.lower()
    # KV per token: 2 x 40 x 40 x 128 x 2 B = 800 KiB for the model (400 KiB per GPU)
    assert p13.model.kv_bytes_per_token == 819_200
    assert p13.engine.kv_blocks * p13.engine.block_tokens * 409_600 < 0.9 * 80 * 2**30
    # slower per iteration than 8B TP1 once KV matters; its roofline terms are the 8B's scaled
    t8, t13 = (cm.iteration_time_s(p, batch=64, kv_tokens=64 * 1000, prefill_tokens=0,
                                   clock_mhz=1980) for p in (p8, p13))
    assert 1.2 < float(t13 / t8) < 2.5
    assert p13.time.kv_ms_per_ktoken == pytest.approx(p8.time.kv_ms_per_ktoken * 3.125, rel=1e-4)


# --------------------------------------------------------------------------- GPU target


def test_gpu_plan_respects_memory_and_goes_coarse_to_fine() -> None:
    opts = GpuProfileOptions()
    cap = kv_capacity_tokens(opts, free_bytes=79 * 2**30)
    assert cap == (49 * 2**30) // LLAMA3_8B.kv_bytes_per_token  # the 49 GiB KV budget binds
    assert kv_capacity_tokens(opts, free_bytes=40 * 2**30) < cap  # a smaller card binds
    plan = gpu_sweep_plan(opts, cap)
    assert len(plan) == len(set(plan))
    assert all(bk.cache_tokens <= cap for bk in plan)
    assert all(bk.batch * bk.ctx <= opts.prefill_tokens_cap for bk in plan
               if bk.phase == "prefill")
    assert GpuBucket("decode", 384, 1024) in plan  # the measured table's largest decode
    # corners first, prefills interleaved from early on
    assert plan[0] == GpuBucket("decode", 1, 128)
    assert {GpuBucket("decode", 1, 8192), GpuBucket("decode", 512, 128)} <= set(plan[:4])
    assert any(bk.phase == "prefill" for bk in plan[:8])
    assert sum(bk.phase == "prefill" for bk in plan) > 20


def test_gpu_row_assembly() -> None:
    assert summarize_ms([3.0, 1.0, 2.0]) == (2.0, 1.2, 2.8)
    row = bucket_row(GpuBucket("decode", 8, 1024), LLAMA3_8B, times_ms=[7.0, 7.2, 7.1],
                     energy_mj=3000.0, window_iters=100, window_s=0.75,
                     clock_samples_mhz=[1980, 1980, 1965])
    assert row.iter_ms == 7.1
    assert row.sm_clock_mhz == 1980
    assert row.energy_j_per_iter == pytest.approx(0.03)
    assert row.avg_power_w == pytest.approx(4.0)
    assert row.kv_tokens == 8192
    assert row.prefill_tokens == 0
    assert row.kv_gib == 1.0
    assert row.requested_clock_mhz is None
    assert row.clock_locked is False
    assert row.target == "gpu"
    pre = bucket_row(GpuBucket("prefill", 2, 512), LLAMA3_8B, times_ms=[20.0], energy_mj=0.0,
                     window_iters=0, window_s=0.0, clock_samples_mhz=[])
    assert pre.tokens == 512
    assert pre.prefill_tokens == 1024
    assert pre.kv_tokens == 0
    assert math.isnan(pre.sm_clock_mhz)
    assert math.isnan(pre.avg_power_w)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed here; this checks the message without it")
def test_gpu_target_without_torch_says_what_is_missing(tmp_path: Path) -> None:
    log = io.StringIO()
    with pytest.raises(GpuError, match="needs PyTorch with CUDA"):
        run_gpu_profile(tmp_path / "g.csv", GpuProfileOptions(budget_s=5), log=log)
    assert "CANNOT be locked" in log.getvalue()  # said before anything else


def test_parquet_out_is_refused_before_profiling(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pyarrow"):
        run_profile(setup=SETUPS[0], out=tmp_path / "p.parquet", samples=10,
                    log=io.StringIO())

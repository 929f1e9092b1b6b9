"""The twin's clock model against the measured H100 table, and the properties it promises.

Run with `pytest -s tests/test_twin_calibration.py` to see the calibration numbers.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from throttllem._twin import clockmodel as cm
from throttllem._twin.calibrate import (
    POWER_FITTED,
    TIME_FITTED,
    MeasuredTable,
    fit,
    load_measured,
    score,
)
from throttllem._twin.profile import SetupProfile, load_profile


@pytest.fixture(scope="module")
def profile() -> SetupProfile:
    return load_profile("h100-llama3-8b-tp1")


@pytest.fixture(scope="module")
def table() -> MeasuredTable:
    return load_measured()


def test_twin_reproduces_measured_table_at_observed_clocks(profile: SetupProfile,
                                                           table: MeasuredTable) -> None:
    assert len(table.phase) == 59
    s = score(profile, table, clock="observed")
    print(f"\ntwin vs H100 iter_ms MAPE={s.time_mape_pct:.2f}% (max {s.time_max_pct:.2f}%), "
          f"power MAPE={s.power_mape_pct:.2f}% (max {s.power_max_pct:.2f}%), "
          f"energy/iter MAPE={s.energy_mape_pct:.2f}% (max {s.energy_max_pct:.2f}%) "
          f"over {s.rows} rows at the measured SM clocks")
    assert s.time_mape_pct <= 5.0
    assert s.time_max_pct <= 8.0
    assert s.power_mape_pct <= 5.0
    assert s.energy_mape_pct <= 5.0


def test_twin_reproduces_table_when_it_picks_the_clock_itself(profile: SetupProfile,
                                                               table: MeasuredTable) -> None:
    """Ask for the default clock and let the power-cap model throttle: the clocks it picks
    should be the ones the real card picked (prefill and big batches at 1545–1950 MHz)."""
    s = score(profile, table, clock="predicted")
    print(f"\ntwin vs H100 with twin-chosen clocks: iter_ms MAPE={s.time_mape_pct:.2f}% "
          f"(max {s.time_max_pct:.2f}%), power MAPE={s.power_mape_pct:.2f}%, "
          f"energy MAPE={s.energy_mape_pct:.2f}%, clock MAE={s.clock_mae_mhz:.1f} MHz")
    assert s.time_mape_pct <= 5.0
    assert s.energy_mape_pct <= 5.0
    assert s.clock_mae_mhz <= 20.0
    est = cm.effective_clock_mhz(profile, batch=table.batch, kv_tokens=table.kv_tokens,
                                 prefill_tokens=table.prefill_tokens,
                                 prefill_attn_tokens2=table.prefill_attn_tokens2,
                                 requested_clock_mhz=1980)
    prefill = np.array([p == "prefill" for p in table.phase])
    big = prefill & (table.prefill_tokens >= 512)
    assert np.all(est[big] < 1980)  # every big prefill is power-capped, as measured
    small_decode = ~prefill & (table.batch <= 64)
    assert np.all(est[small_decode] == 1980)  # memory-bound decode never reaches the cap


def test_fitted_parameters_are_reproducible(profile: SetupProfile, table: MeasuredTable) -> None:
    """The profile's "fitted" numbers are what the fit gives (from a perturbed start)."""
    start = profile.with_overrides({k: v * 1.3 for k, v in fit(profile, table).items()
                                    if k != "time.roofline_sharpness"})
    refit = fit(start, table)
    for key in (*TIME_FITTED, *POWER_FITTED):
        section, _, name = key.partition(".")
        shipped = getattr(getattr(profile, section), name)
        assert refit[key] == pytest.approx(shipped, rel=0.01), key
        assert profile.sources[key].startswith("fitted to ../shared/data/gpu-profiles/"), key


# --------------------------------------------------------------------------- properties

_CLOCKS = np.arange(345, 1981, 15, dtype=np.float64)


def _state_grid() -> dict[str, np.ndarray]:
    """Iteration shapes from idle-ish decode to full prefill, shaped (..., 1) for clocks."""
    batch, ctx, prefill = np.meshgrid([0, 1, 8, 64, 256], [128, 1024, 8192],
                                      [0, 128, 2048, 8192], indexing="ij")
    batch, ctx, prefill = batch.ravel(), ctx.ravel(), prefill.ravel()
    keep = (batch + prefill) > 0
    batch, ctx, prefill = batch[keep], ctx[keep], prefill[keep]
    return {"batch": batch[:, None].astype(float),
            "kv_tokens": (batch * ctx)[:, None].astype(float),
            "prefill_tokens": prefill[:, None].astype(float),
            "prefill_attn_tokens2": (prefill * np.minimum(prefill, 2048))[:, None].astype(float)}


def test_time_non_increasing_and_power_non_decreasing_in_clock(profile: SetupProfile) -> None:
    g = _state_grid()
    t = cm.iteration_time_s(profile, clock_mhz=_CLOCKS, **g)
    p = cm.power_w(profile, clock_mhz=_CLOCKS, **g)
    assert t.shape == p.shape == (g["batch"].shape[0], _CLOCKS.size)
    assert np.all(np.diff(t, axis=1) <= 1e-12)
    assert np.all(np.diff(p, axis=1) >= -1e-9)
    assert np.all(p > profile.gpu.idle_power_w)


def _slowdown(profile: SetupProfile, clock_mhz: float, **shape: float) -> float:
    t = cm.iteration_time_s(profile, clock_mhz=np.array([clock_mhz, 1980.0]), **shape)
    return float(t[0] / t[1])


def test_memory_bound_decode_slows_far_less_than_prefill(profile: SetupProfile) -> None:
    decode = {"batch": 1, "kv_tokens": 512, "prefill_tokens": 0}
    prefill = {"batch": 0, "kv_tokens": 0, "prefill_tokens": 2048,
               "prefill_attn_tokens2": 2048**2}
    lowest = float(profile.gpu.clock_min_mhz)
    d_low, p_low = _slowdown(profile, lowest, **decode), _slowdown(profile, lowest, **prefill)
    d_mid, p_mid = _slowdown(profile, 990, **decode), _slowdown(profile, 990, **prefill)
    print(f"\nslowdown at {lowest:.0f} MHz: decode b1 x{d_low:.2f}, prefill 2048 x{p_low:.2f}; "
          f"at 990 MHz: decode x{d_mid:.3f}, prefill x{p_mid:.3f}")
    assert d_low < 0.5 * p_low
    assert p_low > 4.5  # compute-bound: close to 1980/345 = 5.7
    assert d_mid < 1.15  # "decode largely insensitive to the clock" down to ~1 GHz
    assert p_mid > 1.8


def test_clock_sensitivity_grows_with_batch_and_shrinks_with_context(
        profile: SetupProfile) -> None:
    """As documented in clockmodel: more GEMM work per pass makes a pass more clock-sensitive,
    more KV to stream (HBM-bound attention) makes it less so."""
    by_batch = [_slowdown(profile, 990, batch=b, kv_tokens=b * 128, prefill_tokens=0)
                for b in (1, 8, 32, 64, 128, 256)]
    by_ctx = [_slowdown(profile, 990, batch=32, kv_tokens=32 * c, prefill_tokens=0)
              for c in (128, 512, 1024, 2048, 4096, 8192)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(by_batch))
    assert all(c2 <= c1 for c1, c2 in itertools.pairwise(by_ctx))
    assert by_batch[-1] > by_batch[0] + 0.1
    assert by_ctx[0] > by_ctx[-1] + 0.03


def test_decode_energy_has_a_sweet_spot_at_a_moderate_clock(profile: SetupProfile) -> None:
    """Energy per decode step is U-shaped in the clock (throttLL'eM), and locking the clock
    saves about the up-to-32% of decode energy reported on H200 (arXiv 2605.11999)."""
    shape = {"batch": 1.0, "kv_tokens": 512.0, "prefill_tokens": 0.0}
    t = cm.iteration_time_s(profile, clock_mhz=_CLOCKS, **shape)
    p = cm.power_w(profile, clock_mhz=_CLOCKS, **shape)
    energy = t * p
    best = int(np.argmin(energy))
    saving = 1 - energy[best] / energy[-1]
    print(f"\nbatch-1 decode: least energy at {_CLOCKS[best]:.0f} MHz, {saving:.0%} below 1980 "
          f"MHz, for {t[best] / t[-1] - 1:+.0%} time; power {p[-1]:.0f} W at 1980")
    assert 600 < _CLOCKS[best] < 1500
    assert 0.2 < saving < 0.4
    assert p[-1] < 0.65 * profile.gpu.power_cap_w  # decode draws far under the cap


def test_effective_clock_respects_cap_and_request(profile: SetupProfile) -> None:
    big_prefill = {"batch": 0.0, "kv_tokens": 0.0, "prefill_tokens": 8192.0,
                   "prefill_attn_tokens2": 4 * 2048.0**2}
    f = float(cm.effective_clock_mhz(profile, requested_clock_mhz=1980, **big_prefill))
    assert f < 1980
    assert float(cm.power_w(profile, clock_mhz=f, **big_prefill)) <= profile.gpu.power_cap_w
    assert float(cm.power_w(profile, clock_mhz=f + 15, **big_prefill)) > profile.gpu.power_cap_w
    # Below the throttle point the requested clock is honoured.
    assert float(cm.effective_clock_mhz(profile, requested_clock_mhz=1200,
                                        **big_prefill)) == 1200
    # Vectorized: states (3, 1) × requests (4,) -> (3, 4), never above the request.
    req = np.array([345.0, 990.0, 1500.0, 1980.0])
    out = cm.effective_clock_mhz(profile, batch=np.array([[1.0], [64.0], [0.0]]),
                                 kv_tokens=np.array([[512.0], [65536.0], [0.0]]),
                                 prefill_tokens=np.array([[0.0], [0.0], [8192.0]]),
                                 requested_clock_mhz=req)
    assert out.shape == (3, 4)
    assert np.all(out <= req)
    assert np.all(np.isin(out, profile.gpu.supported_clocks_mhz))


def test_scalar_fast_path_agrees_with_vectorized_model(profile: SetupProfile) -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        batch = float(rng.integers(0, 257))
        kv = float(batch * rng.integers(1, 8192))
        pre = float(rng.choice([0, rng.integers(1, 8193)]))
        a2 = float(pre * min(pre, 2048))
        if batch + pre == 0:
            continue
        req = float(rng.choice(profile.gpu.supported_clocks_mhz))
        shape = {"batch": batch, "kv_tokens": kv, "prefill_tokens": pre,
                 "prefill_attn_tokens2": a2}
        clock, it = cm.effective_clock_scalar(profile, requested_clock_mhz=req, **shape)
        assert clock == float(cm.effective_clock_mhz(profile, requested_clock_mhz=req, **shape))
        assert it.time_s == pytest.approx(float(cm.iteration_time_s(profile, clock_mhz=clock,
                                                                    **shape)), rel=1e-12)
        assert it.power_w == pytest.approx(float(cm.power_w(profile, clock_mhz=clock, **shape)),
                                           rel=1e-12)


def test_bad_clock_is_refused(profile: SetupProfile) -> None:
    with pytest.raises(ValueError, match="positive"):
        cm.iteration_time_s(profile, batch=1, kv_tokens=1, prefill_tokens=0, clock_mhz=0)


def test_per_clock_scalar_model_gives_the_reference_numbers_exactly(
        profile: SetupProfile) -> None:
    """The engine twin's clock model (`ScalarClockModel`, per-clock terms kept) must give
    `effective_clock_scalar`'s clock and iteration bit for bit, power cap search included."""
    fast = cm.ScalarClockModel(profile)
    rng = np.random.default_rng(11)
    capped = 0
    for _ in range(600):
        batch = float(rng.integers(0, 257))
        kv = float(batch * rng.integers(1, 8192))
        pre = float(rng.choice([0, rng.integers(1, 16385)]))
        a2 = float(pre * min(pre, 4096))
        if batch + pre == 0:
            continue
        req = float(rng.choice(profile.gpu.supported_clocks_mhz))
        shape = {"batch": batch, "kv_tokens": kv, "prefill_tokens": pre,
                 "prefill_attn_tokens2": a2}
        want = cm.effective_clock_scalar(profile, requested_clock_mhz=req, **shape)
        assert fast.effective(requested_clock_mhz=req, **shape) == want
        capped += want[0] < req
    print(f"\n{capped} of the shapes ran below the requested clock (power cap)")

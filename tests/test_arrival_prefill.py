"""Future prefills in the controller's model: admitted prompts keep arriving, and the
engine prefills them inside the running requests' passes (`ArrivalPrefillPerf`)."""

from __future__ import annotations

import numpy as np
import pytest

from throttllem._core.clock_search import SupportedClocks
from throttllem._core.perf import (
    AffinePerfModel,
    ArrivalPrefillPerf,
    is_monotone_in_clock,
    prefill_s_per_token,
)
from throttllem._core.placement import EngineShape, InstanceTracker, Policy, perf_for, retune
from throttllem._core.slo import SloClass

CLOCKS = tuple(range(345, 1981, 15))
SHAPE = EngineShape(kv_block_tokens=16, kv_blocks_total=27_669, max_batch=256,
                    max_batched_tokens=8192)


def test_marginal_prefill_cost_of_the_affine_model_is_exact() -> None:
    model = AffinePerfModel()
    cost = prefill_s_per_token(model, CLOCKS)
    expected = model.prefill_s_per_token * model.ref_clock_mhz / np.asarray(CLOCKS, float)
    np.testing.assert_allclose(cost, expected, rtol=1e-9)
    assert prefill_s_per_token(model, CLOCKS) is cost  # cached


def test_passes_stretch_by_the_share_of_arriving_prefills() -> None:
    model = AffinePerfModel()
    rate = 5_000.0  # prompt tokens per second
    wrapped = ArrivalPrefillPerf(model, rate, CLOCKS)
    clocks = np.asarray(CLOCKS, float)[:, None]
    batch, kv, pf = np.array([[8.0, 64.0]]), np.array([[8e3, 6e4]]), np.array([[0.0, 512.0]])
    base = model.iteration_time_s(batch, kv, pf, clocks)
    share = rate * model.prefill_s_per_token * model.ref_clock_mhz / clocks
    np.testing.assert_allclose(wrapped.iteration_time_s(batch, kv, pf, clocks),
                               base / (1.0 - share), rtol=1e-9)
    assert is_monotone_in_clock(wrapped, CLOCKS)
    # Beyond what the instance can prefill at a clock, its passes count as 10x slower.
    flooded = ArrivalPrefillPerf(model, 60_000.0, CLOCKS)
    low = flooded.iteration_time_s(batch, kv, pf, np.array([[345.0]]))
    np.testing.assert_allclose(low, 10.0 * model.iteration_time_s(batch, kv, pf,
                                                                  np.array([[345.0]])))


def _tracker(n: int, *, every_s: float, prompt: int, until_s: float) -> InstanceTracker:
    tracker = InstanceTracker("i0", SHAPE)
    slo = SloClass(name="standard")
    for k in range(n):
        t = until_s - (n - 1 - k) * every_s
        tracker.admitted(f"r{k}", prompt_tokens=prompt, predicted_tokens=200.0,
                         upper_tokens=260.0, arrival_s=t, slo=slo)
    return tracker


def test_prefill_rate_counts_the_window_only() -> None:
    tracker = _tracker(40, every_s=0.5, prompt=1000, until_s=100.0)  # 2 req/s, 80.5..100
    assert tracker.prefill_rate(100.0, 10.0) == pytest.approx(20 * 1000 / 10.0)
    assert tracker.prefill_rate(200.0, 10.0) == 0.0
    assert len(tracker.recent) == 0  # old admissions are forgotten


@pytest.mark.parametrize("rate_per_s", [1.0, 4.0, 8.0])
def test_steady_arrivals_never_lower_the_clock(rate_per_s: float) -> None:
    policy = Policy(perf=AffinePerfModel(), clocks=SupportedClocks(CLOCKS), floor_mhz=345)
    blind = Policy(perf=AffinePerfModel(), clocks=SupportedClocks(CLOCKS), floor_mhz=345,
                   arrival_window_s=None)
    tracker = _tracker(int(10 * rate_per_s), every_s=1.0 / rate_per_s, prompt=2000,
                       until_s=50.0)
    ids = tracker.requests
    for k in range(100):  # all running, 100 tokens each by now
        tracker.iteration(ids, 49.0 + k / 100)
    aware, unaware = retune(tracker, policy, now_s=50.0), retune(tracker, blind, now_s=50.0)
    assert aware >= unaware
    assert isinstance(perf_for(tracker, policy, 50.0), ArrivalPrefillPerf)
    assert perf_for(tracker, blind, 50.0) is blind.perf
    if rate_per_s >= 4.0:
        assert aware > unaware  # enough prefill load to need a higher clock



class _PreparedAffine(AffinePerfModel):
    """The affine model behind the `PreparedPerfModel` calls (its passes "prepared" as is)."""

    def prepare_passes(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def prepared_time_s(self, prepared: np.ndarray, clocks_mhz: np.ndarray) -> np.ndarray:
        return np.asarray(self.iteration_time_s(prepared[0:1], prepared[1:2], prepared[2:3],
                                                clocks_mhz.reshape(-1, 1)))


def test_stretch_at_supported_clocks_is_read_off_exactly() -> None:
    """A search asks for supported clocks: the wrapper reads their factors by position,
    which must be what `stretch` (np.interp) gives there, bit for bit; other clocks still
    interpolate."""
    model = _PreparedAffine()
    rows = np.array([[8.0, 64.0], [8e3, 6e4], [0.0, 512.0]])
    for rate in (0.0, 3_000.0, 12_345.0, 60_000.0):
        wrapped = ArrivalPrefillPerf(model, rate, CLOCKS)
        prepared = wrapped.prepare_passes(rows)
        for clocks in (np.asarray(CLOCKS, float), np.asarray(CLOCKS, float)[[0, 40, 109]],
                       np.array([1005.0]), np.array([350.0, 1000.0]), np.array([1990.0])):
            want = (model.prepared_time_s(rows, clocks) * wrapped.stretch(clocks[:, None]))
            for _ in range(2):  # the second time from the wrapper's cache
                np.testing.assert_array_equal(wrapped.prepared_time_s(prepared, clocks), want)

"""Pure accounting in the core: energy attribution, SLO checks, the run summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttllem import ConfigError
from throttllem._core.energy import EnergyLedger, split_energy_mj
from throttllem._core.report import ClockAccumulator, format_table, summarize
from throttllem._core.routing import least_loaded
from throttllem._core.slo import DEFAULT_SLO_CLASSES, SloClass, check_slo
from throttllem._events import EngineIteration, RequestCompleted


def completed(rid: str, *, ttft_ms: float = 100.0, tbt_ms: float = 20.0, gen: int = 11,
              prompt: int = 100, slo_class: str = "standard") -> RequestCompleted:
    e2e = ttft_ms + tbt_ms * (gen - 1)
    return RequestCompleted(id=rid, instance="i0", slo_class=slo_class, arrival_s=0.0,
                            admitted_s=0.0, first_token_s=ttft_ms / 1e3,
                            completed_s=e2e / 1e3, prompt_tokens=prompt, generated_tokens=gen,
                            ttft_ms=ttft_ms, tbt_mean_ms=tbt_ms, tbt_max_ms=tbt_ms, e2e_ms=e2e)


@given(energy=st.floats(0, 1e6), tokens=st.lists(st.integers(0, 4096), min_size=1, max_size=64))
def test_split_energy_conserves_and_is_proportional(energy: float, tokens: list[int]) -> None:
    parts = split_energy_mj(energy, tokens)
    if sum(tokens) == 0:
        assert parts.sum() == 0
        return
    assert math.isclose(parts.sum(), energy, rel_tol=1e-9, abs_tol=1e-9)
    biggest = int(np.argmax(tokens))
    assert parts[biggest] == pytest.approx(energy * tokens[biggest] / sum(tokens))


def test_ledger_keeps_idle_apart_and_totals_add_up() -> None:
    ledger = EnergyLedger()
    ledger.add_iteration(["a", "b"], [1000, 1], 1001.0)
    ledger.add_iteration(["a", "b"], [1, 1], 10.0)
    ledger.add_iteration([], [], 7.0)  # idle, nobody to bill
    assert ledger.pop("a") == pytest.approx(1005.0)
    assert ledger.pop("b") == pytest.approx(6.0)
    assert ledger.pop("never-ran") == 0.0
    assert ledger.attributed_mj + ledger.unattributed_mj == pytest.approx(1018.0)
    assert len(ledger) == 0


def test_ledger_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 request ids but 1 token counts"):
        EnergyLedger().add_iteration(["a", "b"], [1], 1.0)


def test_least_loaded_breaks_ties_by_name() -> None:
    assert least_loaded({"i1": 2, "i0": 2, "i2": 3}) == "i0"
    assert least_loaded({"i1": 0, "i0": 2}) == "i1"
    with pytest.raises(ConfigError):
        least_loaded({})


def test_slo_bounds_scale_with_request_size() -> None:
    slo = SloClass(name="s", tbt_ms=50, ttft_base_ms=500, ttft_ms_per_prompt_token=0.25)
    assert slo.ttft_bound_ms(1000) == 750
    assert slo.e2e_bound_ms(1000, 11) == 750 + 50 * 10
    ok = check_slo(completed("a", ttft_ms=700, tbt_ms=49, prompt=1000))
    assert ok.all_ok
    late_first = check_slo(completed("b", ttft_ms=800, tbt_ms=10, prompt=1000))
    assert (late_first.ttft_ok, late_first.tbt_ok) == (False, True)
    slow = check_slo(completed("c", ttft_ms=100, tbt_ms=120))
    assert (slow.tbt_ok, slow.e2e_ok) == (False, False)
    with pytest.raises(ConfigError, match="unknown SLO class"):
        check_slo(completed("d", slo_class="platinum"))
    assert set(DEFAULT_SLO_CLASSES) >= {"standard"}


def test_summary_counts_unserved_against_attainment() -> None:
    clocks = ClockAccumulator()
    for clock_mhz, dur_ms, batch in ((1980.0, 10.0, 4), (990.0, 30.0, 8)):
        clocks.add(EngineIteration(instance="i0", seq=0, start_s=0, duration_ms=dur_ms,
                                   batch_size=batch, decode_tokens=batch, prefill_tokens=0,
                                   kv_blocks_used=1, kv_blocks_total=9, queue_len=0,
                                   clock_mhz=clock_mhz))
    done = [completed("a"), completed("b", tbt_ms=500)]
    report = summarize(done, policy="default", submitted=4, energy_j=300.0, clocks=clocks,
                       duration_s=60.0)
    assert report.requests_served == 2
    assert report.slo_attainment == 0.25  # one of four met everything
    assert report.tbt_attainment == 0.25
    assert report.generated_tokens == 22
    assert report.j_per_token == pytest.approx(300.0 / 22)
    assert report.mean_sm_clock_mhz == pytest.approx((1980 * 10 + 990 * 30) / 40)
    assert report.mean_batch == pytest.approx((4 * 10 + 8 * 30) / 40)
    table = format_table([report])
    assert "SLO attainment" in table
    assert "25.0%" in table

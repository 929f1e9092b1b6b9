"""The controller's shortcuts give the answers of the plain paths they skip.

- `search_below` (a placement try that only has to beat another instance's clock) against a
  brute-force check of every clock;
- prepared pass rows (`PreparedPerfModel`: the compiled grid prepares a problem's passes
  once for all its probe rounds) against the model's plain `iteration_time_s`, bit for bit;
- a tracker's snapshot with the candidate's SLO row appended against the snapshot joined
  with that row.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttllem._core.clock_search import search_below
from throttllem._core.forecast import Candidate, InstanceState, project
from throttllem._core.perf import ArrivalPrefillPerf, FunctionPerfModel, PerfModel
from throttllem._core.placement import EngineShape, InstanceTracker
from throttllem._core.slo import SloClass
from throttllem._core.slo_check import RequestSlo, pass_times_s, prepare
from throttllem._errors import ClockOutOfRangeError


def _core_tests() -> Any:
    """The forecast/SLO/search test module, for its state generators and brute force (tests
    are imported by path here, not as a package)."""
    spec = importlib.util.spec_from_file_location(
        "_controller_core_helpers", Path(__file__).with_name("test_controller_core.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_core = _core_tests()
AFFINE = _core.AFFINE
H100_CLOCKS = _core.H100_CLOCKS
NOW_S = _core.NOW_S
PROPS = _core.PROPS
STEPPED = _core.STEPPED
_big_state = _core._big_state
brute_force_lowest = _core.brute_force_lowest
candidates = _core.candidates
instance_states = _core.instance_states
request_slos = _core.request_slos


@PROPS
@given(data=st.data(), state=instance_states(), candidate=st.none() | candidates,
       stepped=st.booleans(), floor_i=st.integers(0, 100), gap=st.integers(1, 60),
       hint_mhz=st.none() | st.integers(300, 2100))
def test_search_below_agrees_with_every_clock_checked(data: st.DataObject,
                                                      state: InstanceState, *,
                                                      candidate: Candidate | None,
                                                      stepped: bool, floor_i: int, gap: int,
                                                      hint_mhz: int | None) -> None:
    perf = STEPPED if stepped else AFFINE
    below_i = min(floor_i + gap, len(H100_CLOCKS) - 1)
    if below_i <= floor_i:
        floor_i = below_i - 1
    p = project(state, candidate=candidate)
    slo = data.draw(request_slos(state, p, candidate))
    _, ok = brute_force_lowest(p, slo, perf)
    got, top_ok = search_below(prepare(p, slo, now_s=NOW_S), perf, H100_CLOCKS,
                               floor_mhz=H100_CLOCKS.mhz[floor_i],
                               below_mhz=H100_CLOCKS.mhz[below_i], hint_mhz=hint_mhz)
    assert top_ok == bool(ok[-1])
    if not top_ok:
        assert got is None
        return
    feasible_from_floor = np.flatnonzero(ok[floor_i:])
    lowest = floor_i + int(feasible_from_floor[0])
    assert got == (H100_CLOCKS.mhz[lowest] if lowest < below_i else None)


def test_search_below_needs_a_bound_above_the_floor() -> None:
    state = InstanceState.idle(kv_block_tokens=16, kv_blocks_total=1000, max_batch=8,
                               max_batched_tokens=4096)
    cand = Candidate(100, 20.0, 30.0)
    p = project(state, candidate=cand)
    slo = RequestSlo.for_request(SloClass(name="standard"), prompt_tokens=100,
                                 arrival_s=NOW_S)
    with pytest.raises(ClockOutOfRangeError):
        search_below(prepare(p, slo, now_s=NOW_S), AFFINE, H100_CLOCKS, floor_mhz=900,
                     below_mhz=900)


@pytest.fixture(scope="module")
def runtime() -> Any:
    mod = pytest.importorskip("throttllem._perf.runtime")
    return mod.PerfRuntime.load("h100-llama3-8b-tp1")


@pytest.mark.parametrize("seed", range(6))
def test_prepared_passes_give_the_plain_model_values(runtime: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    state, cand = _big_state(rng, int(rng.integers(1, 300)), int(rng.integers(0, 5)))
    p = project(state, candidate=cand)
    m = p.n_requests
    slo = RequestSlo(np.full(m, NOW_S - 0.2), np.full(m, np.nan), np.full(m, np.nan),
                     np.full(m, 500.0), np.full(m, 50.0))
    slo.first_token_s[: p.n_running] = NOW_S - 1.0
    slo.last_token_s[: p.n_running] = NOW_S - 0.01
    plain = FunctionPerfModel(runtime.iteration_time_s)
    fast = FunctionPerfModel(runtime.iteration_time_s, prepared=runtime)
    models: list[tuple[PerfModel, PerfModel]] = [
        (plain, fast), (runtime, fast),
        (ArrivalPrefillPerf(plain, 3000.0, H100_CLOCKS.mhz),
         ArrivalPrefillPerf(fast, 3000.0, H100_CLOCKS.mhz))]
    idx = sorted(set(rng.integers(0, len(H100_CLOCKS), 5).tolist()))
    for clocks in (H100_CLOCKS.as_f64, H100_CLOCKS.as_f64[idx], np.array([1000.0, 1333.0])):
        for reference, prepared in models:
            problem = prepare(p, slo, now_s=NOW_S)
            want = np.asarray(reference.iteration_time_s(
                problem.batch, problem.kv_tokens, problem.prefill_tokens,
                clocks.reshape(-1, 1)))
            got = pass_times_s(problem, prepared, clocks)
            again = pass_times_s(problem, prepared, clocks)  # the prepared rows reused
            assert got.shape == want.shape
            assert np.array_equal(got, want)
            assert np.array_equal(again, want)


def test_snapshot_with_the_candidate_row_appended() -> None:
    shape = EngineShape(kv_block_tokens=16, kv_blocks_total=4096, max_batch=64,
                        max_batched_tokens=8192)
    tracker = InstanceTracker("i0", shape, capacity=2)  # grows on the way
    slo = SloClass(name="standard")
    for k in range(7):
        tracker.admitted(f"r{k}", prompt_tokens=100 + k, predicted_tokens=20.0 + k,
                         upper_tokens=30.0 + k, arrival_s=NOW_S + k, slo=slo)
    tracker.iteration(["r0", "r2", "r5"], NOW_S + 10)
    tracker.completed("r1")
    cand = RequestSlo.for_request(slo, prompt_tokens=500, arrival_s=NOW_S + 20)
    state, rows = tracker.snapshot()
    state_c, rows_c = tracker.snapshot(cand)
    joined = RequestSlo.concat([rows, cand])
    for name in RequestSlo.__slots__:
        np.testing.assert_array_equal(getattr(rows_c, name), getattr(joined, name))
    for name in InstanceState.__slots__:
        a, b = getattr(state, name), getattr(state_c, name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    assert state.n_running == 3
    assert state.running_generated_tokens.tolist() == [1, 1, 1]
    assert state.queued_prompt_tokens.tolist() == [103, 104, 106]

"""The controller's functional core: forecast, SLO check, clock search, hysteresis.

Real numpy, no mocks. The forecast is compared with a plain loop-based simulation of the
engine's batching (and, where the twin is present, with the engine twin itself); the SLO
check with a per-token loop that applies `SloClass` directly; the clock search with a
brute-force scan of every clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from throttllem._core.clock_search import (
    FeasibleClock,
    NoFeasibleClock,
    SupportedClocks,
    min_feasible_clock,
    next_clock,
    search_clock,
)
from throttllem._core.forecast import Candidate, InstanceState, Projection, project
from throttllem._core.perf import AffinePerfModel, FunctionPerfModel, is_monotone_in_clock
from throttllem._core.slo import SloClass
from throttllem._core.slo_check import (
    RequestSlo,
    check,
    e2e_bound_ms,
    feasible,
    prepare,
)
from throttllem._errors import ClockOutOfRangeError, ConfigError
from throttllem._events import RequestArrived

H100_CLOCKS = SupportedClocks(tuple(range(345, 1981, 15)))
AFFINE = AffinePerfModel()
NOW_S = 1000.0
PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- reference


@dataclass
class _Req:
    index: int
    ctx: int
    gen: int
    target: int
    first: int = -1
    last: int = -1


@dataclass
class RefProjection:
    decode_batch: list[int]
    batch_size: list[int]
    kv_tokens: list[int]
    kv_blocks: list[int]
    prefill_tokens: list[int]
    first: list[int]
    last: list[int]
    emitted: list[int]
    overflow: int


def reference_projection(state: InstanceState, *, use_upper: bool = False,
                         candidate: Candidate | None = None) -> RefProjection:
    """One pass at a time, one request at a time: the engine twin's rules without
    preemption."""
    block = state.kv_block_tokens

    def target(pred: float) -> int:
        return max(math.ceil(pred), 1)

    r_pred = state.running_upper_tokens if use_upper else state.running_predicted_tokens
    running = [_Req(i, int(p) + int(g), int(g), target(float(x)))
               for i, (p, g, x) in enumerate(zip(state.running_prompt_tokens,
                                                 state.running_generated_tokens, r_pred,
                                                 strict=True))]
    q_pred = list(state.queued_upper_tokens if use_upper else state.queued_predicted_tokens)
    q_prompt = [int(p) for p in state.queued_prompt_tokens]
    q_gen = ([0] * len(q_prompt) if state.queued_generated_tokens is None
             else [int(g) for g in state.queued_generated_tokens])
    if candidate is not None:
        q_prompt.append(candidate.prompt_tokens)
        q_gen.append(0)
        q_pred.append(candidate.upper_tokens if use_upper else candidate.predicted_tokens)
    n_run = len(running)
    queue = deque(_Req(n_run + j, p + g, g, target(float(x)))
                  for j, (p, g, x) in enumerate(zip(q_prompt, q_gen, q_pred, strict=True)))
    everyone = running + list(queue)
    out = RefProjection([], [], [], [], [], [], [], [], -1)
    k = 0
    while running or queue:
        n = len(running)
        used = sum(-(-r.ctx // block) for r in running)
        if used > state.kv_blocks_total and out.overflow < 0:
            out.overflow = k
        kv = sum(r.ctx for r in running)
        free = state.kv_blocks_total - used
        budget = state.max_batched_tokens - n
        slots = state.max_batch - n
        admitted: list[_Req] = []
        prefill = 0
        while queue and slots > 0:
            r = queue[0]
            need = (r.ctx + block) // block
            reserve = state.kv_watermark_blocks if (n or admitted) else 0
            if need > free - reserve or (r.ctx > budget and admitted):
                break
            queue.popleft()
            admitted.append(r)
            free -= need
            used += need
            budget -= r.ctx
            slots -= 1
            prefill += r.ctx
        assert running or admitted, "reference stuck: a queued request never fits"
        out.decode_batch.append(n)
        out.batch_size.append(n + len(admitted))
        out.kv_tokens.append(kv)
        out.kv_blocks.append(used)
        out.prefill_tokens.append(prefill)
        for r in running + admitted:
            if r.first < 0:
                r.first = k
            assert r.last in (-1, k - 1), "tokens must come in consecutive passes"
            r.last = k
            r.gen += 1
            r.ctx += 1
        running = [r for r in running + admitted if r.gen < r.target]
        k += 1
    out.first = [r.first for r in everyone]
    out.last = [r.last for r in everyone]
    out.emitted = [r.last - r.first + 1 for r in everyone]
    return out


# --------------------------------------------------------------------------- strategies


def _ints(draw: st.DrawFn, n: int, lo: int, hi: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    return np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=np.int64)


def _floats(draw: st.DrawFn, n: int, lo: float,
            hi: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    xs = draw(st.lists(st.floats(lo, hi, allow_nan=False), min_size=n, max_size=n))
    return np.array(xs, dtype=np.float64)


@st.composite
def instance_states(draw: st.DrawFn, *, max_running: int = 24, max_queued: int = 6,
                    preempted: bool = True) -> InstanceState:
    block = draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(0, max_running))
    q = draw(st.integers(0, max_queued))
    r_prompt = _ints(draw, n, 1, 120)
    r_gen = _ints(draw, n, 1, 40)
    r_pred = _floats(draw, n, 0.0, 60.0)
    r_up = r_pred + _floats(draw, n, 0.0, 30.0)
    q_prompt = _ints(draw, q, 1, 300)
    q_gen = _ints(draw, q, 0, 10) if preempted and draw(st.booleans()) else None
    q_pred = _floats(draw, q, 0.0, 60.0)
    q_up = q_pred + _floats(draw, q, 0.0, 30.0)
    ctx = q_prompt + (0 if q_gen is None else q_gen)
    # Room for any queued request (and a candidate of up to 300 tokens) on an empty engine.
    need = int(((np.append(ctx, 300) + block) // block).max())
    return InstanceState(
        running_prompt_tokens=r_prompt, running_generated_tokens=r_gen,
        running_predicted_tokens=r_pred, running_upper_tokens=r_up,
        queued_prompt_tokens=q_prompt, queued_predicted_tokens=q_pred,
        queued_upper_tokens=q_up, queued_generated_tokens=q_gen,
        kv_block_tokens=block,
        kv_blocks_total=need + draw(st.integers(0, 400 // block + 40)),
        max_batch=draw(st.integers(1, 32)),
        max_batched_tokens=draw(st.integers(1, 1024)),
        kv_watermark_blocks=draw(st.integers(0, 4)),
    )


candidates = st.builds(Candidate, prompt_tokens=st.integers(1, 300),
                       predicted_tokens=st.floats(0.0, 60.0),
                       upper_tokens=st.floats(0.0, 90.0))
slo_classes = st.builds(SloClass, name=st.just("x"), tbt_ms=st.floats(3.0, 60.0),
                        ttft_base_ms=st.floats(10.0, 2000.0),
                        ttft_ms_per_prompt_token=st.floats(0.0, 1.0))


@st.composite
def request_slos(draw: st.DrawFn, state: InstanceState, projection: Projection,
                 candidate: Candidate | None) -> RequestSlo:
    """SLO classes and timing so far consistent with each request's progress."""
    m = projection.n_requests
    prompts = np.concatenate((state.running_prompt_tokens, state.queued_prompt_tokens,
                              [candidate.prompt_tokens] if candidate else []))
    gen = projection.generated_tokens
    classes = draw(st.lists(slo_classes, min_size=m, max_size=m))
    waited = _floats(draw, m, 0.0, 3.0)  # arrival → first token (or → now)
    decoding = _floats(draw, m, 0.0, 2.0)  # first token → now
    since_last = _floats(draw, m, 0.0, 0.05)
    has = gen > 0
    first = np.where(has, NOW_S - decoding, np.nan)
    last = np.where(has, NOW_S - np.minimum(since_last, decoding), np.nan)
    arrival = np.where(has, first - waited, NOW_S - waited)
    return RequestSlo.from_classes(classes, prompt_tokens=prompts, arrival_s=arrival,
                                   first_token_s=first, last_token_s=last)


# --------------------------------------------------------------------------- forecast


def assert_projection_matches(p: Projection, ref: RefProjection) -> None:
    assert p.decode_batch.tolist() == ref.decode_batch
    assert p.batch_size.tolist() == ref.batch_size
    assert p.kv_tokens.tolist() == ref.kv_tokens
    assert p.kv_blocks.tolist() == ref.kv_blocks
    assert p.prefill_tokens.tolist() == ref.prefill_tokens
    assert p.first_token_iter.tolist() == ref.first
    assert p.last_token_iter.tolist() == ref.last
    assert (p.total_tokens - p.generated_tokens).tolist() == ref.emitted
    assert p.kv_overflow_iter == ref.overflow


@PROPS
@given(state=instance_states(), use_upper=st.booleans(),
       candidate=st.none() | candidates)
def test_forecast_is_exact_against_the_reference_loop(
        state: InstanceState, use_upper: bool, candidate: Candidate | None) -> None:
    p = project(state, use_upper=use_upper, candidate=candidate)
    assert_projection_matches(p, reference_projection(state, use_upper=use_upper,
                                                      candidate=candidate))
    assert p.n_running == state.n_running
    assert p.n_queued == state.n_queued
    assert p.has_candidate == (candidate is not None)


@settings(max_examples=40, deadline=None)
@given(state=instance_states(max_running=300, max_queued=40))
def test_forecast_is_exact_on_larger_states(state: InstanceState) -> None:
    assert_projection_matches(project(state), reference_projection(state))


def test_forecast_of_an_idle_instance_is_empty() -> None:
    state = InstanceState.idle(kv_block_tokens=16, kv_blocks_total=100, max_batch=8,
                               max_batched_tokens=512)
    p = project(state)
    assert p.n_iterations == 0
    assert p.n_requests == 0
    alone = project(state, candidate=Candidate(prompt_tokens=40, predicted_tokens=3,
                                               upper_tokens=5))
    assert alone.batch_size.tolist() == [1, 1, 1]
    assert alone.prefill_tokens.tolist() == [40, 0, 0]
    assert alone.kv_tokens.tolist() == [0, 41, 42]
    assert alone.kv_blocks.tolist() == [3, 3, 3]  # ceil(41/16): admission, then ctx 41, 42
    assert alone.first_token_iter.tolist() == [0]
    assert alone.last_token_iter.tolist() == [2]


def test_forecast_refuses_a_request_that_can_never_start() -> None:
    state = InstanceState.idle(kv_block_tokens=16, kv_blocks_total=4, max_batch=8,
                               max_batched_tokens=512)
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        project(state, candidate=Candidate(prompt_tokens=64, predicted_tokens=1,
                                           upper_tokens=1))


def test_forecast_flags_kv_overflow() -> None:
    one = np.array([30], dtype=np.int64)
    state = InstanceState(
        running_prompt_tokens=one, running_generated_tokens=np.array([2]),
        running_predicted_tokens=np.array([40.0]), running_upper_tokens=np.array([40.0]),
        queued_prompt_tokens=np.zeros(0, np.int64), queued_predicted_tokens=np.zeros(0),
        queued_upper_tokens=np.zeros(0), kv_block_tokens=16, kv_blocks_total=3,
        max_batch=4, max_batched_tokens=64)
    # ctx 32 + k at pass k: 3 blocks from ctx 33, 4 (> 3) from ctx 49, i.e. pass 17.
    assert project(state).kv_overflow_iter == 49 - 32


def test_engine_state_shape_checks() -> None:
    with pytest.raises(ValueError, match="running"):
        InstanceState(np.zeros(2, np.int64), np.zeros(1, np.int64), np.zeros(2), np.zeros(2),
                      np.zeros(0, np.int64), np.zeros(0), np.zeros(0), kv_block_tokens=16,
                      kv_blocks_total=1, max_batch=1, max_batched_tokens=1)


# --------------------------------------------------------------------------- SLO check


def reference_slo(ref: RefProjection, times_s: list[float], *, slo: RequestSlo,
                  classes_prompts: list[tuple[SloClass, int]],
                  generated: list[int]) -> list[tuple[float, float, float, float, bool]]:
    """Per request: (ttft_ms or nan, mean tbt ms, max remaining gap ms, e2e ms, meets SLOs),
    token by token, applying SloClass directly."""
    ends = list(np.cumsum(times_s))
    rows = []
    for i, (cls, prompt) in enumerate(classes_prompts):
        tokens = [ends[k] for k in range(ref.first[i], ref.last[i] + 1)]
        g = generated[i]
        n = g + len(tokens)
        arrival = slo.arrival_s[i] - NOW_S
        if g == 0:
            first = tokens[0]
            ttft = (first - arrival) * 1e3
            gaps = np.diff(tokens)
        else:
            first = slo.first_token_s[i] - NOW_S
            ttft = math.nan
            gaps = np.diff([slo.last_token_s[i] - NOW_S, *tokens])
        mean_tbt = (tokens[-1] - first) / (n - 1) * 1e3 if n > 1 else 0.0
        e2e = (tokens[-1] - arrival) * 1e3
        ok = (mean_tbt <= cls.tbt_ms + 1e-9 and e2e <= cls.e2e_bound_ms(prompt, n) + 1e-9
              and (g > 0 or ttft <= cls.ttft_bound_ms(prompt) + 1e-9))
        rows.append((ttft, mean_tbt, float(max(gaps, default=0.0)) * 1e3, e2e, ok))
    return rows


@PROPS
@given(data=st.data(), state=instance_states(max_running=12, max_queued=4),
       candidate=st.none() | candidates, clock=st.sampled_from(H100_CLOCKS.mhz))
def test_slo_check_agrees_with_a_per_token_loop(data: st.DataObject, state: InstanceState,
                                                candidate: Candidate | None,
                                                clock: int) -> None:
    p = project(state, candidate=candidate)
    m = p.n_requests
    prompts = np.concatenate((state.running_prompt_tokens, state.queued_prompt_tokens,
                              [candidate.prompt_tokens] if candidate else [])).astype(int)
    classes = data.draw(st.lists(slo_classes, min_size=m, max_size=m))
    base = data.draw(request_slos(state, p, candidate))
    slo = RequestSlo.from_classes(classes, prompt_tokens=prompts, arrival_s=base.arrival_s,
                                  first_token_s=base.first_token_s,
                                  last_token_s=base.last_token_s)
    rep = check(p, AFFINE, [clock], slo, now_s=NOW_S)
    ref = reference_projection(state, candidate=candidate)
    times = [float(AFFINE.iteration_time_s(np.array(b), np.array(kv), np.array(pf),
                                           np.array(clock)))
             for b, kv, pf in zip(ref.decode_batch, ref.kv_tokens, ref.prefill_tokens,
                                  strict=True)]
    rows = reference_slo(ref, times, slo=slo,
                         classes_prompts=list(zip(classes, prompts.tolist(), strict=True)),
                         generated=p.generated_tokens.tolist())
    for i, (ttft, tbt, gap, e2e, ok) in enumerate(rows):
        assert rep.ttft_ms[i, 0] == pytest.approx(ttft, rel=1e-9, abs=1e-6, nan_ok=True)
        assert rep.tbt_mean_ms[i, 0] == pytest.approx(tbt, rel=1e-9, abs=1e-6)
        assert rep.tbt_max_ms[i, 0] == pytest.approx(gap, rel=1e-9, abs=1e-6)
        assert rep.e2e_ms[i, 0] == pytest.approx(e2e, rel=1e-9, abs=1e-6)
        if abs(rep.slack_ms[i, 0]) > 1e-6:  # away from float ties
            assert (not rep.miss[i, 0]) == ok
    assert bool(rep.feasible[0]) == (not rep.miss[:, 0].any())


@PROPS
@given(data=st.data(), state=instance_states(), candidate=st.none() | candidates)
def test_fast_feasibility_equals_the_full_report(data: st.DataObject, state: InstanceState,
                                                 candidate: Candidate | None) -> None:
    p = project(state, candidate=candidate)
    slo = data.draw(request_slos(state, p, candidate))
    must = np.array(data.draw(st.lists(st.booleans(), min_size=p.n_requests,
                                       max_size=p.n_requests)), dtype=np.bool_)
    problem = prepare(p, slo, now_s=NOW_S, must_meet=must)
    rep = check(p, AFFINE, H100_CLOCKS.as_f64, slo, now_s=NOW_S, must_meet=must)
    fast = feasible(problem, AFFINE, H100_CLOCKS.as_f64)
    assert fast.tolist() == rep.feasible.tolist()
    assert rep.feasible.tolist() == (~(rep.miss & must[:, None]).any(axis=0)).tolist()


@given(cls=slo_classes, prompt=st.integers(1, 100_000), gen=st.integers(0, 10_000))
def test_e2e_bound_is_the_slo_class_formula(cls: SloClass, prompt: int, gen: int) -> None:
    got = e2e_bound_ms(cls.ttft_bound_ms(prompt), cls.tbt_ms, gen)
    assert float(got) == pytest.approx(cls.e2e_bound_ms(prompt, gen), rel=1e-12)


def test_slo_check_on_a_hand_computed_case() -> None:
    """One running request, 3 passes of 10 ms; it got its first token 1 s ago after 5 tokens."""
    state = InstanceState(
        running_prompt_tokens=np.array([100]), running_generated_tokens=np.array([5]),
        running_predicted_tokens=np.array([8.0]), running_upper_tokens=np.array([8.0]),
        queued_prompt_tokens=np.zeros(0, np.int64), queued_predicted_tokens=np.zeros(0),
        queued_upper_tokens=np.zeros(0), kv_block_tokens=16, kv_blocks_total=100,
        max_batch=4, max_batched_tokens=64)
    flat = FunctionPerfModel(lambda b, kv, pf, c: 0.01 * np.ones(np.broadcast(b, c).shape))
    slo = RequestSlo.from_classes([SloClass(name="s", tbt_ms=150.0)], prompt_tokens=[100],
                                  arrival_s=[NOW_S - 1.5], first_token_s=[NOW_S - 1.0],
                                  last_token_s=[NOW_S - 0.2])
    rep = check(project(state), flat, [1000], slo, now_s=NOW_S)
    # tokens at +10, +20, +30 ms; 7 gaps over 1.03 s
    assert rep.tbt_mean_ms[0, 0] == pytest.approx(1030 / 7)
    assert rep.tbt_max_ms[0, 0] == pytest.approx(210.0)
    assert rep.e2e_ms[0, 0] == pytest.approx(1530.0)
    assert math.isnan(rep.ttft_ms[0, 0])
    # binding SLO: mean TBT, deadline 1.0 s + 7·150 ms = 1.05 s after first token → 20 ms slack
    assert rep.slack_ms[0, 0] == pytest.approx(20.0)
    assert rep.feasible.tolist() == [True]


# --------------------------------------------------------------------------- clock search


def brute_force_lowest(p: Projection, slo: RequestSlo, perf: Any,
                       must: Any = None) -> tuple[int | None, Any]:
    rep = check(p, perf, H100_CLOCKS.as_f64, slo, now_s=NOW_S, must_meet=must)
    ok = rep.feasible
    return (int(np.argmax(ok)) if ok.any() else None), ok


def _stepped(b: Any, kv: Any, pf: Any, c: Any) -> Any:
    """Monotone in the clock but far from a + b/f: steps make the secant predictions miss,
    so the search has to fall back on its bracket logic."""
    c = np.asarray(c)
    return AFFINE.iteration_time_s(b, kv, pf, c) * (1.0 + 0.8 * (c < 900) + 1.5 * (c < 500))


STEPPED = FunctionPerfModel(_stepped, name="stepped")


@PROPS
@given(data=st.data(), state=instance_states(), candidate=st.none() | candidates,
       strategy=st.sampled_from(["auto", "secant", "kary", "binary", "scan"]),
       fanout=st.integers(1, 40), stepped=st.booleans(),
       hint_mhz=st.none() | st.integers(300, 2100))
def test_search_finds_the_lowest_feasible_clock(data: st.DataObject, state: InstanceState, *,
                                                candidate: Candidate | None, strategy: Any,
                                                fanout: int, stepped: bool,
                                                hint_mhz: int | None) -> None:
    perf = STEPPED if stepped else AFFINE
    assert is_monotone_in_clock(perf, H100_CLOCKS.mhz)
    p = project(state, candidate=candidate)
    slo = data.draw(request_slos(state, p, candidate))
    lowest, ok = brute_force_lowest(p, slo, perf)
    got = min_feasible_clock(p, perf, H100_CLOCKS, slo, now_s=NOW_S, strategy=strategy,
                             fanout=fanout, with_report=True, hint_mhz=hint_mhz)
    if lowest is None:
        assert isinstance(got, NoFeasibleClock)
        assert got.top_clock_mhz == H100_CLOCKS.mhz[-1]
        assert got.report.missing_requests().size > 0
        return
    assert isinstance(got, FeasibleClock)
    assert got.index == lowest
    assert got.clock_mhz == H100_CLOCKS.mhz[lowest]
    # monotone model: a clock that meets the SLOs is never rejected
    assert ok[lowest:].all()
    assert got.report is not None
    assert got.report.feasible.tolist() == [True]


def test_secant_search_needs_few_probes_with_an_exact_model() -> None:
    """For a + b/f models the secant prediction is exact: bottom + top, then 2 probes."""
    state = InstanceState(
        running_prompt_tokens=np.full(64, 900), running_generated_tokens=np.arange(1, 65),
        running_predicted_tokens=np.full(64, 300.0), running_upper_tokens=np.full(64, 400.0),
        queued_prompt_tokens=np.zeros(0, np.int64), queued_predicted_tokens=np.zeros(0),
        queued_upper_tokens=np.zeros(0), kv_block_tokens=16, kv_blocks_total=10_000,
        max_batch=128, max_batched_tokens=8192)
    first = NOW_S - 0.014 * np.arange(64)
    slo = RequestSlo.from_classes([SloClass(name="s", tbt_ms=15.0)] * 64,
                                  prompt_tokens=np.full(64, 900), arrival_s=first - 0.3,
                                  first_token_s=first, last_token_s=np.full(64, NOW_S))
    p = project(state)
    got = min_feasible_clock(p, AFFINE, H100_CLOCKS, slo, now_s=NOW_S, strategy="secant")
    lowest, _ = brute_force_lowest(p, slo, AFFINE)
    assert lowest is not None
    assert 0 < lowest < len(H100_CLOCKS) - 1
    assert isinstance(got, FeasibleClock)
    assert got.index == lowest
    assert got.clocks_evaluated == 4


@PROPS
@given(data=st.data(), state=instance_states(max_queued=3), candidate=candidates,
       floor_i=st.integers(0, 60), span=st.integers(0, 49))
def test_an_extra_request_never_lowers_the_clock(data: st.DataObject, state: InstanceState,
                                                 candidate: Candidate, floor_i: int,
                                                 span: int) -> None:
    """The candidate joins the end of the FCFS queue: nobody is admitted later because of
    it, every pass only gets heavier, so the feasible clocks can only shrink."""
    with_c = project(state, candidate=candidate)
    without = project(state)
    slo_c = data.draw(request_slos(state, with_c, candidate))
    m = without.n_requests
    slo = RequestSlo(*(getattr(slo_c, f)[:m] for f in RequestSlo.__slots__))
    floor, ceiling = H100_CLOCKS.mhz[floor_i], H100_CLOCKS.mhz[floor_i + span]
    base = min_feasible_clock(without, AFFINE, H100_CLOCKS, slo, now_s=NOW_S,
                              floor_mhz=floor, ceiling_mhz=ceiling)
    more = min_feasible_clock(with_c, AFFINE, H100_CLOCKS, slo_c, now_s=NOW_S,
                              floor_mhz=floor, ceiling_mhz=ceiling)
    if isinstance(base, NoFeasibleClock):
        assert isinstance(more, NoFeasibleClock)
    elif isinstance(more, FeasibleClock):
        assert more.clock_mhz >= base.clock_mhz
        assert floor <= base.clock_mhz <= more.clock_mhz <= ceiling


@PROPS
@given(data=st.data(), state=instance_states(max_queued=0), extra=st.floats(0.5, 200.0),
       which=st.integers(0, 10_000))
def test_a_longer_prediction_never_lowers_the_clock_the_others_need(
        data: st.DataObject, state: InstanceState, extra: float, which: int) -> None:
    """With nothing queued behind it, a request predicted to run longer only adds load to
    later passes, so the others' SLOs need at least the same clock. (Its own bounds grow
    with its length, see the next test.)"""
    assume(state.n_running > 0)
    i = which % state.n_running
    longer = replace(state, running_predicted_tokens=state.running_predicted_tokens
                     + np.eye(1, state.n_running, i)[0] * extra)
    p0, p1 = project(state), project(longer)
    slo = data.draw(request_slos(state, p0, None))
    others = np.ones(state.n_running, dtype=np.bool_)
    others[i] = False
    base = min_feasible_clock(p0, AFFINE, H100_CLOCKS, slo, now_s=NOW_S, must_meet=others)
    more = min_feasible_clock(p1, AFFINE, H100_CLOCKS, slo, now_s=NOW_S, must_meet=others)
    if isinstance(base, NoFeasibleClock):
        assert isinstance(more, NoFeasibleClock)
    elif isinstance(more, FeasibleClock):
        assert more.clock_mhz >= base.clock_mhz


def test_a_longer_prediction_can_loosen_the_requests_own_mean_tbt() -> None:
    """Why the previous property excludes the lengthened request: SLO bounds scale with the
    length (E2E and mean TBT allow tbt_ms per token), so extra tokens faster than tbt_ms
    make its own check easier. Documented behaviour, not a bug."""
    def state(pred: float) -> InstanceState:
        return InstanceState(
            running_prompt_tokens=np.array([100]), running_generated_tokens=np.array([10]),
            running_predicted_tokens=np.array([pred]), running_upper_tokens=np.array([pred]),
            queued_prompt_tokens=np.zeros(0, np.int64), queued_predicted_tokens=np.zeros(0),
            queued_upper_tokens=np.zeros(0), kv_block_tokens=16, kv_blocks_total=1000,
            max_batch=4, max_batched_tokens=64)
    slo = RequestSlo.from_classes([SloClass(name="s", tbt_ms=30.0)], prompt_tokens=[100],
                                  arrival_s=[NOW_S - 1.0], first_token_s=[NOW_S - 0.5],
                                  last_token_s=[NOW_S - 0.01])
    # 9 gaps in 0.5 s so far (55 ms each): 2 more tokens cannot pull the mean under 30 ms,
    # 190 more tokens of ~7 ms can, even at the lowest clock.
    short = min_feasible_clock(project(state(12)), AFFINE, H100_CLOCKS, slo, now_s=NOW_S)
    long = min_feasible_clock(project(state(200)), AFFINE, H100_CLOCKS, slo, now_s=NOW_S)
    assert isinstance(short, NoFeasibleClock)
    assert isinstance(long, FeasibleClock)
    assert long.clock_mhz == 345


def test_no_feasible_clock_says_who_misses() -> None:
    """A queued request whose TTFT deadline passed before it could start."""
    state = InstanceState.idle(kv_block_tokens=16, kv_blocks_total=1000, max_batch=4,
                               max_batched_tokens=512)
    cand = Candidate(prompt_tokens=100, predicted_tokens=20, upper_tokens=30)
    slo = RequestSlo.for_request(SloClass(name="s", ttft_base_ms=100.0,
                                          ttft_ms_per_prompt_token=0.0),
                                 prompt_tokens=100, arrival_s=NOW_S - 0.2)
    got = min_feasible_clock(project(state, candidate=cand), AFFINE, H100_CLOCKS, slo,
                             now_s=NOW_S)
    assert isinstance(got, NoFeasibleClock)
    assert got.top_clock_mhz == 1980
    assert got.report.missing_requests().tolist() == [0]
    assert got.report.slack_ms[0, 0] < -100.0
    # … and the others still decide alone when the caller excludes it
    ok = min_feasible_clock(project(state, candidate=cand), AFFINE, H100_CLOCKS, slo,
                            now_s=NOW_S, must_meet=np.array([False]))
    assert isinstance(ok, FeasibleClock)
    assert ok.clock_mhz == 345


def test_out_of_range_clocks_are_refused() -> None:
    state = InstanceState.idle(kv_block_tokens=16, kv_blocks_total=10, max_batch=1,
                               max_batched_tokens=1)
    p = project(state)
    slo = RequestSlo.from_classes([], prompt_tokens=[], arrival_s=[])
    with pytest.raises(ClockOutOfRangeError, match="347 MHz"):
        min_feasible_clock(p, AFFINE, H100_CLOCKS, slo, now_s=0.0, floor_mhz=347)
    with pytest.raises(ClockOutOfRangeError):
        min_feasible_clock(p, AFFINE, H100_CLOCKS, slo, now_s=0.0, ceiling_mhz=2000)
    with pytest.raises(ClockOutOfRangeError, match="above the ceiling"):
        min_feasible_clock(p, AFFINE, H100_CLOCKS, slo, now_s=0.0, floor_mhz=1500,
                           ceiling_mhz=1200)
    with pytest.raises(ConfigError):
        SupportedClocks((300, 300))
    got = min_feasible_clock(p, AFFINE, H100_CLOCKS, slo, now_s=0.0, floor_mhz=900)
    assert isinstance(got, FeasibleClock)
    assert got.clock_mhz == 900  # nothing to serve: the floor


def _wavy(b: Any, kv: Any, pf: Any, c: Any) -> Any:
    """Not monotone in the clock: a 'sweet spot' model."""
    return AFFINE.iteration_time_s(b, kv, pf, c) * (1.0 + 0.4 * np.sin(np.asarray(c) / 90.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), state=instance_states(), candidate=st.none() | candidates)
def test_non_monotone_model_gets_the_full_scan(data: st.DataObject, state: InstanceState,
                                               candidate: Candidate | None) -> None:
    wavy = FunctionPerfModel(_wavy)
    assert not is_monotone_in_clock(wavy, H100_CLOCKS.mhz)
    assert is_monotone_in_clock(AFFINE, H100_CLOCKS.mhz)
    p = project(state, candidate=candidate)
    slo = data.draw(request_slos(state, p, candidate))
    lowest, _ = brute_force_lowest(p, slo, wavy)
    got = min_feasible_clock(p, wavy, H100_CLOCKS, slo, now_s=NOW_S)
    assert got.strategy == "scan"
    if lowest is None:
        assert isinstance(got, NoFeasibleClock)
    else:
        assert isinstance(got, FeasibleClock)
        assert got.index == lowest


# --------------------------------------------------------------------------- hysteresis


@given(prev_i=st.integers(0, 109), new_i=st.integers(0, 109), since=st.floats(0.0, 10.0),
       dwell=st.floats(0.0, 5.0), margin=st.integers(1, 10))
def test_hysteresis_raises_at_once_and_lowers_only_after_dwell_and_margin(
        prev_i: int, new_i: int, since: float, dwell: float, margin: int) -> None:
    prev, new = H100_CLOCKS.mhz[prev_i], H100_CLOCKS.mhz[new_i]
    now = 50.0 + since
    since = now - 50.0  # what the function sees, rounding included
    step = next_clock(prev, 50.0, new, now, min_dwell_s=dwell,
                      down_margin_steps=margin, clocks=H100_CLOCKS)
    if new > prev:
        assert step.clock_mhz == new
        assert step.changed_s == now
        assert step.reason == "raise"
    elif new == prev:
        assert (step.clock_mhz, step.changed_s) == (prev, 50.0)
    elif since < dwell or prev_i - new_i < margin:
        assert (step.clock_mhz, step.changed_s) == (prev, 50.0)  # never lowers early
        assert step.reason in {"dwell", "margin"}
    else:
        assert (step.clock_mhz, step.changed_s, step.reason) == (new, now, "lower")


def test_hysteresis_does_not_flap_on_an_oscillating_proposal() -> None:
    clock, changed = 1200, 0.0
    history = []
    for k in range(200):
        proposal = 1200 - 15 * (k % 2)  # one step down, back up, …
        clock, changed, _ = next_clock(clock, changed, proposal, k * 0.1, min_dwell_s=1.0,
                                       down_margin_steps=2, clocks=H100_CLOCKS.mhz)
        history.append(clock)
    assert set(history) == {1200}


def test_hysteresis_refuses_unsupported_clocks() -> None:
    with pytest.raises(ClockOutOfRangeError):
        next_clock(1200, 0.0, 1201, 1.0, min_dwell_s=1.0, down_margin_steps=1,
                   clocks=H100_CLOCKS)
    with pytest.raises(ClockOutOfRangeError):
        next_clock(100, 0.0, 1200, 1.0, min_dwell_s=1.0, down_margin_steps=1,
                   clocks=H100_CLOCKS)
    with pytest.raises(ConfigError):
        next_clock(1200, 0.0, 1200, 1.0, min_dwell_s=1.0, down_margin_steps=0,
                   clocks=H100_CLOCKS)


# --------------------------------------------------------------------------- with the twin


def _twin() -> tuple[Any, Any]:
    clockmodel = pytest.importorskip("throttllem._twin.clockmodel")
    profile_mod = pytest.importorskip("throttllem._twin.profile")
    return clockmodel, profile_mod.load_profile("h100-llama3-8b-tp1")


def twin_perf_model() -> tuple[FunctionPerfModel, SupportedClocks, Any]:
    """The twin's clock model as a PerfModel (the core never imports the twin)."""
    clockmodel, profile = _twin()

    def fn(b: Any, kv: Any, pf: Any, c: Any) -> Any:
        return clockmodel.iteration_time_s(profile, batch=b, kv_tokens=kv, prefill_tokens=pf,
                                           clock_mhz=c)

    return (FunctionPerfModel(fn, name="twin"),
            SupportedClocks(profile.gpu.supported_clocks_mhz), profile)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), state=instance_states(), candidate=st.none() | candidates)
def test_search_with_the_twin_clock_model(data: st.DataObject, state: InstanceState,
                                          candidate: Candidate | None) -> None:
    perf, clocks, _ = twin_perf_model()
    assert is_monotone_in_clock(perf, clocks.mhz)
    p = project(state, candidate=candidate)
    slo = data.draw(request_slos(state, p, candidate))
    rep = check(p, perf, clocks.as_f64, slo, now_s=NOW_S)
    problem = prepare(p, slo, now_s=NOW_S)
    for strategy in ("auto", "secant", "kary", "binary"):
        got = search_clock(problem, perf, clocks, strategy=strategy)
        if not rep.feasible.any():
            assert isinstance(got, NoFeasibleClock)
        else:
            assert isinstance(got, FeasibleClock)
            assert got.index == int(np.argmax(rep.feasible))
            assert rep.feasible[got.index:].all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), warmup=st.integers(0, 40))
def test_forecast_matches_the_engine_twin(seed: int, warmup: int) -> None:
    """Run the engine twin a while, read its state, project with the true lengths as the
    prediction, then let the twin run to the end: every pass's batch, KV blocks and prefill
    must be what the projection said (unless it projected a KV overflow: then the twin
    preempts, which the projection does not model)."""
    _, profile = _twin()
    engine_mod = pytest.importorskip("throttllem._twin.engine")
    gpu_mod = pytest.importorskip("throttllem._twin.gpu")
    rng = np.random.default_rng(seed)
    small = profile.with_overrides({"engine.kv_blocks": int(rng.integers(40, 200)),
                                    "engine.max_batch": int(rng.integers(1, 12)),
                                    "engine.max_batched_tokens": int(rng.integers(64, 600))})
    engine = engine_mod.EngineTwin(small, "i0", gpu_mod.GpuTwin(small))
    block = small.engine.block_tokens
    targets: dict[str, int] = {}
    for j in range(int(rng.integers(1, 30))):
        prompt = int(rng.integers(1, 200))
        out = int(rng.integers(1, 60))
        if -(-(prompt + out) // block) > small.engine.kv_blocks:
            continue
        targets[f"r{j}"] = out
        engine.admit(RequestArrived(id=f"r{j}", arrival_s=0.0, prompt_tokens=prompt,
                                    true_output_tokens=out), 0.0)
    for _ in range(warmup):
        engine.step(engine.now_s)
    assume(engine.preemptions_total == 0)

    run, queued = engine.running(), engine.queued()
    r_pred = np.array([targets[r.id] for r in run], dtype=np.float64)
    q_pred = np.array([targets[r.id] for r in queued], dtype=np.float64)
    state = InstanceState(
        running_prompt_tokens=np.array([r.prompt_tokens for r in run], dtype=np.int64),
        running_generated_tokens=np.array([r.generated_tokens for r in run], dtype=np.int64),
        running_predicted_tokens=r_pred, running_upper_tokens=r_pred,
        queued_prompt_tokens=np.array([r.prompt_tokens for r in queued], dtype=np.int64),
        queued_predicted_tokens=q_pred, queued_upper_tokens=q_pred,
        queued_generated_tokens=np.array([r.generated_tokens for r in queued], np.int64),
        kv_block_tokens=block, kv_blocks_total=small.engine.kv_blocks,
        max_batch=small.engine.max_batch, max_batched_tokens=small.engine.max_batched_tokens,
        kv_watermark_blocks=int(small.engine.kv_watermark * small.engine.kv_blocks))
    p = project(state)
    passes = []
    while engine.has_work():
        out = engine.step(engine.now_s)
        assert out is not None
        passes.append(out.iteration)
    if p.kv_overflow_iter >= 0:
        return
    assert engine.preemptions_total == 0
    assert [it.batch_size for it in passes] == p.batch_size.tolist()
    assert [it.decode_tokens for it in passes] == p.decode_batch.tolist()
    assert [it.kv_blocks_used for it in passes] == p.kv_blocks.tolist()
    assert [it.prefill_tokens for it in passes] == p.prefill_tokens.tolist()



# --------------------------------------------------------------------------- the ONNX grid


class _NoOnnx:
    """Stands in for ONNX Runtime's session: the grid must answer every query itself."""

    def run(self, *_: object) -> None:
        raise AssertionError("ONNX Runtime was called during a clock search")


@pytest.fixture(scope="module")
def grid_model() -> FunctionPerfModel:
    """The shipped performance model compiled to its grid (what the forecaster uses), with
    ONNX Runtime taken away after the compile."""
    runtime = pytest.importorskip("throttllem._perf.runtime")
    rt = runtime.PerfRuntime.load("h100-llama3-8b-tp1")
    rt._session = _NoOnnx()
    return FunctionPerfModel(rt.iteration_time_s, name="onnx-grid")


def _big_state(rng: np.random.Generator, n: int, queued: int) -> tuple[InstanceState,
                                                                      Candidate]:
    """Azure-conversation-like running requests (as benchmarks/bench_controller.py), on an
    engine larger than the model's setup: batch past 256, KV past the H100's capacity."""
    r_prompt = np.clip(rng.lognormal(np.log(1000), 0.8, n), 16, 8000).astype(np.int64)
    r_pred = np.clip(rng.lognormal(np.log(200), 1.0, n), 1, 2048)
    q_prompt = np.clip(rng.lognormal(np.log(1000), 0.8, queued), 16, 8000).astype(np.int64)
    q_pred = np.clip(rng.lognormal(np.log(200), 1.0, queued), 1, 2048)
    peak = int((r_prompt + 1.6 * r_pred).sum() + (q_prompt + 1.6 * q_pred).sum())
    state = InstanceState(
        running_prompt_tokens=r_prompt,
        running_generated_tokens=np.maximum(1, (rng.random(n) * r_pred).astype(np.int64)),
        running_predicted_tokens=r_pred, running_upper_tokens=1.6 * r_pred,
        queued_prompt_tokens=q_prompt, queued_predicted_tokens=q_pred,
        queued_upper_tokens=1.6 * q_pred, kv_block_tokens=16,
        kv_blocks_total=peak // 16 + 4096, max_batch=n + queued + 1,
        max_batched_tokens=16384, kv_watermark_blocks=64)
    pred = float(np.clip(rng.lognormal(np.log(200), 1.0), 1, 2048))
    return state, Candidate(int(rng.integers(16, 8000)), pred, 1.6 * pred)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), state=instance_states(), candidate=st.none() | candidates)
def test_search_with_the_onnx_grid(data: st.DataObject, state: InstanceState,
                                   candidate: Candidate | None,
                                   grid_model: FunctionPerfModel) -> None:
    assert is_monotone_in_clock(grid_model, H100_CLOCKS.mhz)
    p = project(state, candidate=candidate)
    slo = data.draw(request_slos(state, p, candidate))
    lowest, ok = brute_force_lowest(p, slo, grid_model)
    problem = prepare(p, slo, now_s=NOW_S)
    for strategy in ("auto", "secant", "kary", "binary", "scan"):
        got = search_clock(problem, grid_model, H100_CLOCKS, strategy=strategy)
        if lowest is None:
            assert isinstance(got, NoFeasibleClock)
        else:
            assert isinstance(got, FeasibleClock)
            assert got.index == lowest
            assert ok[lowest:].all()


@pytest.mark.parametrize(("n", "seed"), [(300, 1), (600, 2), (1024, 3)])
def test_search_with_the_onnx_grid_beyond_its_edge(n: int, seed: int,
                                                   grid_model: FunctionPerfModel) -> None:
    """Projections that leave the grid (batch past 256, KV past 442,704 tokens, prefill past
    8,192): the grid extrapolates with the model's baseline, stays monotone in the clock,
    and every strategy finds the clock the full report says is the lowest feasible one."""
    rng = np.random.default_rng(seed)
    state, candidate = _big_state(rng, n, queued=4)
    p = project(state, candidate=candidate)
    assert p.decode_batch.max() > 256
    assert p.kv_tokens.max() > 442_704 or n == 300
    slo_class = SloClass(name="x", tbt_ms=130.0, ttft_base_ms=3000.0)
    m = p.n_requests
    gen = p.generated_tokens
    first = np.where(gen > 0, NOW_S - (gen - 1) * 0.6 * slo_class.tbt_ms / 1e3, np.nan)
    slo = RequestSlo.from_classes(
        [slo_class] * m,
        prompt_tokens=np.concatenate((state.running_prompt_tokens, state.queued_prompt_tokens,
                                      [candidate.prompt_tokens])),
        arrival_s=np.where(gen > 0, first - 0.2, NOW_S - 0.1), first_token_s=first,
        last_token_s=np.where(gen > 0, NOW_S - 0.01, np.nan))
    t = np.asarray(grid_model.iteration_time_s(p.decode_batch[None, :].astype(float),
                                               p.kv_tokens[None, :].astype(float),
                                               p.prefill_tokens[None, :].astype(float),
                                               H100_CLOCKS.as_f64[:, None]))
    assert np.all(np.isfinite(t))
    assert np.all(np.diff(t, axis=0) <= 0)  # (C, T): never slower at a higher clock
    lowest, ok = brute_force_lowest(p, slo, grid_model)
    assert lowest is not None
    assert ok[lowest:].all()
    assert 0 < lowest < len(H100_CLOCKS) - 1  # mid-range: the search has work to do
    problem = prepare(p, slo, now_s=NOW_S)
    for strategy in ("auto", "secant", "kary", "binary", "scan"):
        got = search_clock(problem, grid_model, H100_CLOCKS, strategy=strategy)
        assert isinstance(got, FeasibleClock), strategy
        assert got.index == lowest, strategy

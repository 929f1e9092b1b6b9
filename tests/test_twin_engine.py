"""The engine twin: inflight batching, KV paging and preemption, latencies, energy attribution."""

from __future__ import annotations

import time

import numpy as np
import pytest

from throttllem._errors import RequestRejectedError
from throttllem._events import (
    ENGINE_CODEC,
    EngineIteration,
    RequestArrived,
    RequestCompleted,
    encode,
)
from throttllem._twin import clockmodel as cm
from throttllem._twin.engine import EngineTwin
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import SetupProfile, load_profile


@pytest.fixture(scope="module")
def profile() -> SetupProfile:
    return load_profile("h100-llama3-8b-tp1")


def _req(i: int, prompt: int, out: int | None, arrival_s: float = 0.0,
         max_tokens: int = 4096) -> RequestArrived:
    return RequestArrived(id=f"r{i}", arrival_s=arrival_s, prompt_tokens=prompt,
                          max_tokens=max_tokens, true_output_tokens=out)


def _workload(n: int, seed: int, rate_per_s: float = 40.0) -> list[RequestArrived]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate_per_s, n))
    return [_req(i, int(rng.integers(1, 1500)), int(rng.integers(1, 300)), float(arrivals[i]))
            for i in range(n)]


def _drive(engine: EngineTwin, requests: list[RequestArrived]
           ) -> tuple[list[EngineIteration], list[RequestCompleted]]:
    """A minimal discrete-event loop: admit on arrival, step whenever the engine is free."""
    pending = sorted(requests, key=lambda r: r.arrival_s)
    iterations: list[EngineIteration] = []
    completed: list[RequestCompleted] = []
    now = 0.0
    i = 0
    for _ in range(1_000_000):
        while i < len(pending) and pending[i].arrival_s <= now:
            engine.admit(pending[i], admitted_s=pending[i].arrival_s)
            i += 1
        out = engine.step(now)
        if out is None:
            if i == len(pending):
                break
            now = pending[i].arrival_s
            continue
        iterations.append(out.iteration)
        completed.extend(out.completed)
        now = engine.now_s
    return iterations, completed


def test_every_request_completes_once_with_its_true_length(profile: SetupProfile) -> None:
    small = profile.with_overrides({"engine.kv_blocks": 400, "engine.max_batch": 32})
    engine = EngineTwin(small, "i0", GpuTwin(small))
    reqs = _workload(300, seed=1)
    iterations, completed = _drive(engine, reqs)
    assert sorted(c.id for c in completed) == sorted(r.id for r in reqs)
    truth = {r.id: r for r in reqs}
    for c in completed:
        assert c.generated_tokens == truth[c.id].true_output_tokens
        assert c.prompt_tokens == truth[c.id].prompt_tokens
        assert c.instance == "i0"
        assert c.arrival_s <= c.admitted_s <= c.first_token_s <= c.completed_s
    assert engine.preemptions_total > 0  # 400 blocks is tight: the twin had to preempt
    assert sum(c.preemptions for c in completed) == engine.preemptions_total
    assert not engine.has_work()
    assert engine.kv_blocks_used == 0
    # Every pass is internally consistent.
    for it in iterations:
        assert it.batch_size == len(it.request_ids) == len(it.request_tokens)
        assert sum(it.request_tokens) == it.decode_tokens + it.prefill_tokens
        assert it.batch_size <= 32
        assert it.kv_blocks_used <= it.kv_blocks_total == 400
    seqs = [it.seq for it in iterations]
    assert seqs == list(range(len(iterations)))
    starts = np.array([it.start_s for it in iterations])
    ends = starts + np.array([it.duration_ms for it in iterations]) / 1e3
    assert np.all(starts[1:] >= ends[:-1] - 1e-9)  # passes never overlap


def test_admission_is_first_come_first_served(profile: SetupProfile) -> None:
    engine = EngineTwin(profile, "i0", GpuTwin(profile))
    reqs = _workload(200, seed=2, rate_per_s=200.0)
    iterations, _ = _drive(engine, reqs)
    first_pass: dict[str, int] = {}
    for it in iterations:
        for rid in it.request_ids:
            first_pass.setdefault(rid, it.seq)
    order = [first_pass[r.id] for r in sorted(reqs, key=lambda r: r.arrival_s)]
    assert order == sorted(order)


def test_max_batch_and_token_budget_are_respected(profile: SetupProfile) -> None:
    p = profile.with_overrides({"engine.max_batch": 8, "engine.max_batched_tokens": 1024})
    engine = EngineTwin(p, "i0", GpuTwin(p))
    reqs = [_req(i, 300, 50) for i in range(40)] + [_req(99, 3000, 5)]  # one over-long prompt
    iterations, completed = _drive(engine, reqs)
    assert len(completed) == 41
    assert max(it.batch_size for it in iterations) == 8
    over_budget = [it for it in iterations if it.decode_tokens + it.prefill_tokens > 1024]
    # Over budget only when the over-long prompt is prefilled, and then alone.
    assert len(over_budget) == 1
    assert over_budget[0].batch_size - over_budget[0].decode_tokens == 1
    assert over_budget[0].prefill_tokens == 3000


def test_kv_capacity_forces_preemption_and_is_never_exceeded(profile: SetupProfile) -> None:
    # 40 blocks x 16 tokens; 4 requests of 100 + 200 tokens need 19 blocks each at the end.
    p = profile.with_overrides({"engine.kv_blocks": 40, "engine.kv_watermark": 0.0})
    engine = EngineTwin(p, "i0", GpuTwin(p))
    for i in range(4):
        engine.admit(_req(i, 100, 200), admitted_s=0.0)
    completed: list[RequestCompleted] = []
    passes = 0
    while engine.has_work():
        out = engine.step(engine.now_s)
        assert out is not None
        passes += 1
        assert out.iteration.kv_blocks_used <= 40
        assert engine.kv_blocks_used <= 40
        completed.extend(out.completed)
    assert engine.preemptions_total > 0
    assert sorted(c.id for c in completed) == ["r0", "r1", "r2", "r3"]
    assert all(c.generated_tokens == 200 for c in completed)
    preempted = [c for c in completed if c.preemptions]
    # The most recently admitted are preempted; the first one never is.
    assert next(c for c in completed if c.id == "r0").preemptions == 0
    for c in preempted:  # a preempted request waited: its worst token gap shows it
        assert c.tbt_max_ms > 2 * c.tbt_mean_ms


def test_latency_arithmetic_on_a_hand_checkable_case(profile: SetupProfile) -> None:
    engine = EngineTwin(profile, "i0", GpuTwin(profile))
    engine.admit(_req(0, 100, 3, arrival_s=-0.5), admitted_s=-0.2)
    outs = [engine.step(0.0), engine.step(0.0), engine.step(0.0)]
    assert engine.step(engine.now_s) is None
    d1 = float(cm.iteration_time_s(profile, batch=0, kv_tokens=0, prefill_tokens=100,
                                   prefill_attn_tokens2=100**2, clock_mhz=1980))
    d2 = float(cm.iteration_time_s(profile, batch=1, kv_tokens=101, prefill_tokens=0,
                                   clock_mhz=1980))
    d3 = float(cm.iteration_time_s(profile, batch=1, kv_tokens=102, prefill_tokens=0,
                                   clock_mhz=1980))
    durations = [o.iteration.duration_ms / 1e3 for o in outs if o is not None]
    assert durations == pytest.approx([d1, d2, d3], rel=1e-12)
    assert [o.iteration.prefill_tokens for o in outs if o] == [100, 0, 0]
    assert [o.iteration.decode_tokens for o in outs if o] == [0, 1, 1]
    assert [o.iteration.kv_blocks_used for o in outs if o] == [7, 7, 7]  # ceil(101/16) = 7
    last = outs[-1]
    assert last is not None
    (c,) = last.completed
    assert c.first_token_s == pytest.approx(d1)
    assert c.completed_s == pytest.approx(d1 + d2 + d3)
    assert c.ttft_ms == pytest.approx((0.5 + d1) * 1e3)
    assert c.tbt_mean_ms == pytest.approx((d2 + d3) / 2 * 1e3)
    assert c.tbt_max_ms == pytest.approx(max(d2, d3) * 1e3)
    assert c.e2e_ms == pytest.approx((0.5 + d1 + d2 + d3) * 1e3)
    assert c.admitted_s == -0.2
    assert c.generated_tokens == 3
    assert c.preemptions == 0
    energy = sum(o.iteration.energy_mj for o in outs if o)
    assert c.energy_mj == pytest.approx(energy)


def test_energy_attribution_sums_to_the_passes_energy(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile)
    engine = EngineTwin(profile, "i0", gpu)
    iterations, completed = _drive(engine, _workload(150, seed=3, rate_per_s=80.0))
    pass_mj = sum(it.energy_mj for it in iterations)
    assert sum(c.energy_mj or 0.0 for c in completed) == pytest.approx(pass_mj, rel=1e-9)
    # The counter also holds the idle energy between passes, which is not attributed.
    assert gpu.read(0).energy_mj >= pass_mj
    for it in iterations:
        assert it.energy_mj == pytest.approx(it.power_w * it.duration_ms)


def test_token_share_attribution_within_one_pass(profile: SetupProfile) -> None:
    engine = EngineTwin(profile, "i0", GpuTwin(profile))
    engine.admit(_req(0, 64, 3), admitted_s=0.0)
    first = engine.step(0.0)
    engine.admit(_req(1, 192, 1), admitted_s=engine.now_s)
    second = engine.step(engine.now_s)  # r0 decodes 1 token, r1 prefills 192 and finishes
    assert first is not None
    assert second is not None
    assert second.iteration.request_ids == ["r0", "r1"]
    assert second.iteration.request_tokens == [1, 192]
    (c1,) = second.completed
    assert c1.id == "r1"
    assert c1.energy_mj == pytest.approx(second.iteration.energy_mj * 192 / 193)


def test_lower_locked_clock_gives_longer_passes_and_less_power(profile: SetupProfile) -> None:
    def run(lock_mhz: int | None) -> tuple[float, float, float]:
        gpu = GpuTwin(profile)
        if lock_mhz is not None:
            gpu.set_locked_clocks(0, lock_mhz, lock_mhz)
        iterations, completed = _drive(EngineTwin(profile, "i0", gpu),
                                       _workload(120, seed=4, rate_per_s=60.0))
        assert len(completed) == 120
        decode_only = [it for it in iterations if it.prefill_tokens == 0]
        return (float(np.mean([it.duration_ms for it in decode_only])),
                float(np.mean([it.power_w for it in iterations])),
                sum(it.energy_mj for it in iterations))

    fast, slow = run(None), run(990)
    assert slow[0] > fast[0]
    assert slow[1] < fast[1]
    assert slow[2] < fast[2]  # decode-heavy serving: the lower clock saves energy


def test_idle_engine_returns_none_and_the_gpu_idles(profile: SetupProfile) -> None:
    gpu = GpuTwin(profile)
    engine = EngineTwin(profile, "i0", gpu)
    assert engine.step(5.0) is None
    assert engine.now_s == 5.0
    assert gpu.read(0).energy_mj == pytest.approx(profile.gpu.idle_power_w * 5.0 * 1e3)
    engine.admit(_req(0, 10, 1), admitted_s=7.0)  # not due yet at 6 s
    assert engine.step(6.0) is None
    out = engine.step(7.0)
    assert out is not None
    assert out.iteration.start_s == 7.0
    # A sampler idled the GPU ahead of the engine: the next pass cannot start before it.
    gpu.idle_until(20.0)
    engine.admit(_req(1, 10, 1), admitted_s=8.0)
    later = engine.step(8.0)
    assert later is not None
    assert later.iteration.start_s == 20.0


def test_admission_rejections_and_defaults(profile: SetupProfile) -> None:
    engine = EngineTwin(profile, "i0", GpuTwin(profile), default_output_tokens=5)
    engine.admit(_req(0, 10, None), admitted_s=0.0)
    with pytest.raises(RequestRejectedError, match="already in engine"):
        engine.admit(_req(0, 10, 3), admitted_s=0.0)
    with pytest.raises(RequestRejectedError, match="context window"):
        engine.admit(_req(1, 8192, 3), admitted_s=0.0)
    engine.admit(_req(2, 10, 50, max_tokens=4), admitted_s=0.0)  # capped at max_tokens
    engine.admit(_req(3, 8000, 1000), admitted_s=0.0)  # capped at the context window
    tiny = profile.with_overrides({"engine.kv_blocks": 4})
    with pytest.raises(RequestRejectedError, match="KV blocks"):
        EngineTwin(tiny, "i1", GpuTwin(tiny)).admit(_req(4, 60, 10), admitted_s=0.0)
    done: dict[str, int] = {}
    while engine.has_work():
        out = engine.step(engine.now_s)
        assert out is not None
        done.update({c.id: c.generated_tokens for c in out.completed})
    assert done == {"r0": 5, "r2": 4, "r3": 192}


def test_abort_forgets_a_queued_or_running_request_and_frees_its_kv(
        profile: SetupProfile) -> None:
    p = profile.with_overrides({"engine.max_batch": 2})
    engine = EngineTwin(p, "i0", GpuTwin(p))
    for i in range(4):
        engine.admit(_req(i, 100 + i, 30), admitted_s=0.0)
    first = engine.step(0.0)
    assert first is not None
    assert [r.id for r in engine.running()] == ["r0", "r1"]
    kv_before = engine.kv_blocks_used
    assert engine.abort("r0")  # running, in the first slot: the slot after it moves up
    assert engine.abort("r3")  # still queued
    assert not engine.abort("r3")  # already gone
    assert not engine.abort("never-admitted")
    assert [r.id for r in engine.running()] == ["r1"]
    assert [q.id for q in engine.queued()] == ["r2"]
    assert engine.kv_blocks_used < kv_before
    assert engine.running_prompt_tokens().tolist() == [101]
    seen: set[str] = set()
    done: dict[str, int] = {}
    while engine.has_work():
        out = engine.step(engine.now_s)
        assert out is not None
        seen.update(out.iteration.request_ids)
        done.update({c.id: c.generated_tokens for c in out.completed})
    assert done == {"r1": 30, "r2": 30}  # the survivors finish exactly as before
    assert seen == {"r1", "r2"}
    engine.admit(_req(0, 100, 3), admitted_s=engine.now_s)  # an aborted id may come again
    assert engine.has_work()


def test_state_views_and_event_round_trip(profile: SetupProfile) -> None:
    engine = EngineTwin(profile, "i0", GpuTwin(profile))
    for i in range(3):
        engine.admit(_req(i, 20 + i, 10), admitted_s=0.0)
    assert [q.id for q in engine.queued()] == ["r0", "r1", "r2"]
    out = engine.step(0.0)
    assert out is not None
    assert engine.queue_len == 0
    assert engine.running_count == 3
    assert [r.generated_tokens for r in engine.running()] == [1, 1, 1]
    assert engine.running_prompt_tokens().tolist() == [20, 21, 22]
    assert engine.running_generated_tokens().tolist() == [1, 1, 1]
    assert engine.kv_blocks_used == 3 * 2  # ceil(22/16) = 2 each
    assert ENGINE_CODEC.decode(encode(out.iteration)) == out.iteration


def test_tensor_parallel_engine_uses_every_gpu(profile: SetupProfile) -> None:
    tp2 = profile.with_overrides({"engine.tp_degree": 2})
    gpu = GpuTwin(tp2)
    assert gpu.gpu_count() == 2
    engine = EngineTwin(tp2, "i0", gpu)
    iterations, _ = _drive(engine, [_req(0, 100, 20)])
    e0, e1 = gpu.read(0).energy_mj, gpu.read(1).energy_mj
    assert e0 > 0
    assert e0 == pytest.approx(e1)
    assert sum(it.energy_mj for it in iterations) == pytest.approx(e0 + e1)


def test_step_cost_at_batch_64(profile: SetupProfile) -> None:
    """Speed matters: the evaluator runs an hour of trace through this."""
    engine = EngineTwin(profile, "i0", GpuTwin(profile))
    rng = np.random.default_rng(5)
    k = 0
    for _ in range(64):
        engine.admit(_req(k, int(rng.integers(50, 1500)), int(rng.integers(20, 400))), 0.0)
        k += 1
    steps = 0
    batch = 0
    t0 = time.perf_counter()
    while steps < 3000:
        out = engine.step(engine.now_s)
        assert out is not None
        steps += 1
        batch += out.iteration.batch_size
        for _ in out.completed:
            engine.admit(_req(k, int(rng.integers(50, 1500)), int(rng.integers(20, 400))),
                         engine.now_s)
            k += 1
    us = (time.perf_counter() - t0) / steps * 1e6
    print(f"\nengine twin: {us:.1f} us per step at mean batch {batch / steps:.1f}")
    assert batch / steps == pytest.approx(64, abs=1)
    assert us < 2000  # generous: a loaded CI box, not a benchmark

"""The real decode loop's CPU-testable parts (`throttllem._gpulab.loop`): buckets, KV
regions, pass plans, split-KV chunks, profile rows, the sweep, drift arithmetic, segment
tracking, and the engine twin's scheduler driving a fake pass timer (with the forecaster's
projection checked against what the loop did). The torch runner is checked on a tiny CPU
model when torch is installed (skipped otherwise)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from throttllem._events import RequestArrived
from throttllem._gpulab.loop import (
    DECODE_BUCKETS,
    FakePassRunner,
    LoopGpu,
    PassRecord,
    RegionAllocator,
    SegmentTracker,
    Snapshot,
    SweepShape,
    bucket_up,
    decode_splits,
    pass_errors,
    pass_row,
    pass_spec,
    plan_pass,
    profile_passes,
    projected_ends_s,
    record_row,
    request_drift_ms,
    serve,
    split_chunks,
    sweep_shapes,
    sweep_spec,
)
from throttllem._perf.table import read_table, write_table
from throttllem._twin.engine import EngineTwin
from throttllem._twin.profile import load_profile

KVB = 131072


def affine_ms(b: int, kv: int, p: int, a2: int = 0) -> float:
    """A pass timer that depends on the pass shape only (as the perf model sees it)."""
    return 6.0 + 0.02 * b + 3e-5 * kv + 0.02 * p


# --------------------------------------------------------------------------- pure parts


def test_bucket_up() -> None:
    assert bucket_up(1, DECODE_BUCKETS) == 1
    assert bucket_up(5, DECODE_BUCKETS) == 6
    assert bucket_up(256, DECODE_BUCKETS) == 256
    assert bucket_up(257, DECODE_BUCKETS) is None


def test_region_allocator_first_fit_and_merge() -> None:
    a = RegionAllocator(100)
    x, y, z = a.alloc(30), a.alloc(30), a.alloc(30)
    assert (x, y, z) == (0, 30, 60)
    with pytest.raises(MemoryError):
        a.alloc(20)
    a.free(y)
    assert a.alloc(10) == 30  # first fit into the hole
    a.free(30)
    a.free(x)
    a.free(z)
    assert a.used_tokens == 0
    assert a.alloc(100) == 0  # every range merged back


def test_plan_pass_rows_positions_and_padding() -> None:
    spec = pass_spec([3, 10], [100, 200], [7, 8], prefill_len=[2, 4],
                     prefill_start=[300, 400], prefill_slot=[9, 10])
    plan = plan_pass(spec, scratch_row=1000, scratch_slot=99, with_gather=True)
    # decode rows longest first: ctx 10 (region 200) then ctx 3 (region 100)
    assert plan.dec_slots.tolist() == [8, 7]
    assert plan.pos.tolist() == [9, 2, 0, 1, 0, 1, 2, 3]
    assert plan.write_idx.tolist() == [209, 102, 300, 301, 400, 401, 402, 403]
    assert plan.dec_cu_k.tolist() == [200, 100, 1000]
    assert plan.dec_used.tolist() == [10, 3]
    assert plan.dec_gather.tolist() == [*list(range(200, 210)), 100, 101, 102]
    assert plan.pre_cu.tolist() == [0, 2, 6]
    assert plan.out_rows.tolist() == [0, 1, 3, 7]  # decode rows, each prompt's last token
    assert plan.out_slots.tolist() == [8, 7, 9, 10]
    d = plan_pass(pass_spec([5], [50], [1]), scratch_row=1000, scratch_slot=99, pad_to=4)
    assert d.n_dec == 4
    assert d.n_real == 1
    assert d.write_idx.tolist() == [54, 1000, 1001, 1002]
    assert d.dec_used.tolist() == [5, 1, 1, 1]
    assert d.dec_slots.tolist() == [1, 99, 99, 99]
    with pytest.raises(ValueError, match="decode-only"):
        plan_pass(spec, scratch_row=1000, scratch_slot=99, pad_to=4)


def test_split_chunks_cover_each_row_once() -> None:
    starts = np.array([100, 500, 900])
    used = np.array([10, 1, 33])
    c_start, c_used, valid = split_chunks(starts, used, 4, scratch_row=7)
    assert c_start.size == 12
    for i, (s, u) in enumerate(zip(starts, used, strict=True)):
        rows = [r for k in range(4) if valid[4 * i + k]
                for r in range(c_start[4 * i + k], c_start[4 * i + k] + c_used[4 * i + k])]
        assert rows == list(range(s, s + u))
    assert (c_start[~valid] == 7).all()
    assert (c_used[~valid] == 1).all()
    assert decode_splits(1) == 16
    assert decode_splits(256) == 2
    assert all(b * decode_splits(b) <= 1024 for b in DECODE_BUCKETS)


def test_pass_row_and_record_row_round_trip(tmp_path: object) -> None:
    dec = pass_spec([100, 300], [0, 200], [1, 2])
    mixed = pass_spec([100], [0], [1], prefill_len=[50, 70], prefill_start=[500, 600],
                      prefill_slot=[3, 4])
    pre = pass_spec([], [], [], prefill_len=[40, 60], prefill_start=[500, 600],
                    prefill_slot=[3, 4])
    rows = [pass_row(s, times_ms=[5.0, 6.0, 7.0], clocks_mhz=[1980.0, 1965.0, 1980.0],
                     energy_mj=300.0, kv_bytes_per_token=KVB) for s in (dec, mixed, pre)]
    assert [r.phase for r in rows] == ["decode", "mixed", "prefill"]
    assert rows[0].iter_ms == 6.0
    assert rows[0].sm_clock_mhz == 1980.0
    assert rows[0].energy_j_per_iter == pytest.approx(0.1)
    rec = PassRecord(k=0, start_s=0.0, gpu_ms=8.0, wall_ms=9.0, batch=2, kv_tokens=400,
                     prefill_tokens=0, n_prefill=0, prefill_attn_tokens2=0, clock_mhz=1950.0,
                     energy_mj=4000.0, graphed=True, bucket=2, queue_len=0)
    rows.append(record_row(rec, kv_bytes_per_token=KVB))
    path = f"{tmp_path}/t.csv"
    write_table(path, rows)
    b, kv, p, f = read_table(path).features()
    assert b.tolist() == [2, 1, 0, 2]
    assert kv.tolist() == [400, 100, 0, 400]
    assert p.tolist() == [0, 120, 100, 0]
    assert f.tolist() == [1980, 1980, 1980, 1950]


def test_sweep_shapes_deterministic_and_within_limits() -> None:
    a = sweep_shapes(300, seed=3, kv_cap_tokens=50_000)
    assert a == sweep_shapes(300, seed=3, kv_cap_tokens=50_000)
    kinds = {("d" if s.decode_ctx else "") + ("p" if s.prefill_len else "") for s in a}
    assert kinds == {"d", "dp", "p"}
    for s in a:
        assert sum(s.decode_ctx) <= 50_000
        assert len(s.decode_ctx) <= 256
        assert all(1 <= c < 8192 for c in s.decode_ctx + s.prefill_len)
        if len(s.prefill_len) > 1:  # only the first prompt may exceed the budget
            assert sum(s.prefill_len[1:]) + len(s.decode_ctx) <= 8192
    spec = sweep_spec(SweepShape((5, 7), (3,)), np.random.default_rng(0), kv_cap_tokens=20,
                      token_slots=8)
    ranges = sorted(zip(np.concatenate((spec.decode_start, spec.prefill_start)).tolist(),
                        [5, 7, 3], strict=True))
    assert all(s + n <= t for (s, n), (t, _) in itertools_pairs(ranges))
    assert ranges[-1][0] + ranges[-1][1] <= 20
    assert len(set(np.concatenate((spec.decode_slot, spec.prefill_slot)).tolist())) == 3


def itertools_pairs(x: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    return list(itertools.pairwise(x))


def test_profile_passes_with_fake_timer() -> None:
    runner = FakePassRunner(affine_ms, kv_capacity_tokens=200_000)
    rows = profile_passes(runner, sweep_shapes(50, kv_cap_tokens=150_000),
                          kv_bytes_per_token=KVB, budget_s=30.0, reps=3)
    assert len(rows) == 50
    assert len(runner.specs) == 50 * 4  # one warm-up and three timed runs each
    for r in rows:
        b = 0 if r.phase == "prefill" else r.batch
        assert r.iter_ms == pytest.approx(affine_ms(b, r.kv_tokens, r.prefill_tokens))


# --------------------------------------------------------------------------- drift


def test_request_drift_on_synthetic_passes() -> None:
    meas = np.array([10.0, 10.0, 10.0, 10.0, 40.0, 10.0])
    pred = np.array([11.0, 9.0, 10.5, 10.0, 38.0, 10.0])
    segs = [[(0, 3)], [(2, 5)], [(0, 1), (4, 4)]]  # the last one was preempted once
    per, signed, n = request_drift_ms(pred, meas, segs)
    assert n.tolist() == [4, 4, 3]
    assert per.tolist() == pytest.approx([(1 + 1 + 0.5 + 0) / 4, (0.5 + 0 + 2 + 0) / 4,
                                          (1 + 1 + 2) / 3])
    assert signed.tolist() == pytest.approx([0.5 / 4, 1.5 / 4, 2 / 3])
    decode = np.array([True, True, True, True, False, True])
    per_d, _, n_d = request_drift_ms(pred, meas, segs, mask=decode)
    assert n_d.tolist() == [4, 3, 2]
    assert per_d.tolist() == pytest.approx([2.5 / 4, 0.5 / 3, 1.0])
    per_p, _, n_p = request_drift_ms(pred, meas, segs, mask=~decode)
    assert n_p.tolist() == [0, 1, 1]
    assert math.isnan(per_p[0])
    assert per_p[1] == 2.0
    e = pass_errors(pred, meas)
    assert e["mape_pct"] == pytest.approx(np.mean([10, 10, 5, 0, 5, 0]))
    assert e["bias_ms"] == pytest.approx(-1.5 / 6)


def test_segment_tracker() -> None:
    t = SegmentTracker()
    t.observe(0, ["a"])
    t.observe(1, ["a", "b"])
    t.observe(2, ["b"])  # a left after pass 1
    t.observe(3, ["a", "b"])  # a is back (re-admitted after preemption)
    assert t.finish() == {"a": [(0, 1), (3, 3)], "b": [(1, 3)]}


# --------------------------------------------------------------------------- the loop


def requests(n: int, seed: int = 0, gap_s: float = 0.004) -> list[RequestArrived]:
    rng = np.random.default_rng(seed)
    return [RequestArrived(id=f"q{i}", arrival_s=i * gap_s, prompt_tokens=int(p),
                           true_output_tokens=int(o))
            for i, (p, o) in enumerate(zip(rng.integers(5, 1500, n), rng.integers(1, 120, n),
                                           strict=True))]


def test_engine_view_for_pass_drivers_agrees_with_its_requests() -> None:
    """The public reads the loop drives the engine through (never its slots)."""
    profile = load_profile("h100-llama3-8b-tp1").with_overrides({"engine.max_batch": 2})
    gpu = LoopGpu(profile, FakePassRunner(affine_ms))
    engine = EngineTwin(profile, "i0", gpu)
    gpu.attach(engine)
    reqs = requests(5)
    for r in reqs:
        engine.admit(r, 0.0)
    assert [q.id for q in engine.queue_head(2)] == ["q0", "q1"]
    assert engine.queue_head(0) == ()
    gpu.before_step()
    engine.step(0.0)
    running = engine.running()
    assert engine.running_ids() == [r.id for r in running] == ["q0", "q1"]
    assert engine.running_context_tokens().tolist() == [
        r.prompt_tokens + r.generated_tokens for r in running]
    assert engine.running_target_tokens().tolist() == [
        r.true_output_tokens for r in reqs[:2]]
    head = engine.queue_head()
    assert [(q.id, q.prompt_tokens, q.generated_tokens) for q in head] == [
        (q.id, q.prompt_tokens, q.generated_tokens) for q in engine.queued()]
    assert [q.target_tokens for q in head] == [r.true_output_tokens for r in reqs[2:]]


def test_loop_serves_every_request_with_real_pass_shapes() -> None:
    profile = load_profile("h100-llama3-8b-tp1")
    runner = FakePassRunner(affine_ms)
    gpu = LoopGpu(profile, runner)
    engine = EngineTwin(profile, "i0", gpu)
    reqs = requests(120)
    res = serve(engine, gpu, reqs)
    assert len(res.completed) == 120
    assert not res.stopped_early
    assert gpu._regions.used_tokens == 0
    assert not gpu._held
    by_id = {c.id: c for c in res.completed}
    for r in reqs:
        (a, b), = res.segments[r.id]  # no preemption: one segment
        assert b - a + 1 == by_id[r.id].generated_tokens == r.true_output_tokens
    for rec, spec in zip(res.passes, runner.specs, strict=True):
        assert (rec.batch, rec.kv_tokens, rec.prefill_tokens) == (
            spec.batch, spec.kv_tokens, spec.prefill_tokens)
        assert rec.gpu_ms == affine_ms(spec.batch, spec.kv_tokens, spec.prefill_tokens)
    # engine time advanced by the measured pass times
    assert engine.now_s == pytest.approx(res.passes[-1].start_s + res.passes[-1].gpu_ms / 1e3)
    # every decode row's region holds its context: the pass wrote position c − 1
    for spec in runner.specs:
        assert (spec.decode_ctx >= 2).all()


def test_loop_with_preemption_reallocates_regions() -> None:
    profile = load_profile("h100-llama3-8b-tp1").with_overrides(
        {"engine.kv_blocks": 300, "engine.kv_watermark": 0.0})
    gpu = LoopGpu(profile, FakePassRunner(affine_ms))
    engine = EngineTwin(profile, "i0", gpu)
    reqs = [RequestArrived(id=f"q{i}", arrival_s=0.0, prompt_tokens=1000,
                           true_output_tokens=600) for i in range(5)]
    res = serve(engine, gpu, reqs)
    assert engine.preemptions_total > 0
    assert len(res.completed) == 5
    assert gpu._regions.used_tokens == 0
    assert any(len(s) > 1 for s in res.segments.values())
    for c in res.completed:  # every pass a request took part in emitted one of its tokens
        # re-prefill after preemption emits a token too: passes = tokens generated
        assert sum(b - a + 1 for a, b in res.segments[c.id]) == c.generated_tokens


def test_projection_matches_the_loop_when_no_one_arrives_later() -> None:
    """With true lengths and the pass timer as the performance model, `project` from a
    snapshot taken after the last arrival predicts the loop's end times exactly."""
    profile = load_profile("h100-llama3-8b-tp1")
    gpu = LoopGpu(profile, FakePassRunner(affine_ms))
    engine = EngineTwin(profile, "i0", gpu)
    reqs = requests(60, gap_s=0.01)
    last = reqs[-1].arrival_s
    res = serve(engine, gpu, reqs, snapshot_times_s=[last])
    assert len(res.snapshots) == 1
    snap = Snapshot.from_json(res.snapshots[0].to_json())
    assert snap.queued_ids  # the just-admitted request waits in the queue

    def time_s(b: np.ndarray, kv: np.ndarray, p: np.ndarray, a2: np.ndarray) -> np.ndarray:
        return np.asarray(affine_ms(b, kv, p, a2) / 1e3)  # type: ignore[arg-type]

    ids, ends, last_rel, proj = projected_ends_s(snap, profile, time_s)
    done = {c.id: c for c in res.completed}
    assert len(ids) == proj.n_requests
    for rid, end, lr in zip(ids, ends.tolist(), last_rel.tolist(), strict=True):
        assert end == pytest.approx(done[rid].completed_s, abs=1e-9)
        assert res.segments[rid][-1][1] - snap.next_pass == lr


# --------------------------------------------------------------------------- torch (CPU)


def test_torch_runner_cache_and_split_on_a_tiny_cpu_model() -> None:
    torch = pytest.importorskip("torch")
    from throttllem._gpulab.decoder import DecoderShape  # noqa: PLC0415
    from throttllem._gpulab.passes import TorchPassRunner  # noqa: PLC0415

    shape = DecoderShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128,
                         vocab=256)
    r = TorchPassRunner(torch, kv_capacity_tokens=20_000, shape=shape, device="cpu",
                        token_slots=64, graphs=False)
    ctx = [5, 300, 1000, 37, 4000, 1]
    starts = np.cumsum([0, *ctx[:-1]]) + 100
    assert r._attention_error(pass_spec(ctx, starts, np.arange(6)), "math", True) < 5e-3
    toks = [int(x) for x in np.random.default_rng(0).integers(0, 256, 50)]
    r.forward_tokens(toks, 12_000, 5)
    nxt = int(r.tok[5])
    ref = r.forward_tokens([*toks, nxt], 15_000, 6)
    for split, tol in ((False, 1e-6), (True, 2e-2)):
        r.split_decode = split
        r.tok[5] = nxt
        got = r.logits(pass_spec([51], [12_000], [5]))
        assert float((got - ref).norm() / ref.norm()) < tol
    r.tok[5] = nxt
    wrong = r.logits(pass_spec([50], [12_000], [5]))
    assert float((wrong - ref).norm() / ref.norm()) > 1e-2

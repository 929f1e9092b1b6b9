"""A real decode loop: the engine twin's scheduler driving real forward passes, and the
forecaster's drift measured on them.

`EngineTwin` (iteration-level inflight batching, FCFS admission, paged-KV accounting, prefill
inside the pass under the token budget, preemption) is reused unchanged: it is given a
`LoopGpu`, a `GpuTwin` whose `run_iteration` hands the pass to a `PassRunner` — on a GPU the
Llama-3-8B-shaped random-weight decoder of `throttllem._gpulab.passes`, in tests a fake timer —
and returns the *measured* duration, energy and SM clock. Engine time therefore advances by
measured pass times (idle gaps between arrivals are skipped over in event time; host work
between passes is logged, not added).

`run_iteration` only receives the pass's totals, so `LoopGpu` reads which requests take part
from the engine's public state: the decoding ones are its running requests
(`EngineTwin.running_ids`, `running_context_tokens`, read before the pass advances them), the
admitted ones the prefix of the queue head taken by `before_step` (`EngineTwin.queue_head`)
whose contexts add up to the pass's prefill tokens (FCFS admission takes a prefix; the Σctx²
the engine passes along is checked against it). Each admitted request gets
a contiguous KV region (prompt + true length + 1 tokens, first fit) and a token slot (its
last sampled token lives on the device), freed when it completes or is preempted.

Everything here is pure Python/numpy (no torch) and tested on CPU: bucket rounding, the KV
region allocator, the pass plan (positions, KV write offsets, attention metadata), the profile
row of a measured pass shape, the random pass sweep used to profile the runner, the drift
arithmetic, segment tracking and the projection comparison.

Drift (the throttLL'eM paper's forecast drift, per request): over every pass a request took
part in (its prefill pass and each decode pass), Σ |predicted − measured| pass time divided by
its number of passes (= tokens generated), in ms/iteration; ``signed`` is |Σ (predicted −
measured)| / passes, how far its predicted end drifted from the measured one, per iteration.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from throttllem._events import RequestArrived, RequestCompleted
from throttllem._perf.table import ProfileRow
from throttllem._twin.engine import EngineTwin, ScheduledRequest
from throttllem._twin.gpu import GpuIterationResult, GpuTwin
from throttllem._twin.profile import SetupProfile

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# Decode batch buckets for CUDA graphs: a decode-only pass of n sequences replays the graph
# of the smallest bucket ≥ n, the extra rows padded (they attend one scratch token).
DECODE_BUCKETS: Final = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80,
                         96, 112, 128, 144, 160, 192, 224, 256)
GIB: Final = 2**30


def bucket_up(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket ≥ n (buckets ascending), None when n exceeds them all."""
    i = bisect.bisect_left(buckets, n)
    return int(buckets[i]) if i < len(buckets) else None


# --------------------------------------------------------------------------- KV regions


class RegionAllocator:
    """First-fit allocation of contiguous token ranges in [0, capacity)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 token")
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, size), by start
        self._used: dict[int, int] = {}

    @property
    def used_tokens(self) -> int:
        return sum(self._used.values())

    def alloc(self, size: int) -> int:
        """Start of a free range of `size` tokens; MemoryError when none is large enough."""
        if size < 1:
            raise ValueError("size must be at least 1 token")
        for k, (start, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[k]
                else:
                    self._free[k] = (start + size, free - size)
                self._used[start] = size
                return start
        raise MemoryError(f"no free KV range of {size} tokens ({self.used_tokens} of "
                          f"{self.capacity} in use, {len(self._free)} free ranges)")

    def free(self, start: int) -> None:
        size = self._used.pop(start)
        k = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(k, (start, size))
        # merge with the next, then the previous range
        if k + 1 < len(self._free) and start + size == self._free[k + 1][0]:
            self._free[k] = (start, size + self._free[k + 1][1])
            del self._free[k + 1]
        if k > 0 and self._free[k - 1][0] + self._free[k - 1][1] == start:
            ps, pz = self._free[k - 1]
            self._free[k - 1] = (ps, pz + self._free[k][1])
            del self._free[k]


class SlotAllocator:
    """Token-table slots 0 … n−1 (a request's last sampled token lives in its slot)."""

    def __init__(self, n: int) -> None:
        self._free = list(range(n - 1, -1, -1))

    def alloc(self) -> int:
        if not self._free:
            raise MemoryError("no free token slot")
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._free.append(slot)


# --------------------------------------------------------------------------- one pass


class PassSpec(NamedTuple):
    """One forward pass: `decode_*` per decoding sequence (its context c = prompt +
    generated: the pass writes position c−1 and attends over c tokens), `prefill_*` per
    prompt prefilled in the pass (its L tokens at positions 0 … L−1). `*_start` are KV region
    starts, `*_slot` token-table slots."""

    decode_ctx: IntArray
    decode_start: IntArray
    decode_slot: IntArray
    prefill_len: IntArray
    prefill_start: IntArray
    prefill_slot: IntArray

    @property
    def batch(self) -> int:
        return int(self.decode_ctx.size)

    @property
    def kv_tokens(self) -> int:
        return int(self.decode_ctx.sum())

    @property
    def prefill_tokens(self) -> int:
        return int(self.prefill_len.sum())

    @property
    def prefill_attn_tokens2(self) -> int:
        return int((self.prefill_len * self.prefill_len).sum())

    @property
    def phase(self) -> str:
        if self.prefill_tokens == 0:
            return "decode"
        return "prefill" if self.batch == 0 else "mixed"


def pass_spec(decode_ctx: Sequence[int] | IntArray, decode_start: Sequence[int] | IntArray,
              decode_slot: Sequence[int] | IntArray, *,
              prefill_len: Sequence[int] | IntArray = (),
              prefill_start: Sequence[int] | IntArray = (),
              prefill_slot: Sequence[int] | IntArray = ()) -> PassSpec:
    """A validated `PassSpec` from sequences."""
    arrs = [np.asarray(a, dtype=np.int64).reshape(-1) for a in (
        decode_ctx, decode_start, decode_slot, prefill_len, prefill_start, prefill_slot)]
    if not arrs[0].size == arrs[1].size == arrs[2].size:
        raise ValueError("decode_ctx, decode_start and decode_slot differ in length")
    if not arrs[3].size == arrs[4].size == arrs[5].size:
        raise ValueError("prefill_len, prefill_start and prefill_slot differ in length")
    if (arrs[0] < 1).any() or (arrs[3] < 1).any():
        raise ValueError("contexts and prompt lengths must be at least 1")
    if arrs[0].size + arrs[3].size == 0:
        raise ValueError("a pass needs at least one sequence")
    return PassSpec(*arrs)


class PassPlan(NamedTuple):
    """The device-side arrays of one pass (host numpy; `passes` copies them over).

    Rows are tokens: the `n_dec` decode rows first (real ones, then padding up to a graph
    bucket), then the prefill tokens prompt by prompt. Padding rows write and attend one
    scratch token each and write their sampled token to the scratch slot."""

    n_dec: int
    n_real: int
    n_prefill_tokens: int
    dec_slots: IntArray  # [n_dec] token slots the decode rows read (and write back)
    pre_tok_index: IntArray  # [P] index into the runner's random prompt-token table
    pos: IntArray  # [T] rotary position of every row
    write_idx: IntArray  # [T] KV cache row each row's K/V go to
    dec_cu_k: IntArray  # [n_dec + 1] region starts (then the scratch row): flash cu_seqlens_k
    dec_used: IntArray  # [n_dec] keys each decode row attends (its context)
    dec_gather: IntArray  # [Σ used] cache rows of every decode row's keys, in order
    pre_cu: IntArray  # [k + 1] cumulative prompt lengths
    pre_max: int
    out_rows: IntArray  # rows whose next token is sampled: decode rows, each prompt's last
    out_slots: IntArray

    @property
    def rows(self) -> int:
        return int(self.pos.size)


def plan_pass(spec: PassSpec, *, scratch_row: int, scratch_slot: int,
              pad_to: int | None = None, token_table: int = 8192,
              with_gather: bool = False) -> PassPlan:
    """The pass plan of `spec` (pure). `pad_to` pads the decode rows to a graph bucket
    (only for decode-only passes); `scratch_row` is the first of ≥ pad_to scratch KV rows;
    `with_gather` fills `dec_gather` (Σ contexts entries: only the gather backend needs it)."""
    n = spec.batch
    if pad_to is not None and (pad_to < n or spec.prefill_tokens):
        raise ValueError("pad_to applies to decode-only passes, and must be ≥ the batch")
    nd = n if pad_to is None else pad_to
    pad = nd - n
    # longest contexts first: their attention blocks are scheduled first (shorter tail)
    order = np.argsort(-spec.decode_ctx, kind="stable")
    ctx, start = spec.decode_ctx[order], spec.decode_start[order]
    scratch = scratch_row + np.arange(pad, dtype=np.int64)
    dec_pos = np.concatenate((ctx - 1, np.zeros(pad, dtype=np.int64)))
    dec_write = np.concatenate((start + ctx - 1, scratch))
    dec_used = np.concatenate((ctx, np.ones(pad, dtype=np.int64)))
    dec_starts = np.concatenate((start, scratch))
    lens = spec.prefill_len
    p = int(lens.sum())
    pre_cu = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
    # position of every prefill token: 0 … L−1 per prompt
    pre_pos = np.arange(p, dtype=np.int64) - np.repeat(pre_cu[:-1], lens)
    pre_write = np.repeat(spec.prefill_start, lens) + pre_pos
    # random prompt tokens: a per-slot offset into the token table so prompts differ
    pre_tok = (pre_pos + np.repeat(spec.prefill_slot * 7919, lens)) % token_table
    gather = np.zeros(0, dtype=np.int64)
    if with_gather:
        gather = (np.repeat(dec_starts, dec_used)
                  + np.arange(int(dec_used.sum()), dtype=np.int64)
                  - np.repeat(np.cumsum(dec_used) - dec_used, dec_used))
    slots = np.concatenate((spec.decode_slot[order], np.full(pad, scratch_slot, dtype=np.int64)))
    return PassPlan(
        n_dec=nd, n_real=n, n_prefill_tokens=p, dec_slots=slots, pre_tok_index=pre_tok,
        pos=np.concatenate((dec_pos, pre_pos)), write_idx=np.concatenate((dec_write, pre_write)),
        dec_cu_k=np.concatenate((dec_starts, [scratch_row])).astype(np.int64),
        dec_used=dec_used, dec_gather=gather.astype(np.int64), pre_cu=pre_cu,
        pre_max=int(lens.max()) if lens.size else 0,
        out_rows=np.concatenate((np.arange(nd, dtype=np.int64), nd + pre_cu[1:] - 1)),
        out_slots=np.concatenate((slots, spec.prefill_slot)))


def decode_splits(rows: int) -> int:
    """KV splits per decode row for a decode-only pass of `rows` rows (split-KV decoding):
    enough that rows × splits ≥ 512 attention items, between 2 and 16."""
    return min(16, max(2, -(-512 // max(rows, 1))))


def split_chunks(starts: IntArray, used: IntArray, splits: int, *, scratch_row: int
                 ) -> tuple[IntArray, IntArray, npt.NDArray[np.bool_]]:
    """Split-KV chunks of decode rows (row-major: row i's `splits` chunks adjacent): each
    row's `used` keys from `starts` cut into `splits` chunks of ceil(used/splits); a chunk
    past the row's end attends the scratch row and is invalid (weight 0 in the merge)."""
    length = -(-used // splits)
    j = np.arange(splits, dtype=np.int64)
    off = length[:, None] * j[None, :]
    valid = off < used[:, None]
    c_start = np.where(valid, starts[:, None] + off, scratch_row).reshape(-1)
    c_used = np.where(valid, np.minimum(length[:, None], used[:, None] - off), 1).reshape(-1)
    return c_start.astype(np.int64), c_used.astype(np.int64), valid.reshape(-1)


class PassMeasurement(NamedTuple):
    """What running one pass measured: GPU time (CUDA events around the whole pass), host
    wall time (plan, launch, sync, NVML reads), the SM clock read right after it (NVML),
    energy since the previous reading (NVML counter, mJ), and how it ran."""

    gpu_ms: float
    wall_ms: float
    clock_mhz: float
    energy_mj: float
    graphed: bool
    bucket: int


class PassRunner(Protocol):
    """Runs passes; `passes.TorchPassRunner` on a GPU, `FakePassRunner` in tests."""

    kv_capacity_tokens: int
    token_slots: int

    def run(self, spec: PassSpec) -> PassMeasurement: ...


class FakePassRunner:
    """A `PassRunner` that times passes with a function of the pass shape (tests, dry runs):
    ``time_ms(batch, kv_tokens, prefill_tokens, prefill_attn_tokens2)``."""

    def __init__(self, time_ms: Callable[[int, int, int, int], float], *,
                 kv_capacity_tokens: int = 1 << 20, token_slots: int = 4096,
                 clock_mhz: float = 1980.0, power_w: float = 500.0, pace: bool = False,
                 keep_specs: bool = True) -> None:
        """`pace`: sleep the pass's time, so that a live engine's passes take it in wall time
        (its clock, power and energy stay the fake's figures, which no one may report as
        measured). `keep_specs=False` (a long-running engine): `specs` stays empty."""
        self.pace = pace
        self.keep_specs = keep_specs
        self.kv_capacity_tokens = kv_capacity_tokens
        self.token_slots = token_slots
        self._time_ms = time_ms
        self._clock = clock_mhz
        self._power = power_w
        self.specs: list[PassSpec] = []

    def run(self, spec: PassSpec) -> PassMeasurement:
        if self.keep_specs:
            self.specs.append(spec)
        ms = float(self._time_ms(spec.batch, spec.kv_tokens, spec.prefill_tokens,
                                 spec.prefill_attn_tokens2))
        if self.pace:
            time.sleep(ms / 1e3)
        return PassMeasurement(gpu_ms=ms, wall_ms=ms, clock_mhz=self._clock,
                               energy_mj=self._power * ms, graphed=False, bucket=spec.batch)


# --------------------------------------------------------------------------- profile rows


def pass_row(spec: PassSpec, *, times_ms: Sequence[float], clocks_mhz: Sequence[float],
             energy_mj: float, kv_bytes_per_token: int) -> ProfileRow:
    """The profile-table row (layout of `throttllem._perf.table`) of one pass shape measured
    `len(times_ms)` times: median/p10/p90 time, median clock, energy per pass. Exact
    ``kv_tokens`` and ``prefill_tokens`` are always written (contexts vary per sequence)."""
    if not times_ms:
        raise ValueError("no timed passes")
    s = sorted(times_ms)
    med = statistics.median(s)
    qs = np.quantile(np.asarray(s), [0.1, 0.9]) if len(s) > 1 else np.array([med, med])
    n, p = spec.batch, spec.prefill_tokens
    k = int(spec.prefill_len.size)
    phase = spec.phase
    if phase == "prefill":
        batch, ctx, tokens = k, round(p / k), round(p / k)
    else:
        batch, ctx, tokens = n, round(spec.kv_tokens / n), 1
    reps = len(times_ms)
    e = energy_mj / reps / 1e3 if reps and math.isfinite(energy_mj) else math.nan
    return ProfileRow(
        phase=phase, batch=batch, ctx=ctx, tokens=tokens, iter_ms=med,
        iter_ms_p10=float(qs[0]), iter_ms_p90=float(qs[1]), energy_j_per_iter=e,
        avg_power_w=e / (med / 1e3) if med > 0 and math.isfinite(e) else math.nan,
        sm_clock_mhz=statistics.median(clocks_mhz) if clocks_mhz else math.nan,
        kv_gib=(spec.kv_tokens + p) * kv_bytes_per_token / GIB, requested_clock_mhz=None,
        prefill_tokens=p, kv_tokens=spec.kv_tokens, kv_blocks=None, target="gpu",
        clock_locked=False, prefill_attn_tokens2=spec.prefill_attn_tokens2)


class SweepShape(NamedTuple):
    """A pass shape of the profiling sweep: decode contexts and prompt lengths."""

    decode_ctx: tuple[int, ...]
    prefill_len: tuple[int, ...]


def sweep_shapes(n: int, *, seed: int = 0, max_batch: int = 256, max_ctx: int = 8192,
                 max_batched_tokens: int = 8192, kv_cap_tokens: int = 400_000,
                 kinds: tuple[float, float, float] = (0.55, 0.35, 0.10)) -> list[SweepShape]:
    """`n` random pass shapes as serving produces them (pure, seeded), in a random order so
    that a sweep stopped early still covers the space: `kinds` = P(decode only, decode plus
    prefill, prefill only). Decode batches log-uniform on 1 … max_batch; each pass has a
    mean context log-uniform on 32 … 4096 and per-sequence contexts spread log-normally
    around it; prompts 1–4 per pass, log-uniform lengths 16 … 4096 under the token budget
    (a prompt longer than the budget is prefilled alone, as the engine does)."""
    rng = np.random.default_rng(seed)
    out: list[SweepShape] = []
    for _ in range(n):
        kind = int(rng.choice(3, p=np.asarray(kinds) / sum(kinds)))
        ctx: tuple[int, ...] = ()
        if kind in (0, 1):
            hi = max_batch if kind == 0 else max(1, max_batch // 2)
            b = int(np.clip(round(math.exp(rng.uniform(0.0, math.log(hi)))), 1, hi))
            mean = math.exp(rng.uniform(math.log(32), math.log(4096)))
            c = np.clip(np.round(mean * rng.lognormal(0.0, 0.6, b)), 2, max_ctx - 1)
            while c.sum() > kv_cap_tokens:
                c = np.maximum(np.round(c / 2), 2)
            ctx = tuple(int(x) for x in c)
        lens: tuple[int, ...] = ()
        if kind in (1, 2):
            k = int(rng.choice([1, 2, 3, 4], p=[0.55, 0.25, 0.12, 0.08]))
            room = max_batched_tokens - len(ctx)
            got: list[int] = []
            for j in range(k):
                ln = round(math.exp(rng.uniform(math.log(16), math.log(4096))))
                if j == 0 or ln <= room:
                    got.append(min(ln, max_ctx - 1))
                    room -= ln
            lens = tuple(got)
        out.append(SweepShape(ctx, lens))
    return out


def sweep_spec(shape: SweepShape, rng: np.random.Generator, *, kv_cap_tokens: int,
               token_slots: int) -> PassSpec:
    """A `PassSpec` for a sweep shape: distinct, adjacent KV regions at a random offset (no
    two sequences share KV, so no cache effects a real batch would not have) and distinct
    random token slots."""
    ctx = np.asarray(shape.decode_ctx, dtype=np.int64)
    lens = np.asarray(shape.prefill_len, dtype=np.int64)
    sizes = np.concatenate((ctx, lens))
    total = int(sizes.sum())
    if total > kv_cap_tokens:
        raise ValueError(f"pass needs {total} KV tokens, the cache holds {kv_cap_tokens}")
    base = int(rng.integers(0, kv_cap_tokens - total + 1))
    starts = base + np.concatenate(([0], np.cumsum(sizes)[:-1]))
    slots = rng.choice(token_slots, size=sizes.size, replace=False)
    n = ctx.size
    return pass_spec(ctx, starts[:n], slots[:n], prefill_len=lens, prefill_start=starts[n:],
                     prefill_slot=slots[n:])


def profile_passes(runner: PassRunner, shapes: Iterable[SweepShape], *,
                   kv_bytes_per_token: int, budget_s: float, reps: int = 5, warmup: int = 1,
                   seed: int = 0, on_row: Callable[[ProfileRow, PassMeasurement], None]
                   | None = None) -> list[ProfileRow]:
    """Measure each shape `warmup + reps` times on `runner` (the loop's own passes, measured
    exactly as the loop measures them) until `budget_s` would be overrun; one row each."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    rows: list[ProfileRow] = []
    last_s: list[float] = []
    for shape in shapes:
        est = statistics.median(last_s[-8:]) * 1.5 if last_s else 1.0
        if time.perf_counter() - t0 + est > budget_s:
            break
        ts = time.perf_counter()
        spec = sweep_spec(shape, rng, kv_cap_tokens=runner.kv_capacity_tokens,
                          token_slots=runner.token_slots)
        for _ in range(warmup):
            runner.run(spec)
        ms = [runner.run(spec) for _ in range(reps)]
        row = pass_row(spec, times_ms=[m.gpu_ms for m in ms],
                       clocks_mhz=[m.clock_mhz for m in ms],
                       energy_mj=sum(m.energy_mj for m in ms),
                       kv_bytes_per_token=kv_bytes_per_token)
        rows.append(row)
        if on_row is not None:
            on_row(row, ms[-1])
        last_s.append(time.perf_counter() - ts)
    return rows


# --------------------------------------------------------------------------- the loop


class PassRecord(NamedTuple):
    """One pass of the loop, as logged."""

    k: int
    start_s: float
    gpu_ms: float
    wall_ms: float
    batch: int  # decoding sequences (the performance model's batch)
    kv_tokens: int
    prefill_tokens: int
    n_prefill: int
    prefill_attn_tokens2: int
    clock_mhz: float
    energy_mj: float
    graphed: bool
    bucket: int
    queue_len: int


PASS_COLUMNS: Final = PassRecord._fields


def record_row(rec: PassRecord, *, kv_bytes_per_token: int) -> ProfileRow:
    """A logged loop pass as a profile-table row (one measurement: p10 = p90 = the time), so
    a loop run can train the performance model too."""
    n, p, k = rec.batch, rec.prefill_tokens, rec.n_prefill
    if p == 0:
        phase, batch, ctx, tokens = "decode", n, round(rec.kv_tokens / n), 1
    elif n == 0:
        phase, batch, ctx, tokens = "prefill", k, round(p / k), round(p / k)
    else:
        phase, batch, ctx, tokens = "mixed", n, round(rec.kv_tokens / n), 1
    e = rec.energy_mj / 1e3 if math.isfinite(rec.energy_mj) else math.nan
    return ProfileRow(
        phase=phase, batch=batch, ctx=ctx, tokens=tokens, iter_ms=rec.gpu_ms,
        iter_ms_p10=rec.gpu_ms, iter_ms_p90=rec.gpu_ms, energy_j_per_iter=e,
        avg_power_w=e / (rec.gpu_ms / 1e3) if rec.gpu_ms > 0 and math.isfinite(e) else math.nan,
        sm_clock_mhz=rec.clock_mhz, kv_gib=(rec.kv_tokens + p) * kv_bytes_per_token / GIB,
        requested_clock_mhz=None, prefill_tokens=p, kv_tokens=rec.kv_tokens, kv_blocks=None,
        target="gpu", clock_locked=False, prefill_attn_tokens2=rec.prefill_attn_tokens2)


class SegmentTracker:
    """Which passes each request took part in, as [first, last] segments (a request runs in
    every pass from its admission to its completion; preemption splits it)."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._prev: set[str] = set()
        self._k = -1
        self.segments: dict[str, list[tuple[int, int]]] = {}

    def observe(self, k: int, ids: Iterable[str]) -> None:
        cur = set(ids)
        for rid in self._prev - cur:
            self.segments.setdefault(rid, []).append((self._open.pop(rid), self._k))
        for rid in cur - self._prev:
            self._open[rid] = k
        self._prev = cur
        self._k = k

    def finish(self) -> dict[str, list[tuple[int, int]]]:
        for rid in self._prev:
            self.segments.setdefault(rid, []).append((self._open.pop(rid), self._k))
        self._prev = set()
        return self.segments


class LoopGpu(GpuTwin):
    """One GPU whose passes really run (`PassRunner`); see the module docstring."""

    name: str = "loop"

    def __init__(self, profile: SetupProfile, runner: PassRunner) -> None:
        super().__init__(profile, count=1, uuid_prefix="GPU-loop")
        self.runner = runner
        self.engine: EngineTwin | None = None
        self._regions = RegionAllocator(runner.kv_capacity_tokens)
        self._slots = SlotAllocator(runner.token_slots)
        self._held: dict[str, tuple[int, int]] = {}  # id -> (region start, slot)
        self._pending: tuple[ScheduledRequest, ...] = ()
        self.passes: list[PassRecord] = []
        self.tracker = SegmentTracker()

    def attach(self, engine: EngineTwin) -> None:
        if engine.gpu is not self:
            raise ValueError("the engine does not run on this LoopGpu")
        self.engine = engine

    def before_step(self) -> None:
        """Snapshot the head of the engine's queue: the next pass admits a prefix of it."""
        eng = self._engine()
        room = eng.profile.engine.max_batch - eng.running_count + 1
        self._pending = eng.queue_head(room)

    def _engine(self) -> EngineTwin:
        if self.engine is None:
            raise RuntimeError("LoopGpu.attach(engine) was not called")
        return self.engine

    def release(self, request_ids: Iterable[str]) -> None:
        """Free the KV regions and token slots of requests that left the engine."""
        for rid in request_ids:
            held = self._held.pop(rid, None)
            if held is not None:
                self._regions.free(held[0])
                self._slots.free(held[1])

    def finish_pass(self, start_s: float, m: PassMeasurement) -> tuple[PassMeasurement, float]:
        """The pass's measurement as recorded, and how long it took in engine time (s): here
        its GPU time (the lab skips host time); a live engine takes its clock's time."""
        return m, m.gpu_ms / 1e3

    def run_iteration(self, start_s: float, *, batch: int, kv_tokens: int, prefill_tokens: int,
                      prefill_attn_tokens2: float = 0.0,
                      indices: Iterable[int] | None = None) -> GpuIterationResult:
        eng = self._engine()
        running = eng.running_ids()  # the decoding slots, in order
        ctx = eng.running_context_tokens()  # contexts before the pass
        if len(running) != batch or int(ctx.sum()) != kv_tokens:
            raise RuntimeError("engine slots disagree with the pass totals")
        admitted: list[ScheduledRequest] = []
        acc = 0
        for r in self._pending:
            if acc >= prefill_tokens:
                break
            admitted.append(r)
            acc += r.prompt_tokens + r.generated_tokens
        lens = [r.prompt_tokens + r.generated_tokens for r in admitted]
        if acc != prefill_tokens or sum(x * x for x in lens) != int(prefill_attn_tokens2):
            raise RuntimeError(f"cannot tell which requests the pass admits ({acc} of "
                               f"{prefill_tokens} prefill tokens matched)")
        # A request preempted by this step holds a region it will never use again (it is
        # prefilled from scratch when re-admitted): free it before this pass allocates.
        in_pass = set(running).union(r.id for r in admitted)
        self.release([rid for rid in self._held if rid not in in_pass])
        starts: list[int] = []
        slots: list[int] = []
        for rid in running:
            st, sl = self._held[rid]
            starts.append(st)
            slots.append(sl)
        p_starts: list[int] = []
        p_slots: list[int] = []
        for r, ln in zip(admitted, lens, strict=True):
            self.release([r.id])  # re-admitted after preemption: recompute from scratch
            st = self._regions.alloc(ln + (r.target_tokens - r.generated_tokens) + 1)
            sl = self._slots.alloc()
            self._held[r.id] = (st, sl)
            p_starts.append(st)
            p_slots.append(sl)
        spec = pass_spec(ctx, starts, slots, prefill_len=lens, prefill_start=p_starts,
                         prefill_slot=p_slots)
        idx = self._indices(indices)
        for i in idx:
            if start_s < self._gpus[i].now_s - 1e-6:
                raise RuntimeError(f"GPU busy until {self._gpus[i].now_s:.6f} s")
        self.idle_until(start_s, idx)
        m, duration = self.finish_pass(start_s, self.runner.run(spec))
        st8 = self._gpus[0]
        st8.energy_mj += m.energy_mj
        st8.now_s = start_s + duration
        st8.clock_mhz = m.clock_mhz
        st8.power_w = m.energy_mj / 1e3 / duration if duration > 0 else 0.0
        st8.util_pct = 100.0
        k = len(self.passes)
        self.passes.append(PassRecord(
            k=k, start_s=start_s, gpu_ms=m.gpu_ms, wall_ms=m.wall_ms, batch=batch,
            kv_tokens=kv_tokens, prefill_tokens=prefill_tokens, n_prefill=len(admitted),
            prefill_attn_tokens2=int(prefill_attn_tokens2), clock_mhz=m.clock_mhz,
            energy_mj=m.energy_mj, graphed=m.graphed, bucket=m.bucket,
            queue_len=eng.queue_len))
        self.tracker.observe(k, running + [r.id for r in admitted])
        return GpuIterationResult(duration_s=duration, energy_mj=m.energy_mj,
                                  clock_mhz=m.clock_mhz, power_w=st8.power_w)


@dataclass(frozen=True)
class Snapshot:
    """The engine's state at an admission instant, with true lengths (for `project`)."""

    time_s: float
    next_pass: int
    running_ids: tuple[str, ...]
    running_prompt: tuple[int, ...]
    running_generated: tuple[int, ...]
    running_target: tuple[int, ...]
    queued_ids: tuple[str, ...]
    queued_prompt: tuple[int, ...]
    queued_generated: tuple[int, ...]
    queued_target: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Snapshot:
        args: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**args)


def snapshot(engine: EngineTwin, next_pass: int, time_s: float) -> Snapshot:
    """The engine's state before the pass that starts at `time_s` (reads its slots)."""
    q = engine.queue_head()
    return Snapshot(
        time_s=time_s, next_pass=next_pass,
        running_ids=tuple(engine.running_ids()),
        running_prompt=tuple(int(x) for x in engine.running_prompt_tokens()),
        running_generated=tuple(int(x) for x in engine.running_generated_tokens()),
        running_target=tuple(int(x) for x in engine.running_target_tokens()),
        queued_ids=tuple(r.id for r in q), queued_prompt=tuple(r.prompt_tokens for r in q),
        queued_generated=tuple(r.generated_tokens for r in q),
        queued_target=tuple(r.target_tokens for r in q))


@dataclass
class ServeResult:
    passes: list[PassRecord]
    completed: list[RequestCompleted]
    segments: dict[str, list[tuple[int, int]]]
    snapshots: list[Snapshot]
    admitted: int
    stopped_early: bool
    wall_s: float
    notes: dict[str, Any] = field(default_factory=dict)


def serve(engine: EngineTwin, gpu: LoopGpu, requests: Sequence[RequestArrived], *,
          snapshot_times_s: Sequence[float] = (), arrivals_wall_s: float | None = None,
          wall_limit_s: float | None = None,
          progress: Callable[[str], None] | None = None) -> ServeResult:
    """Serve `requests` (sorted by arrival) through `engine` on `gpu` until all completed.

    Arrivals are admitted as soon as the engine reaches their arrival time (policy
    ``default``: no controller); when idle the engine jumps to the next arrival. After
    `arrivals_wall_s` of wall time no further arrival is admitted (the rest are dropped, the
    admitted ones drain); after `wall_limit_s` the loop stops where it is (unfinished requests
    are then absent from `completed`). At the first pass start at or after each of
    `snapshot_times_s` at which a request was just admitted, the state is snapshotted.
    """
    gpu.attach(engine)
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    snaps_due = sorted(snapshot_times_s)
    t_wall = time.perf_counter()
    i = 0
    n = len(reqs)
    completed: list[RequestCompleted] = []
    snapshots: list[Snapshot] = []
    stopped = False
    last_report = t_wall
    while i < n or engine.has_work():
        wall = time.perf_counter() - t_wall
        if arrivals_wall_s is not None and wall > arrivals_wall_s and n > i:
            n = i  # stop admitting
            if progress:
                progress(f"arrival window over after {wall:.0f} s: {i} admitted, draining")
        if wall_limit_s is not None and wall > wall_limit_s:
            stopped = True
            break
        t = engine.now_s
        if not engine.has_work():
            if i >= n:
                break
            t = max(t, reqs[i].arrival_s)
        fresh = False
        while i < n and reqs[i].arrival_s <= t:
            engine.admit(reqs[i], reqs[i].arrival_s)
            i += 1
            fresh = True
        if fresh and snaps_due and t >= snaps_due[0]:
            while snaps_due and t >= snaps_due[0]:
                snaps_due.pop(0)
            snapshots.append(snapshot(engine, len(gpu.passes), t))
        gpu.before_step()
        out = engine.step(t)
        if out is not None and out.completed:
            completed += out.completed
            gpu.release(c.id for c in out.completed)
        if progress and time.perf_counter() - last_report > 15.0:
            last_report = time.perf_counter()
            progress(f"t={engine.now_s:.1f} s: {len(gpu.passes)} passes, {i} admitted, "
                     f"{len(completed)} done, batch {engine.running_count}, "
                     f"queue {engine.queue_len}")
    return ServeResult(passes=gpu.passes, completed=completed,
                       segments=gpu.tracker.finish(), snapshots=snapshots, admitted=i,
                       stopped_early=stopped, wall_s=time.perf_counter() - t_wall)


# --------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class DriftStats:
    n: int
    mean: float
    median: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float] | FloatArray) -> DriftStats:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(0, math.nan, math.nan, math.nan)
        return cls(int(v.size), float(v.mean()), float(np.median(v)),
                   float(np.percentile(v, 90)))

    def to_json(self) -> dict[str, float | int]:
        return {"n": self.n, "mean": self.mean, "median": self.median, "p90": self.p90}


def request_drift_ms(pred_ms: FloatArray, meas_ms: FloatArray,
                     segments: Sequence[Sequence[tuple[int, int]]], *,
                     mask: npt.NDArray[np.bool_] | None = None
                     ) -> tuple[FloatArray, FloatArray, IntArray]:
    """Per request: (Σ|pred − meas| / passes, |Σ(pred − meas)| / passes, passes) over the
    passes in its segments ([first, last], inclusive), restricted to passes where `mask` is
    true if given (a request with none of them gets NaN)."""
    err = np.asarray(pred_ms, dtype=np.float64) - np.asarray(meas_ms, dtype=np.float64)
    keep = np.ones(err.size, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    c_abs = np.concatenate(([0.0], np.cumsum(np.where(keep, np.abs(err), 0.0))))
    c_sig = np.concatenate(([0.0], np.cumsum(np.where(keep, err, 0.0))))
    c_n = np.concatenate(([0], np.cumsum(keep.astype(np.int64))))
    m = len(segments)
    a_abs = np.zeros(m)
    a_sig = np.zeros(m)
    a_n = np.zeros(m, dtype=np.int64)
    for j, segs in enumerate(segments):
        for a, b in segs:
            a_abs[j] += c_abs[b + 1] - c_abs[a]
            a_sig[j] += c_sig[b + 1] - c_sig[a]
            a_n[j] += c_n[b + 1] - c_n[a]
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(a_n > 0, a_abs / np.maximum(a_n, 1), np.nan)
        signed = np.where(a_n > 0, np.abs(a_sig) / np.maximum(a_n, 1), np.nan)
    return per, signed, a_n


def pass_errors(pred_ms: FloatArray, meas_ms: FloatArray,
                mask: npt.NDArray[np.bool_] | None = None) -> dict[str, float]:
    """Per-pass accuracy: time MAPE (%), mean absolute error and mean signed error (ms)."""
    p = np.asarray(pred_ms, dtype=np.float64)
    t = np.asarray(meas_ms, dtype=np.float64)
    if mask is not None:
        p, t = p[mask], t[mask]
    if t.size == 0:
        return {"n": 0, "mape_pct": math.nan, "mae_ms": math.nan, "bias_ms": math.nan}
    return {"n": int(t.size), "mape_pct": float((np.abs(p - t) / t).mean() * 100.0),
            "mae_ms": float(np.abs(p - t).mean()), "bias_ms": float((p - t).mean()),
            "p90_ape_pct": float(np.percentile(np.abs(p - t) / t * 100.0, 90))}


def snapshot_state(s: Snapshot, profile: SetupProfile) -> Any:
    """The forecaster's `InstanceState` of a snapshot, true lengths as the predictions."""
    from throttllem._core.forecast import InstanceState  # noqa: PLC0415

    e = profile.engine
    i64, f64 = np.int64, np.float64
    rt = np.asarray(s.running_target, dtype=f64)
    qt = np.asarray(s.queued_target, dtype=f64)
    return InstanceState(
        running_prompt_tokens=np.asarray(s.running_prompt, dtype=i64),
        running_generated_tokens=np.asarray(s.running_generated, dtype=i64),
        running_predicted_tokens=rt, running_upper_tokens=rt,
        queued_prompt_tokens=np.asarray(s.queued_prompt, dtype=i64),
        queued_predicted_tokens=qt, queued_upper_tokens=qt,
        kv_block_tokens=e.block_tokens, kv_blocks_total=e.kv_blocks, max_batch=e.max_batch,
        max_batched_tokens=e.max_batched_tokens,
        kv_watermark_blocks=int(e.kv_watermark * e.kv_blocks),
        queued_generated_tokens=np.asarray(s.queued_generated, dtype=i64))


def projected_ends_s(s: Snapshot, profile: SetupProfile,
                     time_s: Callable[[FloatArray, FloatArray, FloatArray, FloatArray],
                                      FloatArray]
                     ) -> tuple[tuple[str, ...], FloatArray, IntArray, Any]:
    """`project` the snapshot (true lengths) and time its passes with `time_s(batch, kv,
    prefill, Σ prompt²)`; returns (request ids, predicted end times, predicted last pass
    index relative to the snapshot, the projection)."""
    from throttllem._core.forecast import project  # noqa: PLC0415

    proj = project(snapshot_state(s, profile))
    t = np.asarray(time_s(proj.decode_batch.astype(np.float64),
                          proj.kv_tokens.astype(np.float64),
                          proj.prefill_tokens.astype(np.float64),
                          proj.prefill_attn_tokens2.astype(np.float64)), dtype=np.float64)
    ends = s.time_s + np.cumsum(t)
    ids = s.running_ids + s.queued_ids
    return ids, ends[proj.last_token_iter], proj.last_token_iter.astype(np.int64), proj

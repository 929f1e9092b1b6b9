"""Profiling a real GPU: a Llama-3-8B-shaped decoder with random bf16 weights, in PyTorch.

What it measures, per (phase, batch, context) bucket, one table row (layout of
`throttllem._perf.table`, ``target=gpu``, ``clock_locked=false``):

* decode: one token for each of `batch` sequences holding `ctx` KV tokens each (KV cache
  preallocated once, paged by bucket), the whole step captured in a CUDA graph per bucket;
  attention is PyTorch SDPA (``enable_gqa``; on torch < 2.5 the 4 query heads of a KV head
  as 4 query rows), RMSNorm, SwiGLU MLP, rotary, final norm, LM head and argmax — the shape
  of the decoder behind the measured H100 table, though not its code: expect its times to
  differ by some percent (a production engine with paged flash-decoding is faster still);
* prefill: `batch` prompts of `ctx` tokens each, causal SDPA, KV written to the cache, LM head
  on the last token only;
* `iter_ms` (median), `iter_ms_p10`/`iter_ms_p90` of `timed_iters` CUDA-event-timed replays
  after `warmup_iters`; then ≥ `energy_window_s` of back-to-back replays between two reads of
  the NVML total-energy counter give `energy_j_per_iter` and `avg_power_w`, while a thread
  samples the SM clock every 50 ms (`throttllem._gpulab.sampler`): `sm_clock_mhz` is their
  median, the clock the card ran at.

**The GPU's clocks are never changed.** Locking clocks needs root on the host and would change
a shared card's behaviour, so the profiler only reads NVML (through
``throttllem._gpu.nvml.NvmlBackend(dry_run=True)``, which cannot call a setter). It says so at
start: the clock axis of the table covers only what the card does by itself — its top clock,
and lower clocks where the power cap pulls it down (large prefills and large decode batches
on an H100).

Budget and memory: buckets run coarse-to-fine (`gpu_sweep_plan`: the corners and middle of
the batch × context space first, then finer), and the sweep stops before a bucket that would
overrun `budget_s` (default 330 s, all included), so an early stop still covers the space.
KV is capped at `kv_budget_gib` (49 GiB: room for batch 384 × 1024 tokens, as in the measured
table)
and at what the card has free after the 16 GB of weights and a 6 GiB margin. A bucket that
runs out of memory or fails is logged and skipped; rows are flushed as they are measured, so
an interrupted run keeps them. A ``<out>.meta.json`` beside the table records the device,
driver, torch version, NVML clocks and power limit, the plan and what was skipped.

Needs torch (CUDA), numpy, nvidia-ml-py, msgspec and structlog, plus this package on
PYTHONPATH:

    PYTHONPATH=shared python -m throttllem._cli_perf profile --target gpu --out runs/gpu.csv

Everything up to the torch import (plan, memory cap, row assembly) is pure and tested on CPU.
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TextIO

from throttllem._errors import GpuError
from throttllem._gpulab.sampler import (
    NvmlSampler,
    describe_gpu,
    nvml_index_of_cuda_device,
    open_nvml,
)
from throttllem._perf.table import ProfileRow, TableWriter, refuse_parquet

if TYPE_CHECKING:
    from throttllem._gpu.nvml import NvmlBackend

GIB: Final = 2**30
CLOCK_SAMPLE_PERIOD_S: Final = 0.05


class DecoderShape(NamedTuple):
    """A Llama-style decoder's shape (defaults: Llama-3-8B)."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def params(self) -> int:
        q_kv_o = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + (
            self.heads * self.head_dim * self.hidden)
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (q_kv_o + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + (
            self.hidden)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes


LLAMA3_8B: Final = DecoderShape()


class GpuProfileOptions(NamedTuple):
    device_index: int = 0
    seed: int = 0
    budget_s: float = 330.0
    kv_budget_gib: float = 49.0
    memory_margin_gib: float = 6.0
    warmup_iters: int = 3
    timed_iters: int = 15
    energy_window_s: float = 1.0
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320,
                                384, 448, 512)
    contexts: tuple[int, ...] = (128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192)
    prefill_batches: tuple[int, ...] = (1, 2, 4, 8)
    prefill_lens: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    prefill_tokens_cap: int = 16384
    shape: DecoderShape = LLAMA3_8B


class GpuBucket(NamedTuple):
    """One measured configuration: `batch` sequences, `ctx` KV tokens (decode) or prompt
    tokens (prefill) each."""

    phase: str
    batch: int
    ctx: int

    @property
    def tokens(self) -> int:
        return 1 if self.phase == "decode" else self.ctx

    @property
    def cache_tokens(self) -> int:
        """KV slots the bucket needs (decode writes one more token)."""
        return self.batch * (self.ctx + 1 if self.phase == "decode" else self.ctx)


# --------------------------------------------------------------------------- pure planning


def _axis_levels(n: int) -> list[int]:
    """Coarse-to-fine level of each index of an axis of n points: both ends 0, the middle
    1, the quarter points 2, … (recursive bisection of the index range)."""
    levels = [math.inf] * n
    if n == 0:
        return []
    levels[0] = 0
    levels[-1] = 0
    spans = [(0, n - 1)]
    level = 1
    while spans:
        nxt = []
        for lo, hi in spans:
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            levels[mid] = min(levels[mid], level)
            nxt += [(lo, mid), (mid, hi)]
        spans = nxt
        level += 1
    return [int(v) for v in levels]


def kv_capacity_tokens(opts: GpuProfileOptions, free_bytes: int | None = None) -> int:
    """KV tokens the sweep may hold: the KV budget, and what is free after the weights and
    the margin (when `free_bytes`, the card's free memory before loading, is known)."""
    shape = opts.shape
    cap = int(opts.kv_budget_gib * GIB) // shape.kv_bytes_per_token
    if free_bytes is not None:
        room = free_bytes - shape.weight_bytes - int(opts.memory_margin_gib * GIB)
        cap = min(cap, max(0, room) // shape.kv_bytes_per_token)
    return cap


def gpu_sweep_plan(opts: GpuProfileOptions, kv_cap_tokens: int) -> list[GpuBucket]:
    """Buckets in the order to measure them: coarse-to-fine over batch × context (decode)
    and batch × prompt length (prefill), every bucket within the KV capacity; prefill
    buckets interleaved so that roughly one in six is a prefill all along. Pure."""
    def ordered(phase: str, bs: Sequence[int], cs: Sequence[int],
                ok: Callable[[GpuBucket], bool]) -> list[GpuBucket]:
        lb, lc = _axis_levels(len(bs)), _axis_levels(len(cs))
        items = []
        for i, b in enumerate(bs):
            for j, c in enumerate(cs):
                bucket = GpuBucket(phase, b, c)
                if ok(bucket):
                    # level first; within a level small work first (cheap, and the knees)
                    items.append(((max(lb[i], lc[j]), lb[i] + lc[j], b * c), bucket))
        return [bk for _, bk in sorted(items)]

    decode = ordered("decode", opts.batches, opts.contexts,
                     lambda bk: bk.cache_tokens <= kv_cap_tokens)
    prefill = ordered("prefill", opts.prefill_batches, opts.prefill_lens,
                      lambda bk: (bk.batch * bk.ctx <= opts.prefill_tokens_cap
                                  and bk.cache_tokens <= kv_cap_tokens))
    out: list[GpuBucket] = []
    di = pi = 0
    while di < len(decode) or pi < len(prefill):
        take_prefill = pi < len(prefill) and (di >= len(decode) or (len(out) + 1) % 6 == 0)
        if take_prefill:
            out.append(prefill[pi])
            pi += 1
        else:
            out.append(decode[di])
            di += 1
    return out


def summarize_ms(samples_ms: Sequence[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of iteration times."""
    if not samples_ms:
        raise ValueError("no timed iterations")
    s = sorted(samples_ms)
    def pct(q: float) -> float:
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return statistics.median(s), pct(0.1), pct(0.9)


def bucket_row(bucket: GpuBucket, shape: DecoderShape, *, times_ms: Sequence[float],
               energy_mj: float, window_iters: int, window_s: float,
               clock_samples_mhz: Sequence[float]) -> ProfileRow:
    """The table row of one measured bucket (pure)."""
    med, p10, p90 = summarize_ms(times_ms)
    kv_tokens = bucket.batch * bucket.ctx
    clock = statistics.median(clock_samples_mhz) if clock_samples_mhz else math.nan
    decode = bucket.phase == "decode"
    return ProfileRow(
        phase=bucket.phase, batch=bucket.batch, ctx=bucket.ctx, tokens=bucket.tokens,
        iter_ms=med, iter_ms_p10=p10, iter_ms_p90=p90,
        energy_j_per_iter=energy_mj / 1e3 / window_iters if window_iters else math.nan,
        avg_power_w=energy_mj / 1e3 / window_s if window_s > 0 else math.nan,
        sm_clock_mhz=clock, kv_gib=kv_tokens * shape.kv_bytes_per_token / GIB,
        requested_clock_mhz=None,  # nothing was requested: clocks are never changed
        prefill_tokens=0 if decode else kv_tokens, kv_tokens=kv_tokens if decode else 0,
        kv_blocks=None, target="gpu", clock_locked=False,
        prefill_attn_tokens2=0 if decode else bucket.batch * bucket.ctx * bucket.ctx)


# --------------------------------------------------------------------------- torch model


class _Decoder:
    """Random-weight Llama-style decoder; builds a step function per bucket."""

    def __init__(self, torch: Any, shape: DecoderShape, device: Any, kv_cap_tokens: int,
                 seed: int) -> None:
        self.torch = torch
        self.shape = shape
        self.device = device
        s = shape
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        bf16 = torch.bfloat16

        def w(*dims: int) -> Any:
            t = torch.empty(*dims, dtype=bf16, device=device)
            t.normal_(0.0, 0.02, generator=gen)
            return t

        qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.embed = w(s.vocab, s.hidden)
        self.lm_head = w(s.hidden, s.vocab)
        self.layers = [
            {"qkv": w(s.hidden, qkv_out), "o": w(s.heads * s.head_dim, s.hidden),
             "gu": w(s.hidden, 2 * s.ffn), "down": w(s.ffn, s.hidden),
             "n1": torch.ones(s.hidden, dtype=bf16, device=device),
             "n2": torch.ones(s.hidden, dtype=bf16, device=device)}
            for _ in range(s.layers)]
        self.final_norm = torch.ones(s.hidden, dtype=bf16, device=device)
        per_token = s.layers * 2 * s.kv_heads * s.head_dim
        self.kv_cap_tokens = kv_cap_tokens
        self.kv = torch.zeros(max(1, kv_cap_tokens) * per_token, dtype=bf16, device=device)
        inv = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2, device=device,
                                              dtype=torch.float32) / s.head_dim))
        self.inv_freq = inv
        self.native_gqa = self._probe_gqa()

    def _probe_gqa(self) -> bool:
        """Whether SDPA takes ``enable_gqa`` (torch ≥ 2.5): one query row per head then runs
        up to 2.7× faster than grouping query heads as rows at batch 1, long contexts."""
        t = self.torch
        q = t.zeros(1, 4, 1, 8, dtype=t.bfloat16, device=self.device)
        kv = t.zeros(1, 2, 3, 8, dtype=t.bfloat16, device=self.device)
        try:
            t.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        except (TypeError, RuntimeError):
            return False
        return True

    def _rms(self, x: Any, weight: Any) -> Any:
        t = self.torch
        rms_norm = getattr(t.nn.functional, "rms_norm", None)
        if rms_norm is not None:
            return rms_norm(x, (x.shape[-1],), weight, 1e-5)
        xf = x.float()
        return (xf * t.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * weight

    def _rope(self, positions: Any) -> tuple[Any, Any]:
        t = self.torch
        ang = positions.float()[:, None] * self.inv_freq[None, :]
        emb = t.cat([ang, ang], dim=-1)
        return emb.cos().to(t.bfloat16), emb.sin().to(t.bfloat16)

    @staticmethod
    def _rotate(x: Any, cos: Any, sin: Any) -> Any:
        half = x.shape[-1] // 2
        rot = x.new_empty(x.shape)
        rot[..., :half] = -x[..., half:]
        rot[..., half:] = x[..., :half]
        return x * cos + rot * sin

    def cache(self, bucket: GpuBucket) -> Any:
        s = self.shape
        length = bucket.ctx + 1 if bucket.phase == "decode" else bucket.ctx
        n = s.layers * 2 * bucket.batch * s.kv_heads * length * s.head_dim
        return self.kv[:n].view(s.layers, 2, bucket.batch, s.kv_heads, length, s.head_dim)

    def step_fn(self, bucket: GpuBucket) -> tuple[Callable[[], Any], Any]:
        """(a zero-argument step, its static token input) for one bucket."""
        t = self.torch
        f = t.nn.functional
        s = self.shape
        b, ctx = bucket.batch, bucket.ctx
        cache = self.cache(bucket)
        group = s.heads // s.kv_heads
        gqa = self.native_gqa
        if bucket.phase == "decode":
            tokens = t.randint(0, s.vocab, (b,), device=self.device)
            cos, sin = self._rope(t.tensor([ctx], device=self.device))

            def decode() -> Any:
                h = self.embed[tokens]
                for i, layer in enumerate(self.layers):
                    a = self._rms(h, layer["n1"])
                    qkv = a @ layer["qkv"]
                    q = qkv[:, : s.heads * s.head_dim].view(b, s.heads, s.head_dim)
                    k = qkv[:, s.heads * s.head_dim: (s.heads + s.kv_heads) * s.head_dim].view(
                        b, s.kv_heads, s.head_dim)
                    v = qkv[:, (s.heads + s.kv_heads) * s.head_dim:].view(
                        b, s.kv_heads, s.head_dim)
                    q = self._rotate(q, cos, sin)
                    k = self._rotate(k, cos, sin)
                    cache[i, 0, :, :, ctx] = k
                    cache[i, 1, :, :, ctx] = v
                    if gqa:
                        o = f.scaled_dot_product_attention(
                            q.view(b, s.heads, 1, s.head_dim), cache[i, 0], cache[i, 1],
                            enable_gqa=True)
                    else:  # the `group` query heads of a KV head as `group` query rows
                        o = f.scaled_dot_product_attention(
                            q.view(b, s.kv_heads, group, s.head_dim), cache[i, 0], cache[i, 1])
                    h = h + o.reshape(b, s.heads * s.head_dim) @ layer["o"]
                    m = self._rms(h, layer["n2"])
                    gate, up = (m @ layer["gu"]).chunk(2, dim=-1)
                    h = h + (f.silu(gate) * up) @ layer["down"]
                logits = self._rms(h, self.final_norm) @ self.lm_head
                return logits.argmax(dim=-1)

            return decode, tokens
        tokens = t.randint(0, s.vocab, (b, ctx), device=self.device)
        cos, sin = self._rope(t.arange(ctx, device=self.device))
        cos, sin = cos[None, None], sin[None, None]

        def prefill() -> Any:
            h = self.embed[tokens]  # (b, ctx, hidden)
            for i, layer in enumerate(self.layers):
                a = self._rms(h, layer["n1"])
                qkv = a @ layer["qkv"]
                q = qkv[..., : s.heads * s.head_dim].view(b, ctx, s.heads, s.head_dim)
                k = qkv[..., s.heads * s.head_dim: (s.heads + s.kv_heads) * s.head_dim].view(
                    b, ctx, s.kv_heads, s.head_dim)
                v = qkv[..., (s.heads + s.kv_heads) * s.head_dim:].view(
                    b, ctx, s.kv_heads, s.head_dim)
                q = self._rotate(q.transpose(1, 2), cos, sin)
                k = self._rotate(k.transpose(1, 2), cos, sin)
                cache[i, 0].copy_(k)
                cache[i, 1].copy_(v.transpose(1, 2))
                if gqa:
                    o = f.scaled_dot_product_attention(q, cache[i, 0], cache[i, 1],
                                                       is_causal=True, enable_gqa=True)
                else:
                    o = f.scaled_dot_product_attention(
                        q, cache[i, 0].repeat_interleave(group, dim=1),
                        cache[i, 1].repeat_interleave(group, dim=1), is_causal=True)
                h = h + o.transpose(1, 2).reshape(b, ctx, s.heads * s.head_dim) @ layer["o"]
                m = self._rms(h, layer["n2"])
                gate, up = (m @ layer["gu"]).chunk(2, dim=-1)
                h = h + (f.silu(gate) * up) @ layer["down"]
            logits = self._rms(h[:, -1], self.final_norm) @ self.lm_head
            return logits.argmax(dim=-1)

        return prefill, tokens


def _measure(torch: Any, dec: _Decoder, bucket: GpuBucket, opts: GpuProfileOptions, *,
             nvml: NvmlBackend, nvml_index: int) -> tuple[ProfileRow, bool]:
    """Time one bucket; returns its row and whether a CUDA graph was used."""
    step, _ = dec.step_fn(bucket)
    graph = None
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run: Callable[[], Any] = graph.replay
        except Exception:  # capture unsupported here: time eager launches instead
            graph = None
            torch.cuda.synchronize()
            run = step
        for _ in range(opts.warmup_iters):
            run()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(opts.timed_iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(opts.timed_iters)]
        for s_ev, e_ev in zip(starts, ends, strict=True):
            s_ev.record()
            run()
            e_ev.record()
        torch.cuda.synchronize()
        times = [s_ev.elapsed_time(e_ev) for s_ev, e_ev in zip(starts, ends, strict=True)]
        median_s = max(statistics.median(times) / 1e3, 1e-5)
        reps = max(10, math.ceil(opts.energy_window_s / median_s))
        with NvmlSampler(nvml, nvml_index, CLOCK_SAMPLE_PERIOD_S) as sampler:
            torch.cuda.synchronize()
            e0 = nvml.energy_mj(nvml_index)
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            e1 = nvml.energy_mj(nvml_index)
    row = bucket_row(bucket, dec.shape, times_ms=times, energy_mj=e1 - e0, window_iters=reps,
                     window_s=t1 - t0, clock_samples_mhz=sampler.clocks_mhz)
    del graph
    return row, run is not step


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def run_gpu_profile(out: str | Path, opts: GpuProfileOptions | None = None, *,
                    log: TextIO | None = None) -> int:
    """Profile the real GPU into `out` (see the module docstring); returns rows written."""
    log = sys.stderr if log is None else log
    opts = opts or GpuProfileOptions()
    clock = _Clock()
    refuse_parquet(out, "write")
    out = Path(out)

    def say(msg: str) -> None:
        print(f"[gpu-profile {clock.elapsed():6.1f}s] {msg}", file=log, flush=True)

    say("SM clocks CANNOT be locked here and are never changed by this profiler (no NVML "
        "setter is called): the clock axis of this table covers only what the card does by "
        "itself - its top clock, and lower clocks where it throttles under the power cap "
        "(large prefills and large decode batches).")
    try:
        torch: Any = importlib.import_module("torch")
    except ImportError as e:
        raise GpuError("the GPU profiler needs PyTorch with CUDA (import torch failed: "
                       f"{e}); run it on the GPU machine") from e
    if not torch.cuda.is_available():
        raise GpuError("torch.cuda.is_available() is False: no CUDA GPU visible to PyTorch")
    dev = opts.device_index
    if not 0 <= dev < torch.cuda.device_count():
        raise GpuError(f"no CUDA device {dev} (PyTorch sees {torch.cuda.device_count()})")
    torch.cuda.set_device(dev)
    device = torch.device("cuda", dev)
    nvml = open_nvml()
    nvml_index = nvml_index_of_cuda_device(nvml, torch, dev)
    info = describe_gpu(nvml_index)
    free, total = torch.cuda.mem_get_info(dev)
    cap = kv_capacity_tokens(opts, free)
    if cap < 128 * 1024 // 64:
        raise GpuError(f"only {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB: the decoder "
                       f"needs {opts.shape.weight_bytes / GIB:.1f} GiB of weights plus KV room")
    plan = gpu_sweep_plan(opts, cap)
    kv_gib = cap * opts.shape.kv_bytes_per_token / GIB
    say(f"{info.get('name', torch.cuda.get_device_name(dev))} (NVML index {nvml_index}): "
        f"{free / GIB:.1f} GiB free; KV cap {cap} tokens ({kv_gib:.1f} GiB); "
        f"{len(plan)} buckets planned, budget {opts.budget_s:.0f} s")
    meta: dict[str, Any] = {
        "device": info, "torch": torch.__version__, "cuda": torch.version.cuda,
        "options": {k: (v._asdict() if hasattr(v, "_asdict") else v)
                    for k, v in opts._asdict().items()},
        "kv_cap_tokens": cap, "plan": [list(b) for b in plan], "measured": [],
        "skipped": [], "clocks_locked": False,
        "note": "SM clocks were never changed; sm_clock_mhz is what the card chose itself",
    }
    dec = _Decoder(torch, opts.shape, device, cap, opts.seed)
    torch.cuda.synchronize()
    say(f"random bf16 weights ready ({opts.shape.weight_bytes / 1e9:.2f} GB)")
    durations: list[float] = []
    failures = 0
    written = 0
    meta_path = out.with_name(out.name + ".meta.json")
    try:
        with TableWriter(out) as writer:
            for k, bucket in enumerate(plan):
                estimate = (statistics.median(durations[-5:]) * 1.3 if durations
                            else 3.0 * opts.energy_window_s + 2.0)
                if clock.elapsed() + estimate > opts.budget_s:
                    say(f"budget: stopping before bucket {k + 1}/{len(plan)} ({bucket})")
                    meta["skipped"] += [[*b, "budget"] for b in plan[k:]]
                    break
                t_b = time.perf_counter()
                try:
                    row, graphed = _measure(torch, dec, bucket, opts, nvml=nvml,
                                           nvml_index=nvml_index)
                except torch.cuda.OutOfMemoryError as e:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    say(f"skip {bucket}: out of memory ({str(e).splitlines()[0][:120]})")
                    meta["skipped"].append([*bucket, "oom"])
                    continue
                except RuntimeError as e:
                    failures += 1
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    say(f"skip {bucket}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    meta["skipped"].append([*bucket, repr(e)[:300]])
                    if failures >= 5 and written == 0:
                        raise GpuError(f"the first {failures} buckets all failed; last: {e}") from e
                    continue
                durations.append(time.perf_counter() - t_b)
                writer.write(row)
                written += 1
                meta["measured"].append([*bucket, graphed])
                say(f"{k + 1}/{len(plan)} {bucket.phase} b={bucket.batch} ctx={bucket.ctx}: "
                    f"{row.iter_ms:.3f} ms, {row.avg_power_w:.0f} W, "
                    f"{row.sm_clock_mhz:.0f} MHz{'' if graphed else ' (eager)'}")
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        say("interrupted: keeping the rows measured so far")
    finally:
        meta["rows"] = written
        meta["elapsed_s"] = clock.elapsed()
        try:
            meta_path.write_text(json.dumps(meta, indent=1, default=str) + "\n",
                                 encoding="utf-8")
        except OSError as e:
            say(f"could not write {meta_path}: {e}")
        nvml.close()
    say(f"wrote {written} rows to {out} (and {meta_path.name}) in {clock.elapsed():.0f} s")
    return written

"""Real forward passes for the decode loop (`throttllem._gpulab.loop`): the Llama-3-8B-shaped
random-weight decoder of `decoder` (its weights, RMSNorm and rotary), run on ragged
batches the way a serving engine runs them.

One pass processes, as one token stream through every GEMM, one token for each decoding
sequence and the whole prompt of each sequence admitted in the pass; the new K/V rows go to
the sequences' KV regions in a flat cache (``[layers, rows, kv_heads, head_dim]``, one
contiguous region per sequence; which rows are in use is `loop`'s accounting).
Attention is FlashAttention-2 through ``torch.ops.aten._flash_attention_forward`` (varlen):

* decode rows: one query per sequence over its own c cached keys, read in place
  (``cu_seqlens_k`` = region starts, ``seqused_k`` = contexts), GQA native; in decode-only
  passes split-KV: each row's keys in `loop.decode_splits` chunks attended at once and
  merged by their log-sum-exps, rows longest first — without it a pass's time follows its
  longest context rather than Σ c (measured: residuals of a Σ c model correlated 0.91 with
  the longest context), which no (batch, KV tokens) model can see;
* prompts: causal varlen attention over the pass's own packed K/V.

Backends, probed at start against a float32 reference (`ATTENTION_BACKENDS`): ``flash``
(the above), ``flash-gather`` (decode keys first gathered into a packed copy, if ``seqused_k``
misbehaves), ``math`` (a per-sequence reference; CPU tests); split-KV is kept only if it
matches too.

Decode-only passes replay a CUDA graph per batch bucket (`loop.DECODE_BUCKETS`; the
batch is padded up to the bucket, padding rows attend one scratch key); passes that prefill
run eagerly (their GEMMs dominate launch costs, mostly). Every pass is timed by CUDA events
around all of its device work (metadata copies included). The SM clock and the energy
counter are read by a sampler thread every 20 ms (`throttllem._gpulab.sampler`: between
passes the reads would idle the GPU); a pass gets the latest clock and the last period's
board power × its time. **No clock, power limit or other GPU setting is ever
changed** (NVML getters only).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Final, NamedTuple

import numpy as np

from throttllem._gpu.nvml import NvmlBackend
from throttllem._gpulab.decoder import LLAMA3_8B, DecoderShape, _Decoder
from throttllem._gpulab.loop import (
    DECODE_BUCKETS,
    PassMeasurement,
    PassPlan,
    PassSpec,
    bucket_up,
    decode_splits,
    pass_spec,
    plan_pass,
    split_chunks,
)
from throttllem._gpulab.sampler import NvmlSampler, nvml_index_of_cuda_device, open_nvml

ATTENTION_BACKENDS: Final = ("flash", "flash-gather", "math")


class _SplitMeta(NamedTuple):
    splits: int
    cu_q: Any  # [rows·splits + 1]
    cu_k: Any  # chunk starts, then the scratch row
    used: Any  # keys per chunk
    mask: Any  # float32 [rows·splits]: 0 valid, −inf past the row's end


class _DecMeta(NamedTuple):
    cu_q: Any
    cu_k: Any
    used: Any
    gather: Any
    cu_gather: Any
    max_k: int
    split: _SplitMeta | None = None


class _PreMeta(NamedTuple):
    cu: Any
    max_len: int
    tokens: int


class TorchPassRunner:
    """Runs `PassSpec`s on one device (see the module docstring). `kv_capacity_tokens` rows
    of KV (plus scratch rows for padding), `token_slots` token-table slots."""

    def __init__(self, torch: Any, *, kv_capacity_tokens: int, shape: DecoderShape = LLAMA3_8B,
                 device: str = "cuda:0", token_slots: int = 4096, max_ctx: int = 8192,
                 graphs: bool = True, attention: str = "auto", seed: int = 0,
                 buckets: tuple[int, ...] = DECODE_BUCKETS, nvml: bool = True,
                 split_decode: bool = True, nvml_period_s: float | None = 0.02) -> None:
        t = torch
        self.torch = t
        self.device = t.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.shape = shape
        self.kv_capacity_tokens = kv_capacity_tokens
        self.token_slots = token_slots
        self.max_ctx = max_ctx
        self.buckets = tuple(sorted(buckets))
        self.scratch_row = kv_capacity_tokens
        self.scratch_slot = token_slots
        self.split_decode = split_decode
        self.notes: dict[str, Any] = {}
        bf16 = t.bfloat16
        s = shape
        t0 = time.perf_counter()
        self.dec = _Decoder(t, shape, self.device, 1, seed)
        self.dec.kv = None  # its own cache is unused here
        gen = t.Generator(device=self.device)
        gen.manual_seed(seed + 1)
        rows = kv_capacity_tokens + max(1024, self.buckets[-1] + 1)
        # random K/V (never zeros: zeros can run faster and draw less power than real data)
        self.kc = t.empty(s.layers, rows, s.kv_heads, s.head_dim, dtype=bf16, device=self.device)
        self.vc = t.empty_like(self.kc)
        for c in (self.kc, self.vc):
            for i in range(s.layers):
                c[i].normal_(0.0, 1.0, generator=gen)
        self.tok = t.randint(0, s.vocab, (token_slots + 1,), device=self.device, generator=gen)
        self.rand_tok = t.randint(0, s.vocab, (8192,), device=self.device, generator=gen)
        cos, sin = self.dec._rope(t.arange(max_ctx + 1, device=self.device))
        self.cos_tab, self.sin_tab = cos.contiguous(), sin.contiguous()
        self.notes["init_s"] = time.perf_counter() - t0
        self.nvml: NvmlBackend | None = None
        self.nvml_index = 0
        self.sampler: NvmlSampler | None = None
        if nvml and self.is_cuda:
            self.nvml = open_nvml()
            self.nvml_index = nvml_index_of_cuda_device(self.nvml, t, self.device.index or 0)
            if nvml_period_s is not None:
                self.sampler = NvmlSampler(self.nvml, self.nvml_index, nvml_period_s)
        self._e_last = self.nvml.energy_mj(self.nvml_index) if self.nvml else math.nan
        self.attention = "math"
        self.probe: dict[str, Any] = {}
        self.attention = self._pick_attention() if attention == "auto" else attention
        self.notes["split_decode"] = self.split_decode
        if self.is_cuda:
            self._ev0 = t.cuda.Event(enable_timing=True)
            self._ev1 = t.cuda.Event(enable_timing=True)
        self.graphs: dict[int, Any] = {}
        self.graph_logits: dict[int, Any] = {}
        if graphs and self.is_cuda and self.attention == "flash":
            try:
                self._capture()
            except Exception as e:  # no graphs here: every pass runs eagerly
                self.notes["graph_capture_error"] = repr(e)[:400]
                self.graphs.clear()
                self.graph_logits.clear()
                t.cuda.synchronize()

    # ------------------------------------------------------------------ metadata

    def _i32(self, a: np.ndarray[Any, Any]) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(
            self.device, non_blocking=True)

    def _i64(self, a: np.ndarray[Any, Any]) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(
            self.device, non_blocking=True)

    def _split_meta(self, plan: PassPlan) -> _SplitMeta:
        ns = decode_splits(plan.n_dec)
        c_start, c_used, valid = split_chunks(plan.dec_cu_k[:-1], plan.dec_used, ns,
                                              scratch_row=self.scratch_row)
        mask = np.where(valid, 0.0, -np.inf).astype(np.float32)
        return _SplitMeta(
            splits=ns, cu_q=self._i32(np.arange(c_start.size + 1)),
            cu_k=self._i32(np.concatenate((c_start, [self.scratch_row]))),
            used=self._i32(c_used),
            mask=self.torch.from_numpy(mask).to(self.device, non_blocking=True))

    def _metas(self, plan: PassPlan) -> tuple[_DecMeta | None, _PreMeta | None]:
        dec = pre = None
        split = (self._split_meta(plan) if self.split_decode and plan.n_dec
                 and not plan.n_prefill_tokens and self.attention != "flash-gather" else None)
        if plan.n_dec:
            gather = cu_g = None
            if self.attention == "flash-gather":
                gather = self._i64(plan.dec_gather)
                cu_g = self._i32(np.concatenate(([0], np.cumsum(plan.dec_used))))
            dec = _DecMeta(cu_q=self._i32(np.arange(plan.n_dec + 1)),
                           cu_k=self._i32(plan.dec_cu_k), used=self._i32(plan.dec_used),
                           gather=gather, cu_gather=cu_g, max_k=self.max_ctx, split=split)
        if plan.n_prefill_tokens:
            pre = _PreMeta(cu=self._i32(plan.pre_cu), max_len=plan.pre_max,
                           tokens=plan.n_prefill_tokens)
        return dec, pre

    # ------------------------------------------------------------------ the pass

    def _flash(self, q: Any, k: Any, v: Any, cu: tuple[Any, Any, int, int], *,
               causal: bool, used: Any = None) -> Any:
        """FlashAttention-2 varlen; `cu` = (cu_seqlens_q, cu_seqlens_k, max_q, max_k)."""
        cu_q, cu_k, max_q, max_k = cu
        return self.torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, seqused_k=used)[0]

    def _math(self, q: Any, keys: list[Any], vals: list[Any], causal: bool) -> Any:
        """Reference attention, one sequence at a time: q [T, H, D] split by `keys`."""
        t = self.torch
        s = self.shape
        group = s.heads // s.kv_heads
        outs = []
        row = 0
        for k, v in zip(keys, vals, strict=True):
            n_q = k.shape[0] if causal else 1
            qq = q[row: row + n_q].float().transpose(0, 1)  # [H, n_q, D]
            kk = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, c, D]
            vv = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
            o = t.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
            outs.append(o.transpose(0, 1).to(q.dtype))
            row += n_q
        return t.cat(outs) if outs else q[:0]

    def _chunk_attn(self, i: int, q: Any, sp: _SplitMeta, plan: PassPlan | None
                    ) -> tuple[Any, Any]:
        """Attention of each chunk query over its chunk: (out [C, H, D], lse [H, C])."""
        t = self.torch
        kc, vc = self.kc[i], self.vc[i]
        if self.attention == "flash":
            res = t.ops.aten._flash_attention_forward(
                q, kc, vc, sp.cu_q, sp.cu_k, 1, self.max_ctx, 0.0, False, False,
                seqused_k=sp.used)
            return res[0], res[1]
        assert plan is not None  # math: per chunk, on the host-side plan
        ns = sp.splits
        c_start, c_used, _ = split_chunks(plan.dec_cu_k[:-1], plan.dec_used, ns,
                                          scratch_row=self.scratch_row)
        s = self.shape
        group = s.heads // s.kv_heads
        outs, lses = [], []
        for c, (a, u) in enumerate(zip(c_start.tolist(), c_used.tolist(), strict=True)):
            kk = kc[a: a + u].float().repeat_interleave(group, dim=1).transpose(0, 1)
            vv = vc[a: a + u].float().repeat_interleave(group, dim=1).transpose(0, 1)
            sc = (q[c].float()[:, None, :] @ kk.transpose(1, 2))[:, 0, :] / math.sqrt(
                s.head_dim)  # [H, u]
            lses.append(t.logsumexp(sc, dim=-1))
            outs.append((t.softmax(sc, dim=-1)[:, None, :] @ vv)[:, 0, :].to(q.dtype))
        return t.stack(outs), t.stack(lses, dim=1)

    def _split_attend(self, i: int, qd: Any, sp: _SplitMeta, plan: PassPlan | None) -> Any:
        """Split-KV decode attention: every row's keys in `splits` chunks attended at once,
        merged by their log-sum-exps (softmax over chunks of the lse: the chunk weights)."""
        t = self.torch
        b, h, d = qd.shape
        ns = sp.splits
        o, lse = self._chunk_attn(i, qd.repeat_interleave(ns, dim=0), sp, plan)
        w = t.softmax((lse + sp.mask).view(h, b, ns), dim=-1)  # [H, b, ns]
        out = (o.view(b, ns, h, d) * w.permute(1, 2, 0).unsqueeze(-1)).sum(dim=1)
        return out.to(qd.dtype)

    def _attend(self, i: int, qkv: tuple[Any, Any, Any], *, n_dec: int, dec: _DecMeta | None,
                pre: _PreMeta | None, plan: PassPlan | None) -> Any:
        q, k, v = qkv
        t = self.torch
        parts = []
        kc, vc = self.kc[i], self.vc[i]
        if n_dec and dec is not None:
            qd = q[:n_dec].contiguous()
            if dec.split is not None:
                parts.append(self._split_attend(i, qd, dec.split, plan))
            elif self.attention == "flash":
                parts.append(self._flash(qd, kc, vc, (dec.cu_q, dec.cu_k, 1, dec.max_k),
                                         causal=False, used=dec.used))
            elif self.attention == "flash-gather":
                parts.append(self._flash(qd, kc.index_select(0, dec.gather),
                                         vc.index_select(0, dec.gather),
                                         (dec.cu_q, dec.cu_gather, 1, dec.max_k), causal=False))
            else:
                assert plan is not None
                st, us = plan.dec_cu_k[:-1].tolist(), plan.dec_used.tolist()
                parts.append(self._math(qd, [kc[a: a + u] for a, u in zip(st, us, strict=True)],
                                        [vc[a: a + u] for a, u in zip(st, us, strict=True)],
                                        False))
        if pre is not None:
            sl = slice(n_dec, n_dec + pre.tokens)
            qp, kp, vp = q[sl].contiguous(), k[sl].contiguous(), v[sl].contiguous()
            if self.attention in ("flash", "flash-gather"):
                parts.append(self._flash(qp, kp, vp, (pre.cu, pre.cu, pre.max_len, pre.max_len),
                                         causal=True))
            else:
                assert plan is not None
                cu = plan.pre_cu.tolist()
                parts.append(self._math(qp, [kp[a:b] for a, b in _pairs(cu)],
                                        [vp[a:b] for a, b in _pairs(cu)], True))
        return parts[0] if len(parts) == 1 else t.cat(parts)

    def _rot(self, x: Any, cos: Any, sin: Any) -> Any:
        """Rotary embedding (rotate-half convention, as `decoder`), in 4 kernels."""
        t = self.torch
        half = x.shape[-1] // 2
        rot = t.cat((-x[..., half:], x[..., :half]), dim=-1)
        return t.addcmul(x * cos, rot, sin)

    def _forward(self, tok_in: Any, pos: Any, write_idx: Any, *, n_dec: int,
                 dec: _DecMeta | None, pre: _PreMeta | None, out_rows: Any, out_slots: Any,
                 plan: PassPlan | None = None) -> Any:
        """One pass; returns the logits of the sampled rows (their argmax is written back to
        the token table)."""
        t = self.torch
        f = t.nn.functional
        s = self.shape
        d = self.dec
        n_tok = tok_in.shape[0]
        hq, hk = s.heads * s.head_dim, s.kv_heads * s.head_dim
        h = d.embed[tok_in]
        cos = self.cos_tab[pos].unsqueeze(1)
        sin = self.sin_tab[pos].unsqueeze(1)
        for i, layer in enumerate(d.layers):
            a = d._rms(h, layer["n1"])
            qkv = a @ layer["qkv"]
            qk = self._rot(qkv[:, : hq + hk].view(n_tok, s.heads + s.kv_heads, s.head_dim),
                           cos, sin)  # q and k heads rotated together
            q, k = qk[:, : s.heads], qk[:, s.heads:]
            v = qkv[:, hq + hk:].view(n_tok, s.kv_heads, s.head_dim)
            self.kc[i].index_copy_(0, write_idx, k)
            self.vc[i].index_copy_(0, write_idx, v)
            o = self._attend(i, (q, k, v), n_dec=n_dec, dec=dec, pre=pre, plan=plan)
            h = h + o.reshape(n_tok, hq) @ layer["o"]
            m = d._rms(h, layer["n2"])
            gate, up = (m @ layer["gu"]).chunk(2, dim=-1)
            h = h + (f.silu(gate) * up) @ layer["down"]
        logits = d._rms(h.index_select(0, out_rows), d.final_norm) @ d.lm_head
        self.tok.index_copy_(0, out_slots, logits.argmax(dim=-1))
        return logits

    def _eager(self, plan: PassPlan) -> Any:
        t = self.torch
        dec, pre = self._metas(plan)
        parts = []
        if plan.n_dec:
            parts.append(self.tok.index_select(0, self._i64(plan.dec_slots)))
        if plan.n_prefill_tokens:
            parts.append(self.rand_tok.index_select(0, self._i64(plan.pre_tok_index)))
        tok_in = parts[0] if len(parts) == 1 else t.cat(parts)
        return self._forward(tok_in, self._i64(plan.pos), self._i64(plan.write_idx),
                             n_dec=plan.n_dec, dec=dec, pre=pre,
                             out_rows=self._i64(plan.out_rows),
                             out_slots=self._i64(plan.out_slots), plan=plan)

    # ------------------------------------------------------------------ CUDA graphs

    _CMAX: Final = 1024  # split chunks a graph bucket may have (b · decode_splits(b))

    def _capture(self) -> None:
        t = self.torch
        top = self.buckets[-1]
        cm = self._CMAX
        self._g64 = t.zeros(3, top, dtype=t.int64, device=self.device)  # slots, pos, write
        self._g32 = t.zeros(2 * top + 1, dtype=t.int32, device=self.device)  # cu_k, used
        self._gc32 = t.zeros(2 * cm + 1, dtype=t.int32, device=self.device)  # chunks
        self._gmask = t.zeros(cm, dtype=t.float32, device=self.device)
        self._gcu_q = t.arange(cm + 1, dtype=t.int32, device=self.device)
        self._grows = t.arange(top, dtype=t.int64, device=self.device)
        self._pin64 = t.zeros(3, top, dtype=t.int64).pin_memory()
        self._pin32 = t.zeros(2 * top + 1, dtype=t.int32).pin_memory()
        self._pinc32 = t.zeros(2 * cm + 1, dtype=t.int32).pin_memory()
        self._pinmask = t.zeros(cm, dtype=t.float32).pin_memory()
        t0 = time.perf_counter()
        pool = t.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):
            spec = pass_spec([1] * b, [self.scratch_row + i for i in range(b)],
                             [self.scratch_slot] * b)
            self._load_static(plan_pass(spec, scratch_row=self.scratch_row,
                                        scratch_slot=self.scratch_slot, pad_to=b))

            def step(b: int = b) -> Any:
                slots = self._g64[0, :b]
                split = None
                if self.split_decode:
                    ns = decode_splits(b)
                    c = b * ns
                    split = _SplitMeta(splits=ns, cu_q=self._gcu_q[: c + 1],
                                       cu_k=self._gc32[: c + 1],
                                       used=self._gc32[cm + 1: cm + 1 + c],
                                       mask=self._gmask[:c])
                dec = _DecMeta(cu_q=self._gcu_q[: b + 1], cu_k=self._g32[: b + 1],
                               used=self._g32[top + 1: top + 1 + b], gather=None,
                               cu_gather=None, max_k=self.max_ctx, split=split)
                return self._forward(self.tok.index_select(0, slots), self._g64[1, :b],
                                     self._g64[2, :b], n_dec=b, dec=dec, pre=None,
                                     out_rows=self._grows[:b], out_slots=slots)

            with t.inference_mode():
                side = t.cuda.Stream()
                side.wait_stream(t.cuda.current_stream())
                with t.cuda.stream(side):
                    for _ in range(2):
                        step()
                t.cuda.current_stream().wait_stream(side)
                g = t.cuda.CUDAGraph()
                with t.cuda.graph(g, pool=pool):
                    out = step()
            self.graphs[b] = g
            self.graph_logits[b] = out
        t.cuda.synchronize()
        self.notes["graph_capture_s"] = time.perf_counter() - t0

    def _load_static(self, plan: PassPlan) -> None:
        top = self.buckets[-1]
        cm = self._CMAX
        b = plan.n_dec
        p64 = self._pin64.numpy()
        p64[0, :b] = plan.dec_slots
        p64[1, :b] = plan.pos
        p64[2, :b] = plan.write_idx
        p32 = self._pin32.numpy()
        p32[: b + 1] = plan.dec_cu_k
        p32[top + 1: top + 1 + b] = plan.dec_used
        self._g64.copy_(self._pin64, non_blocking=True)
        self._g32.copy_(self._pin32, non_blocking=True)
        if self.split_decode:
            ns = decode_splits(b)
            c_start, c_used, valid = split_chunks(plan.dec_cu_k[:-1], plan.dec_used, ns,
                                                  scratch_row=self.scratch_row)
            c = c_start.size
            pc = self._pinc32.numpy()
            pc[:c] = c_start
            pc[c] = self.scratch_row
            pc[cm + 1: cm + 1 + c] = c_used
            self._pinmask.numpy()[:c] = np.where(valid, 0.0, -np.inf)
            self._gc32.copy_(self._pinc32, non_blocking=True)
            self._gmask.copy_(self._pinmask, non_blocking=True)

    # ------------------------------------------------------------------ PassRunner

    def plan(self, spec: PassSpec, pad_to: int | None = None) -> PassPlan:
        return plan_pass(spec, scratch_row=self.scratch_row, scratch_slot=self.scratch_slot,
                         pad_to=pad_to, token_table=self.rand_tok.shape[0],
                         with_gather=self.attention == "flash-gather")

    def graph_bucket(self, spec: PassSpec) -> int | None:
        if not self.graphs or spec.prefill_tokens:
            return None
        return bucket_up(spec.batch, self.buckets)

    def run(self, spec: PassSpec, *, use_graph: bool = True) -> PassMeasurement:
        t = self.torch
        w0 = time.perf_counter()
        b = self.graph_bucket(spec) if use_graph else None
        plan = self.plan(spec, b)
        with t.inference_mode():
            if self.is_cuda:
                self._ev0.record()
            if b is not None:
                self._load_static(plan)
                self.graphs[b].replay()
            else:
                self._eager(plan)
            if self.is_cuda:
                self._ev1.record()
                self._ev1.synchronize()
                gpu_ms = float(self._ev0.elapsed_time(self._ev1))
            else:
                gpu_ms = (time.perf_counter() - w0) * 1e3
        clock = energy = math.nan
        if self.sampler is not None:
            clock, power = self.sampler.latest()
            # W · ms = mJ (board power over the last sampling period; 0 before the first)
            energy = power * gpu_ms if math.isfinite(power) else 0.0
        elif self.nvml is not None:
            clock = self.nvml.sm_clock_mhz(self.nvml_index)
            e = self.nvml.energy_mj(self.nvml_index)
            energy, self._e_last = e - self._e_last, e
        return PassMeasurement(gpu_ms=gpu_ms, wall_ms=(time.perf_counter() - w0) * 1e3,
                               clock_mhz=clock, energy_mj=energy, graphed=b is not None,
                               bucket=b if b is not None else spec.batch)

    # ------------------------------------------------------------------ checks

    def logits(self, spec: PassSpec, *, use_graph: bool = False) -> Any:
        """The pass's sampled-row logits (float32 copy), eager or from its graph."""
        t = self.torch
        with t.inference_mode():
            b = self.graph_bucket(spec) if use_graph else None
            if b is not None:
                self._load_static(self.plan(spec, b))
                self.graphs[b].replay()
                out = self.graph_logits[b][: spec.batch]
            else:
                out = self._eager(self.plan(spec))
            return out.float().clone()

    def forward_tokens(self, tokens: list[int], start_row: int, slot: int) -> Any:
        """Prefill explicit `tokens` into rows start_row… (checks); last-row logits."""
        t = self.torch
        n = len(tokens)
        spec = pass_spec([], [], [], prefill_len=[n], prefill_start=[start_row],
                         prefill_slot=[slot])
        plan = self.plan(spec)
        with t.inference_mode():
            dec, pre = self._metas(plan)
            out = self._forward(self._i64(np.asarray(tokens)), self._i64(plan.pos),
                                self._i64(plan.write_idx), n_dec=0, dec=dec, pre=pre,
                                out_rows=self._i64(plan.out_rows),
                                out_slots=self._i64(plan.out_slots), plan=plan)
            return out.float().clone()

    def _attention_error(self, spec: PassSpec, backend: str, split: bool) -> float:
        """Relative error of layer-0 attention under `backend` (split-KV decode if `split`)
        against the float32 per-sequence reference, on random q/k/v written to the cache."""
        t = self.torch
        s = self.shape
        plan = plan_pass(spec, scratch_row=self.scratch_row, scratch_slot=self.scratch_slot,
                         with_gather=True)
        g = t.Generator(device=self.device)
        g.manual_seed(11)
        q, k, v = (t.randn(plan.rows, h, s.head_dim, device=self.device, generator=g).to(
            t.bfloat16) for h in (s.heads, s.kv_heads, s.kv_heads))
        keep = (self.attention, self.split_decode)
        try:
            with t.inference_mode():
                w = self._i64(plan.write_idx)
                self.kc[0].index_copy_(0, w, k)
                self.vc[0].index_copy_(0, w, v)
                self.attention, self.split_decode = "math", False
                dec, pre = self._metas(plan)
                ref = self._attend(0, (q, k, v), n_dec=plan.n_dec, dec=dec, pre=pre,
                                   plan=plan).float()
                self.attention, self.split_decode = backend, split
                dec, pre = self._metas(plan)
                got = self._attend(0, (q, k, v), n_dec=plan.n_dec, dec=dec, pre=pre,
                                   plan=plan).float()
            return float((got - ref).norm() / ref.norm())
        finally:
            self.attention, self.split_decode = keep

    def _pick_attention(self) -> str:
        """The first backend whose attention (layer 0, random q/k/v, a ragged mixed pass and
        a ragged decode-only pass) matches the float32 reference within bf16 error; split-KV
        decoding is kept only if it matches too."""
        if not self.is_cuda:
            return "math"
        rng = np.random.default_rng(7)
        ctx = [5, 300, 1000, 37, 4000, 1]
        lens = [7, 129]
        sizes = ctx + lens
        starts = np.cumsum([0, *sizes[:-1]]) + int(
            rng.integers(0, self.kv_capacity_tokens - sum(sizes)))
        n = len(ctx)
        mixed = pass_spec(ctx, starts[:n], np.arange(n), prefill_len=lens,
                          prefill_start=starts[n:], prefill_slot=[n, n + 1])
        decode = pass_spec(ctx, starts[:n], np.arange(n))
        want_split = self.split_decode
        for name in ("flash", "flash-gather"):
            try:
                err = self._attention_error(mixed, name, False)
                self.probe[name] = err
                if not (math.isfinite(err) and err < 2e-2):
                    continue
                if want_split and name == "flash":
                    try:
                        e_split = self._attention_error(decode, name, True)
                    except Exception as e:  # split-KV unavailable: decode unsplit
                        e_split = math.nan
                        self.probe["flash-split-error"] = repr(e)[:300]
                    self.probe["flash-split"] = e_split
                    self.split_decode = math.isfinite(e_split) and e_split < 2e-2
                else:
                    self.split_decode = False
                return name
            except Exception as e:  # a backend this build lacks
                self.probe[name] = repr(e)[:300]
        self.split_decode = False
        return "math"


def _pairs(cu: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(cu))

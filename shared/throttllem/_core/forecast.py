"""Project an engine instance's future iterations until its batch drains.

Given what runs now, what waits, and each request's predicted total output, `project` says
for every future iteration (pass) k = 0, 1, … T−1 of the instance:
- `decode_batch[k]`: sequences decoding one token (the performance model's "batch");
- `batch_size[k]`: decode + newly admitted sequences (what the engine reports);
- `kv_tokens[k]`: Σ contexts (prompt + generated) of the decoding sequences at pass start;
- `kv_blocks[k]`: KV blocks in use, decoding sequences' ceil(ctx/block) plus admissions'
  ceil((ctx+1)/block) (the engine's `kv_blocks_used`);
- `prefill_tokens[k]`: prompt tokens prefilled by admissions in pass k;
- `prefill_attn_tokens2[k]`: Σ L² over the prompts L prefilled in pass k (causal prefill
  attention costs that: a performance model with that input tells one 4k prompt from four
  1k ones, which `prefill_tokens` alone cannot);
and per request (running, then queued, then the candidate) the pass whose end emits its
next token (`first_token_iter`; a new request's first token, 0 for running ones) and its
last one (`last_token_iter`).

Batching semantics are the engine twin's (`throttllem._twin.engine`), minus preemption:
- FCFS admission, strict (the first request that does not fit stops admission), while the
  batch has a free slot, the KV cache has ceil((ctx+1)/block) free blocks beyond the
  watermark (no watermark when the engine would otherwise be empty), and the per-pass token
  budget (`max_batched_tokens`, decode tokens count 1 each) has room for the prefill; the
  first prefill of a pass may exceed the budget;
- an admitted request prefills in that pass and emits its next token at the pass end, then
  decodes one token per pass; every running request decodes one token per pass;
- a request leaves after its target: ceil(predicted total) tokens (≥ 1); one already at or
  beyond its prediction is assumed to emit exactly one more token.
Preemption is not modelled: `kv_overflow_iter` is the first pass in which the decoding
sequences alone would need more blocks than exist (the engine would preempt there), −1 if
none. A controller should treat an overflowing projection as not admissible.

Complexity (N running, Q queued, T passes, B tokens per block): every request decodes a
known range of passes, so contributions are ranges turned into per-pass series with
difference arrays (np.bincount) and one cumulative sum: O(N + Q + T) numpy work, no Python
loop over requests or passes. KV blocks grow as a staircase (one block every B tokens); the
steps of all requests form combs of period B, summed with one strided cumulative sum.
Queued requests are admitted in a Python loop over *admission events* (one per queued
request, not per pass): an O(1) scalar test of the pass where the previous one was
admitted; only when it does not fit, the admissions so far are folded into the series and
the later passes searched at once. Typical cost is two series builds; the worst case,
every queued request waiting for the batch to thin out, is O(Q·(N + Q + T)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_EMPTY_I: IntArray = np.zeros(0, dtype=np.int64)
_EMPTY_F: FloatArray = np.zeros(0, dtype=np.float64)
# Which series (row of `_decode_series`'s difference arrays) each of its 8 point rows feeds.
_SERIES_ROW: IntArray = np.asarray([0, 0, 1, 1, 2, 2, 3, 3], dtype=np.int64)


@dataclass(frozen=True, slots=True)
class InstanceState:
    """What one engine instance holds now, as the controller sees it (no true lengths).

    Token counts are per request; `*_predicted_tokens` is the length model's median of the
    request's total generated tokens, `*_upper_tokens` its upper quantile. Queued requests
    are in FCFS order; `queued_generated_tokens` is non-zero only for preempted requests
    (they re-prefill prompt + generated). Engine limits mirror `EngineLimits` in the twin's
    profile (`kv_watermark_blocks` = int(kv_watermark · kv_blocks)).
    """

    running_prompt_tokens: IntArray
    running_generated_tokens: IntArray
    running_predicted_tokens: FloatArray
    running_upper_tokens: FloatArray
    queued_prompt_tokens: IntArray
    queued_predicted_tokens: FloatArray
    queued_upper_tokens: FloatArray
    kv_block_tokens: int
    kv_blocks_total: int
    max_batch: int
    max_batched_tokens: int
    kv_watermark_blocks: int = 0
    queued_generated_tokens: IntArray | None = None

    def __post_init__(self) -> None:
        n = self.running_prompt_tokens.shape
        q = self.queued_prompt_tokens.shape
        if (self.running_generated_tokens.shape != n or self.running_predicted_tokens.shape != n
                or self.running_upper_tokens.shape != n or len(n) != 1):
            raise ValueError("running_* arrays must be 1-D and of equal length")
        if (self.queued_predicted_tokens.shape != q or self.queued_upper_tokens.shape != q
                or len(q) != 1 or (self.queued_generated_tokens is not None
                                   and self.queued_generated_tokens.shape != q)):
            raise ValueError("queued_* arrays must be 1-D and of equal length")
        if min(self.kv_block_tokens, self.kv_blocks_total, self.max_batch,
               self.max_batched_tokens) < 1 or self.kv_watermark_blocks < 0:
            raise ValueError("engine limits must be positive (watermark ≥ 0)")

    @classmethod
    def idle(cls, *, kv_block_tokens: int, kv_blocks_total: int, max_batch: int,
             max_batched_tokens: int, kv_watermark_blocks: int = 0) -> InstanceState:
        """An instance with nothing running or queued."""
        return cls(_EMPTY_I, _EMPTY_I, _EMPTY_F, _EMPTY_F, _EMPTY_I, _EMPTY_F, _EMPTY_F,
                   kv_block_tokens=kv_block_tokens, kv_blocks_total=kv_blocks_total,
                   max_batch=max_batch, max_batched_tokens=max_batched_tokens,
                   kv_watermark_blocks=kv_watermark_blocks)

    @property
    def n_running(self) -> int:
        return int(self.running_prompt_tokens.size)

    @property
    def n_queued(self) -> int:
        return int(self.queued_prompt_tokens.size)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A request the controller considers admitting; it joins the end of the queue."""

    prompt_tokens: int
    predicted_tokens: float
    upper_tokens: float


@dataclass(frozen=True, slots=True)
class Projection:
    """Per-pass series (length T) and per-request token passes (length N + Q [+ 1])."""

    decode_batch: IntArray
    batch_size: IntArray
    kv_tokens: IntArray
    kv_blocks: IntArray
    prefill_tokens: IntArray
    first_token_iter: IntArray
    last_token_iter: IntArray
    generated_tokens: IntArray  # generated before pass 0
    total_tokens: IntArray  # generated when the request leaves
    n_running: int
    n_queued: int
    has_candidate: bool
    kv_overflow_iter: int
    kv_blocks_total: int
    prefill_attn_tokens2: IntArray  # (T,) Σ prompt² per pass; see the module docstring

    @property
    def n_iterations(self) -> int:
        return int(self.decode_batch.size)

    @property
    def n_requests(self) -> int:
        return int(self.first_token_iter.size)


def targets_tokens(predicted_tokens: FloatArray) -> IntArray:
    """Total tokens a request is projected to generate: ceil(prediction), at least 1."""
    return np.maximum(np.ceil(predicted_tokens), 1.0).astype(np.int64)


def _decode_series(start: IntArray, count: IntArray, ctx: IntArray, block: int,
                   n_passes: int) -> IntArray:
    """Rows (decoding sequences, Σ contexts, Σ KV blocks) for passes 0 … n_passes−1 of
    requests that decode passes [start, start+count), count ≥ 1, with context
    ctx + (k − start) at pass k. Difference arrays and one cumulative sum; no Python loop
    over requests.

    KV blocks of one request, ceil((ctx + j)/B), start at ceil(ctx/B) and step up by one
    at every j ≥ 1 with ctx + j ≡ 1 (mod B), i.e. at passes start + 1 − ctx + q·B: a comb
    of period B from q = ceil(ctx/B) to its end, the first q with a pass ≥ start + count,
    q = ceil((ctx + count − 1)/B) (the blocks at its last pass), summed over all requests
    with one strided cumulative sum. The weighted bincount is float64 (exact: integers far
    below 2**53); sums run on int64, whose cumulative sum is several times faster than
    float64's.
    """
    w_len = -(-(n_passes + 1 + block) // block) * block  # row length, a multiple of B
    n = start.size
    # ceil(ctx/B) and ceil((ctx + count − 1)/B): the blocks at a request's first and last pass
    blocks = np.empty((2, n), dtype=np.int64)
    blocks[0] = ctx
    np.add(ctx, count, out=blocks[1])
    blocks += _BLOCK_ROUND[block] if block in _BLOCK_ROUND else _block_round(block)
    blocks //= block
    # Difference arrays, one row each: + at start / − at end for (sequences, ctx − start,
    # blocks), and row 3 the block-step combs, all in one bincount: points (8, n) and
    # their weights, pairs of rows per series, offset by the series' place in the row.
    idx = np.empty((8, n), dtype=np.int64)
    np.add(start, _SERIES_OFFSET * w_len, out=idx[0:6:2])
    np.add(idx[0:6:2], count, out=idx[1:6:2])
    # The comb's +1 at its first step, its −1 at its first point ≥ end.
    np.multiply(blocks, block, out=idx[6:8])
    comb_base = start - ctx
    comb_base += 1 + 3 * w_len
    idx[6:8] += comb_base
    weights = np.empty((8, n))
    weights[0::6] = 1.0
    weights[1::6] = -1.0
    np.subtract(ctx, start, out=weights[2])
    np.negative(weights[2], out=weights[3])
    np.multiply(blocks, _PLUS_MINUS, out=weights[4:6])
    delta = (np.bincount(idx.reshape(-1), weights=weights.reshape(-1), minlength=4 * w_len)
             .astype(np.int64).reshape(4, w_len))
    delta[2] += delta[3].reshape(-1, block).cumsum(axis=0).reshape(-1)
    series: IntArray = np.cumsum(delta[:3, :n_passes], axis=1)
    series[1] += np.arange(n_passes) * series[0]
    return series


# Row offsets (in series lengths) of the + at start points of the three series.
_SERIES_OFFSET: IntArray = np.asarray([[0], [1], [2]], dtype=np.int64)
_PLUS_MINUS: IntArray = np.asarray([[1], [-1]], dtype=np.int64)
_BLOCK_ROUND: dict[int, IntArray] = {}


def _block_round(block: int) -> IntArray:
    """What `_decode_series` adds before dividing by the block size: ceil(ctx/B) and
    ceil((ctx + count − 1)/B)."""
    rounding = np.asarray([[block - 1], [block - 2]], dtype=np.int64)
    if len(_BLOCK_ROUND) < 64:
        _BLOCK_ROUND[block] = rounding
    return rounding


def project(state: InstanceState, *, use_upper: bool = False,
            candidate: Candidate | None = None) -> Projection:
    """Project every future pass until the instance drains (see the module docstring).

    `use_upper` projects with the upper-quantile lengths instead of the medians.
    Raises ValueError when a queued request could never be admitted (needs more KV blocks
    than the instance has).
    """
    block = state.kv_block_tokens
    total_blocks = state.kv_blocks_total
    r_prompt = state.running_prompt_tokens.astype(np.int64, copy=False)
    r_gen = state.running_generated_tokens.astype(np.int64, copy=False)
    r_target = targets_tokens(state.running_upper_tokens if use_upper
                              else state.running_predicted_tokens)
    r_remaining = np.maximum(r_target - r_gen, 1)
    r_ctx = r_prompt + r_gen
    n_run = r_ctx.size

    # The queue is short and walked one admission at a time anyway: plain Python lists.
    q_prompt = state.queued_prompt_tokens.tolist()
    q_pred = (state.queued_upper_tokens if use_upper else state.queued_predicted_tokens).tolist()
    q_gen = ([0] * len(q_prompt) if state.queued_generated_tokens is None
             else state.queued_generated_tokens.tolist())
    if candidate is not None:
        q_prompt.append(candidate.prompt_tokens)
        q_pred.append(candidate.upper_tokens if use_upper else candidate.predicted_tokens)
        q_gen.append(0)
    n_q = len(q_prompt)

    drained = int(r_remaining.max()) if n_run else 0  # first pass with nothing decoding
    # Decode pieces (start pass, passes, context at start) of admitted requests, decoding
    # after their prefill pass. The per-pass series is only needed where a request has to
    # wait for a later pass: it is built then (folding in every admission so far) and once
    # at the end. Pass 0 needs only two sums of the running requests.
    p_start: list[int] = []
    p_count: list[int] = []
    p_ctx: list[int] = []
    series: IntArray | None = None
    folded = 0
    dec0_n = n_run
    dec0_blocks = int(((r_ctx + (block - 1)) // block).sum()) if n_q and n_run else 0
    admitted_at: list[int] = []
    q_remaining: list[int] = []
    adm_events: list[tuple[int, int, int]] = []  # (pass, blocks, prefill tokens)
    max_batch = state.max_batch
    budget_total = state.max_batched_tokens
    watermark = state.kv_watermark_blocks
    k_prev = 0
    adm_n = adm_blocks = adm_tokens = 0  # admissions already in pass k_prev

    def build(n_passes: int) -> IntArray:
        if not p_start:  # only the running requests decode
            return _decode_series(np.zeros(n_run, dtype=np.int64), r_remaining, r_ctx, block,
                                  n_passes)
        # (start, count, context) of the running requests, then of the admitted ones
        pieces = np.empty((3, n_run + len(p_start)), dtype=np.int64)
        pieces[0, :n_run] = 0
        pieces[1, :n_run] = r_remaining
        pieces[2, :n_run] = r_ctx
        pieces[:, n_run:] = (p_start, p_count, p_ctx)
        return _decode_series(pieces[0], pieces[1], pieces[2], block, n_passes)

    for j in range(n_q):
        ctx = q_prompt[j] + q_gen[j]
        need = (ctx + block) // block  # ceil((ctx + 1) / block)
        if need > total_blocks:
            raise ValueError(f"queued request {j} needs {need} KV blocks to start; the "
                             f"instance has {total_blocks}")
        rem = max(max(math.ceil(q_pred[j]), 1) - q_gen[j], 1)
        if series is None:
            n_dec, used = dec0_n, dec0_blocks
        else:
            n_dec, used = int(series[0, k_prev]), int(series[2, k_prev])
        reserve = watermark if n_dec + adm_n else 0
        k = k_prev
        if not (n_dec + adm_n < max_batch
                and need <= total_blocks - used - adm_blocks - reserve
                and (adm_n == 0 or ctx <= budget_total - n_dec - adm_tokens)):
            if series is None or folded < len(p_start) or series.shape[1] <= drained:
                series = build(drained + 1)
                folded = len(p_start)
            # Later passes hold no admissions yet, so the budget test passes there (the
            # first prefill of a pass may exceed it). Pass `drained` is empty: it fits.
            dn = series[0, k_prev + 1: drained + 1]
            free = total_blocks - series[2, k_prev + 1: drained + 1]
            ok = (dn < max_batch) & (need <= free - np.where(dn > 0, watermark, 0))
            k = k_prev + 1 + int(np.argmax(ok))
            adm_n = adm_blocks = adm_tokens = 0
        admitted_at.append(k)
        q_remaining.append(rem)
        adm_events.append((k, need, ctx))
        adm_n += 1
        adm_blocks += need
        adm_tokens += ctx
        if rem > 1:
            p_start.append(k + 1)
            p_count.append(rem - 1)
            p_ctx.append(ctx + 1)
        drained = max(drained, k + rem)
        k_prev = k

    n_iter = drained
    if series is not None and folded == len(p_start) and series.shape[1] >= n_iter:
        dec = series[:, :n_iter]
    else:
        dec = build(n_iter)
    adm = np.zeros((4, n_iter), dtype=np.int64)
    for k, need, ctx in adm_events:
        adm[0, k] += 1
        adm[1, k] += need
        adm[2, k] += ctx
        adm[3, k] += ctx * ctx
    dec_n = dec[0]
    dec_blocks = dec[2]
    overflow = -1
    if n_iter and int(dec_blocks.max()) > total_blocks:
        overflow = int(np.argmax(dec_blocks > total_blocks))
    # Per request (running, then queued): first token pass, tokens remaining, generated
    # so far; then its last token pass and its total, computed on all at once.
    per_request = np.empty((5, n_run + n_q), dtype=np.int64)
    per_request[0, :n_run] = 0
    per_request[1, :n_run] = r_remaining
    per_request[2, :n_run] = r_gen
    if n_q:
        per_request[0:3, n_run:] = (admitted_at, q_remaining, q_gen)
    first, remaining, generated = per_request[0], per_request[1], per_request[2]
    # last = first + remaining − 1, total = generated + remaining
    np.add(per_request[0:3:2], remaining, out=per_request[3:5])
    per_request[3] -= 1
    return Projection(
        decode_batch=dec_n,
        batch_size=dec_n + adm[0],
        kv_tokens=dec[1],
        kv_blocks=dec_blocks + adm[1],
        prefill_tokens=adm[2],
        first_token_iter=first,
        last_token_iter=per_request[3],
        generated_tokens=generated,
        total_tokens=per_request[4],
        n_running=int(n_run),
        n_queued=n_q - (candidate is not None),
        has_candidate=candidate is not None,
        kv_overflow_iter=overflow,
        kv_blocks_total=total_blocks,
        prefill_attn_tokens2=adm[3],
    )

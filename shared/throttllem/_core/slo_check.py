"""Check a projection against every request's SLOs, for many candidate clocks at once.

Times are seconds after `now_s`, the moment the projection's pass 0 starts. With t[k, c] the
performance model's time of pass k at clock c, pass k ends at E[k, c] = Σ_{k' ≤ k} t[k', c].
Request i emits its next token at the end of pass f_i (`first_token_iter`) and its last at
the end of pass l_i; it leaves having generated n_i tokens (`total_tokens`).

Bounds per request come from its `SloClass` (the one source of the formulas): the TTFT
bound (ms) = `ttft_bound_ms(prompt)` and the TBT bound (ms) = `tbt_ms`, taken once per
request by `RequestSlo.from_classes`; the E2E bound is `SloClass.e2e_bound_ms(prompt, n_i)`
at the projected (predicted) length n_i, composed here as TTFT bound + TBT bound · (n_i − 1),
which a test pins to `SloClass.e2e_bound_ms`.

Projected metrics (a = arrival, s = first-token time, both known; "pending" = no token yet):
- TTFT (pending only)  = E[f_i] − a
- mean TBT             = (E[l_i] − s) / (n_i − 1), with s = E[f_i] when pending; this is the
                         whole-life mean the SLO is on, so time already spent counts;
- max TBT (remaining)  = max(E[f_i] − last token time (known only), t[f_i+1 … l_i])
- E2E                  = E[l_i] − a
Each SLO is a deadline on one token's time; slack (ms) is deadline minus projected time of
that token, so slacks of different SLOs compare directly:
- TTFT:  E[f_i] ≤ a + ttft_bound
- E2E:   E[l_i] ≤ a + e2e_bound(n_i)
- TBT:   E[l_i] ≤ s + tbt_bound · (n_i − 1)       (known s; pending: E[l_i] − E[f_i] ≤ tbt·(n_i−1))
A request with n_i = 1 has no TBT constraint. A clock is feasible when no request in
`must_meet` (default: all) has negative slack.

Fast path (`prepare`, then `feasible` / `margin_s`, used by the clock search): all deadlines
but the pending requests' TBT are absolute deadlines on a pass end, so they fold once per
projection into one deadline per checkpoint pass (the minimum over the requests whose first
or last token it emits). Feasibility at C clocks is then the (C, T) model evaluation,
segment sums between checkpoints, a cumulative sum over the S ≤ min(T, 2M) checkpoints and
a (C, S) comparison: no per-request work inside the clock loop. `margin_s` is the smallest
slack per clock (≥ 0 ⇔ feasible). `check` (= `prepare` + `report`) computes the
per-request report from the same deadlines and checkpoint sums, so it never disagrees
with `feasible`, not even at a tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from throttllem._core.forecast import Projection
from throttllem._core.perf import PerfModel
from throttllem._core.slo import SloClass

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
ArrayLike = npt.ArrayLike


def _f64(x: ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


@dataclass(frozen=True, slots=True)
class RequestSlo:
    """Per request, in projection order (running, queued, candidate): timing so far and SLO
    bounds. `first_token_s`/`last_token_s` are NaN for a request without a token yet."""

    arrival_s: FloatArray
    first_token_s: FloatArray
    last_token_s: FloatArray
    ttft_bound_ms: FloatArray
    tbt_bound_ms: FloatArray

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @classmethod
    def from_classes(cls, slos: Sequence[SloClass], *, prompt_tokens: ArrayLike,
                     arrival_s: ArrayLike, first_token_s: ArrayLike | None = None,
                     last_token_s: ArrayLike | None = None) -> RequestSlo:
        """Bounds from each request's class. A Python loop over requests: call it once per
        request when it arrives and keep the arrays, not on every decision."""
        prompts = np.asarray(prompt_tokens, dtype=np.int64).reshape(-1).tolist()
        if len(prompts) != len(slos):
            raise ValueError("one SLO class per request")
        arrival = _f64(arrival_s)
        nan = np.full(arrival.size, np.nan)
        return cls(
            arrival_s=arrival,
            first_token_s=nan if first_token_s is None else _f64(first_token_s),
            last_token_s=nan.copy() if last_token_s is None else _f64(last_token_s),
            ttft_bound_ms=np.array([c.ttft_bound_ms(p) for c, p in zip(slos, prompts,
                                                                      strict=True)]),
            tbt_bound_ms=np.array([c.tbt_ms for c in slos], dtype=np.float64),
        )

    @classmethod
    def for_request(cls, slo: SloClass, *, prompt_tokens: int, arrival_s: float,
                    first_token_s: float = math.nan,
                    last_token_s: float = math.nan) -> RequestSlo:
        """One request (e.g. the candidate)."""
        return cls(np.array([arrival_s]), np.array([first_token_s]), np.array([last_token_s]),
                   np.array([slo.ttft_bound_ms(prompt_tokens)]), np.array([slo.tbt_ms]))

    @staticmethod
    def concat(parts: Sequence[RequestSlo]) -> RequestSlo:
        """Join groups (running, queued, candidate) in projection order."""
        return RequestSlo(*(np.concatenate([getattr(p, name) for p in parts])
                            for name in RequestSlo.__slots__))


def e2e_bound_ms(ttft_bound_ms: ArrayLike, tbt_bound_ms: ArrayLike,
                 generated_tokens: ArrayLike) -> FloatArray:
    """Vectorized `SloClass.e2e_bound_ms`: TTFT bound + TBT bound · max(generated − 1, 0)."""
    gen = np.asarray(generated_tokens, dtype=np.float64)
    return np.asarray(np.asarray(ttft_bound_ms, dtype=np.float64)
                      + np.asarray(tbt_bound_ms, dtype=np.float64) * np.maximum(gen - 1.0, 0.0))


@dataclass(frozen=True, slots=True)
class SloProblem:
    """The clock-independent part of a check, prepared once per (projection, now).

    Checkpoints are the passes at whose end some request emits its first remaining or its
    last token (sorted, unique; S ≤ min(T, 2M)); pass ends are only ever needed there.
    """

    projection: Projection
    slo: RequestSlo
    now_s: float
    must_meet: BoolArray
    batch: FloatArray  # (1, T) model inputs, one row so the clock axis is the outer one
    kv_tokens: FloatArray
    prefill_tokens: FloatArray
    pending: BoolArray  # (M,) no token yet
    ttft_deadline_s: FloatArray  # (M,) +inf where not pending
    e2e_deadline_s: FloatArray  # (M,)
    tbt_deadline_s: FloatArray  # (M,) known first token: deadline of the last token
    span_s: FloatArray  # (M,) pending: allowed E[l] − E[f]; +inf where n = 1 or known
    segment_starts: IntArray  # (S,) first pass of each checkpoint's segment
    first_ckpt: IntArray  # (M,) checkpoint of each request's first remaining token
    last_ckpt: IntArray  # (M,) … and of its last token
    deadline_s: FloatArray  # (S,) earliest must-meet deadline on each checkpoint
    span_first: IntArray  # (P,) must-meet pending requests with a TBT span
    span_last: IntArray  # (P,)
    span_limit_s: FloatArray  # (P,)
    # (4, T) batch, kv_tokens, prefill_tokens (those are its rows) and Σ prompt² per pass
    pass_rows: FloatArray
    # The model's preparation of the pass rows (`PreparedPerfModel`), made on the first
    # probe round and reused by the later ones: id(model) -> (model, prepared or None).
    prepared: dict[int, tuple[PerfModel, Any]] = field(default_factory=dict, compare=False,
                                                       repr=False)


def prepare(projection: Projection, slo: RequestSlo, *, now_s: float,
            must_meet: BoolArray | None = None) -> SloProblem:
    """Fold every request's deadlines into per-checkpoint deadlines (module docstring).

    `now_s` is when pass 0 starts. `must_meet` selects the requests whose SLOs decide
    feasibility (default all); the others are still reported.
    """
    m = projection.n_requests
    if len(slo) != m:
        raise ValueError(f"RequestSlo has {len(slo)} requests, the projection {m}")
    if must_meet is None:
        mask = np.ones(m, dtype=np.bool_)
    else:
        mask = np.asarray(must_meet, np.bool_)
        if mask.shape != (m,):
            raise ValueError("must_meet needs one flag per request")
    pending = projection.generated_tokens == 0
    n = projection.total_tokens.astype(np.float64)
    n_minus_1 = n - 1.0
    since_arrival = slo.arrival_s - now_s
    ttft_dl = np.where(pending, since_arrival + slo.ttft_bound_ms / 1e3, np.inf)
    # `e2e_bound_ms`, inlined (the same operations)
    e2e_dl = since_arrival + (slo.ttft_bound_ms
                              + slo.tbt_bound_ms * np.maximum(n_minus_1, 0.0)) / 1e3
    tbt_total_s = slo.tbt_bound_ms * n_minus_1 / 1e3
    # A request with a token has n ≥ 2, so it always has a TBT deadline.
    tbt_dl = np.where(pending, np.inf, slo.first_token_s - now_s + tbt_total_s)
    if m and math.isnan(tbt_dl.min()):  # NaN propagates through the minimum
        raise ValueError("a request that generated tokens needs its first_token_s")
    span_on = pending & (n > 1)
    span = np.where(span_on, tbt_total_s, np.inf)

    # Token passes, last tokens then first ones (one array: one search, one scatter).
    tokens = np.concatenate((projection.last_token_iter, projection.first_token_iter))
    marked = np.zeros(projection.n_iterations, dtype=np.bool_)
    marked[tokens] = True
    ckpts = marked.nonzero()[0]
    # checkpoint of a marked pass: how many checkpoints come before it
    ckpt_of = ckpts.searchsorted(tokens)
    last_ckpt = ckpt_of[:m]
    first_ckpt = ckpt_of[m:]
    # Earliest deadline per checkpoint: last tokens (E2E, TBT) and first tokens (TTFT).
    on_ckpt = np.empty(2 * m)
    np.minimum(e2e_dl, tbt_dl, out=on_ckpt[:m])
    on_ckpt[m:] = ttft_dl
    if must_meet is not None:
        on_ckpt[:m][~mask] = np.inf
        on_ckpt[m:][~mask] = np.inf
        span_on &= mask
    deadline = np.full(ckpts.size, np.inf)
    np.minimum.at(deadline, ckpt_of, on_ckpt)
    span_idx = span_on.nonzero()[0]
    starts = np.empty_like(ckpts)
    if ckpts.size:
        starts[0] = 0
        starts[1:] = ckpts[:-1] + 1
    rows = np.empty((4, projection.n_iterations))
    rows[0] = projection.decode_batch
    rows[1] = projection.kv_tokens
    rows[2] = projection.prefill_tokens
    rows[3] = projection.prefill_attn_tokens2

    return SloProblem(
        projection=projection, slo=slo, now_s=now_s, must_meet=mask,
        batch=rows[0:1], kv_tokens=rows[1:2], prefill_tokens=rows[2:3], pending=pending,
        ttft_deadline_s=ttft_dl, e2e_deadline_s=e2e_dl, tbt_deadline_s=tbt_dl, span_s=span,
        segment_starts=starts, first_ckpt=first_ckpt, last_ckpt=last_ckpt,
        deadline_s=deadline, span_first=first_ckpt[span_idx], span_last=last_ckpt[span_idx],
        span_limit_s=span[span_idx], pass_rows=rows,
    )


def pass_times_s(problem: SloProblem, perf: PerfModel, clocks_mhz: FloatArray) -> FloatArray:
    """(C, T) seconds of every projected pass at every clock.

    The model gets pass rows of shape (1, T) and clocks of shape (C, 1): broadcasting then
    runs long inner loops over passes rather than short ones over a few clocks (≈2× faster
    for an element-wise model than (T, 1) × (1, C)).
    """
    prepare = getattr(perf, "prepare_passes", None)
    if prepare is not None:
        memo = problem.prepared
        hit = memo.get(id(perf))
        if hit is None or hit[0] is not perf:
            hit = (perf, prepare(problem.pass_rows))
            memo[id(perf)] = hit
        if hit[1] is not None:
            prepared: FloatArray = perf.prepared_time_s(  # type: ignore[attr-defined]
                hit[1], clocks_mhz)
            return prepared
    t = np.asarray(perf.iteration_time_s(problem.batch, problem.kv_tokens,
                                         problem.prefill_tokens, clocks_mhz.reshape(-1, 1)))
    shape = (clocks_mhz.size, problem.batch.shape[1])
    return t if t.shape == shape else np.broadcast_to(t, shape)


def _checkpoint_ends_s(problem: SloProblem, times: FloatArray) -> FloatArray:
    """(C, S) end of each checkpoint pass: segment sums, then a short cumulative sum.

    Summing segments (np.add.reduceat, vectorized) and accumulating only S of them is
    cheaper than a sequential cumulative sum over all T passes, and `feasible` and
    `report` share this exact arithmetic, so they never disagree at a tie.
    """
    ends: FloatArray = np.add.reduceat(times, problem.segment_starts, axis=1).cumsum(axis=1)
    return ends


def constrained_s(problem: SloProblem, perf: PerfModel,
                  clocks_mhz: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per clock, what the deadlines constrain: checkpoint ends (C, S) and the pending
    requests' first-to-last spans (C, P), in seconds."""
    ends = _checkpoint_ends_s(problem, pass_times_s(problem, perf, clocks_mhz))
    spans: FloatArray = ends.take(problem.span_last, axis=1)
    spans -= ends.take(problem.span_first, axis=1)
    return ends, spans


def margin_from(problem: SloProblem, ends: FloatArray, spans: FloatArray) -> FloatArray:
    """Smallest slack (s) per clock over every must-meet deadline, from `constrained_s`."""
    worst: FloatArray = np.minimum.reduce(problem.deadline_s - ends, axis=1, initial=np.inf)
    if spans.shape[1]:
        np.minimum(worst, np.minimum.reduce(problem.span_limit_s - spans, axis=1), out=worst)
    return worst


def margin_s(problem: SloProblem, perf: PerfModel, clocks_mhz: FloatArray) -> FloatArray:
    """Per clock: the smallest slack (s) over every must-meet deadline (+inf if none).

    ≥ 0 exactly when the clock is feasible: a − b ≥ 0 ⇔ a ≥ b for IEEE floats, so this is
    the same decision as comparing deadlines.
    """
    if problem.segment_starts.size == 0:
        return np.full(clocks_mhz.size, np.inf)
    return margin_from(problem, *constrained_s(problem, perf, clocks_mhz))


def feasible(problem: SloProblem, perf: PerfModel, clocks_mhz: FloatArray) -> BoolArray:
    """Per clock: do all must-meet requests meet every SLO? (the fast path)."""
    ok: BoolArray = margin_s(problem, perf, clocks_mhz) >= 0.0
    return ok


@dataclass(frozen=True, slots=True)
class SloReport:
    """Per clock (C) and per request (M, C): projected metrics, slack and misses.

    `ttft_ms` is NaN for requests that already have their first token; `tbt_max_ms` is over
    the remaining tokens (NaN when the last token time is unknown). `miss` flags every
    request with negative slack; `feasible` counts only the must-meet ones.
    """

    clocks_mhz: FloatArray
    feasible: BoolArray
    n_missing: IntArray
    ttft_ms: FloatArray
    tbt_mean_ms: FloatArray
    tbt_max_ms: FloatArray
    e2e_ms: FloatArray
    slack_ms: FloatArray
    miss: BoolArray

    def missing_requests(self, clock_index: int = 0) -> IntArray:
        """Indices (projection order) of the requests that miss at one clock."""
        return np.flatnonzero(self.miss[:, clock_index]).astype(np.int64)


def _remaining_max_gap_s(problem: SloProblem, times: FloatArray,
                         first_end: FloatArray) -> FloatArray:
    """Largest gap between consecutive remaining tokens per request, (C, M)."""
    p = problem.projection
    first = p.first_token_iter
    last = p.last_token_iter
    # Gaps after the first remaining token are pass times t[f+1 … l]. Requests with f = 0
    # read a running maximum; the few with f > 0 (queued) slice.
    prefix = np.zeros_like(times)
    if times.shape[1] > 1:
        prefix[:, 1:] = np.maximum.accumulate(times[:, 1:], axis=1)
    gap = prefix[:, last]
    for i in np.flatnonzero(first > 0).tolist():
        f, lst = int(first[i]), int(last[i])
        gap[:, i] = times[:, f + 1: lst + 1].max(axis=1) if lst > f else 0.0
    known = ~problem.pending
    lead = first_end[:, known] - (problem.slo.last_token_s[known] - problem.now_s)
    gap[:, known] = np.maximum(gap[:, known], lead)
    return gap


def report(problem: SloProblem, perf: PerfModel, clocks_mhz: ArrayLike) -> SloReport:
    """The full per-request report at each of `clocks_mhz` (see the module docstring).

    O(T·C + M·C): evaluate it on the clocks you report on, and use `feasible` to search.
    """
    clocks = _f64(clocks_mhz)
    p = problem.projection
    m = p.n_requests
    if p.n_iterations == 0:
        empty = np.zeros((m, clocks.size))
        return SloReport(clocks, np.ones(clocks.size, np.bool_), np.zeros(clocks.size, np.int64),
                         empty, empty, empty, empty, empty, np.zeros((m, clocks.size), np.bool_))
    times = pass_times_s(problem, perf, clocks)
    ends = _checkpoint_ends_s(problem, times)
    first_end = ends[:, problem.first_ckpt]  # (C, M)
    last_end = ends[:, problem.last_ckpt]
    pending = problem.pending
    since_arrival = problem.slo.arrival_s - problem.now_s
    first_time = np.where(pending, first_end, problem.slo.first_token_s - problem.now_s)
    n = p.total_tokens.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tbt_mean = np.where(n > 1, (last_end - first_time) / (n - 1.0), 0.0)
    ttft_slack = problem.ttft_deadline_s - first_end
    e2e_slack = problem.e2e_deadline_s - last_end
    tbt_slack = np.where(pending, problem.span_s - (last_end - first_end),
                         problem.tbt_deadline_s - last_end)
    slack = np.minimum(np.minimum(ttft_slack, e2e_slack), tbt_slack)
    miss = slack < 0.0
    n_missing = (miss & problem.must_meet).sum(axis=1).astype(np.int64)
    return SloReport(
        clocks_mhz=clocks,
        feasible=n_missing == 0,
        n_missing=n_missing,
        ttft_ms=np.where(pending, (first_end - since_arrival) * 1e3, np.nan).T,
        tbt_mean_ms=(tbt_mean * 1e3).T,
        tbt_max_ms=(_remaining_max_gap_s(problem, times, first_end) * 1e3).T,
        e2e_ms=((last_end - since_arrival) * 1e3).T,
        slack_ms=(slack * 1e3).T,
        miss=miss.T,
    )


def check(projection: Projection, perf: PerfModel, clocks_mhz: ArrayLike, slo: RequestSlo,
          *, now_s: float, must_meet: BoolArray | None = None) -> SloReport:
    """Every request's projected SLOs at every clock: `prepare` + `report` in one call."""
    return report(prepare(projection, slo, now_s=now_s, must_meet=must_meet), perf, clocks_mhz)


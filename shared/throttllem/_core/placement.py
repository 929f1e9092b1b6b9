"""throttLL'eM's decisions: where a request goes, and the lowest clock every instance can run.

`InstanceTracker` is the controller's view of one engine instance, rebuilt only from events
(admissions it made, `engine.iteration`, `request.completed`): prompts, predictions and
tokens generated so far, never true lengths. `place` and `retune` are pure functions over
those views (time passed in) that the forecaster service and the evaluator both call.

Rules (the paper's, plus what a production controller needs):
- admit a request to the instance whose projection, with it added, meets every SLO at the
  lowest clock (ties: fewer requests, then name; with `Policy.pack`, more requests first,
  so batches grow where the SLOs still hold); projections whose KV cache would overflow are
  not admissible;
- requests that already miss their SLO even at the top clock (late arrivals, long queues)
  are lost causes: they no longer constrain the search, so one late request cannot pin the
  instance at the top clock forever;
- if no instance can take the request within its SLOs but it would miss even on an idle
  instance, holding it back only makes it later: it is admitted best-effort at the top clock;
  otherwise it is deferred and retried;
- clocks never go below `floor_mhz`, the setup's most energy-efficient clock: below it a
  slower iteration costs more static energy than the lower clock saves;
- the projection holds only the requests admitted so far, but the engine keeps admitting
  and prefills every new prompt inside the running requests' passes: each instance's
  prompt tokens admitted over the last `arrival_window_s` give the rate at which future
  prefills will stretch its passes (`ArrivalPrefillPerf`), so that steady load does not
  push TBT past its bound (the paper's controller leaves this out; `arrival_window_s=None`
  does too).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from throttllem._core.clock_search import (
    FeasibleClock,
    NoFeasibleClock,
    Strategy,
    SupportedClocks,
    min_feasible_clock,
    search_below,
    search_clock,
)
from throttllem._core.forecast import Candidate, InstanceState, project
from throttllem._core.perf import ArrivalPrefillPerf, PerfModel, is_monotone_in_clock
from throttllem._core.slo import SloClass
from throttllem._core.slo_check import RequestSlo, prepare
from throttllem._setup import Setup

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class EngineShape:
    """The scheduler limits of an engine instance, as the forecast needs them."""

    kv_block_tokens: int
    kv_blocks_total: int
    max_batch: int
    max_batched_tokens: int
    kv_watermark_blocks: int = 0
    max_model_len: int | None = None  # the context window (prompt + generated), if bounded

    @classmethod
    def of(cls, setup: Setup) -> EngineShape:
        engine = setup.engine
        return cls(kv_block_tokens=engine.block_tokens, kv_blocks_total=engine.kv_blocks,
                   max_batch=engine.max_batch, max_batched_tokens=engine.max_batched_tokens,
                   kv_watermark_blocks=int(engine.kv_watermark * engine.kv_blocks),
                   max_model_len=setup.model.max_model_len)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds above its admission watermark."""
        return (self.kv_blocks_total - self.kv_watermark_blocks) * self.kv_block_tokens


def never_fits(shape: EngineShape, prompt_tokens: int) -> str | None:
    """Why an engine of this shape can never serve a prompt (None: it can). Such a request
    must be refused at once: deferred, it would wait for ever and, FCFS, hold up every
    request behind it."""
    if shape.max_model_len is not None and prompt_tokens >= shape.max_model_len:
        return (f"prompt of {prompt_tokens} tokens leaves no room in the "
                f"{shape.max_model_len}-token context window")
    if prompt_tokens >= shape.kv_capacity_tokens:
        return (f"prompt of {prompt_tokens} tokens exceeds the {shape.kv_capacity_tokens}-token "
                f"KV cache")
    return None


def planned_lengths(shape: EngineShape, *, prompt_tokens: int, max_tokens: int,
                    predicted_tokens: float, upper_tokens: float) -> tuple[float, float]:
    """(median, upper) generation lengths to plan a request with: the prediction clipped to
    what the engine can generate for it (`max_tokens`, the context window, the KV cache above
    its watermark). A prediction beyond that would pin clocks up for tokens that never come,
    or defer the request for ever because no projection can hold it."""
    room = max_tokens
    if shape.max_model_len is not None:
        room = min(room, shape.max_model_len - prompt_tokens)
    room = max(min(room, shape.kv_capacity_tokens - prompt_tokens), 1)
    upper = min(max(upper_tokens, predicted_tokens), room)
    return min(predicted_tokens, upper), upper


# Per-request columns of `InstanceTracker`, (name, dtype, empty value). The float ones are
# rows of one matrix, ordered so that a snapshot's SLO arrays are consecutive rows of one
# take; the integer ones rows of another.
_COLUMNS: tuple[tuple[str, type, float], ...] = (
    ("predicted_tokens", np.float64, 0.0), ("upper_tokens", np.float64, 0.0),
    ("arrival_s", np.float64, 0.0), ("first_token_s", np.float64, math.nan),
    ("last_token_s", np.float64, math.nan), ("ttft_bound_ms", np.float64, 0.0),
    ("tbt_bound_ms", np.float64, 0.0),
    ("prompt_tokens", np.int64, 0), ("generated", np.int64, 0))
_FLOAT_COLUMNS = tuple(c for c, dtype, _ in _COLUMNS if dtype is np.float64)
_INT_COLUMNS = tuple(c for c, dtype, _ in _COLUMNS if dtype is np.int64)
_FLOAT_EMPTY = np.asarray([empty for _, dtype, empty in _COLUMNS if dtype is np.float64])
# First row of the SLO arrays (arrival, first token, last token, TTFT bound, TBT bound).
_SLO_ROW = _FLOAT_COLUMNS.index("arrival_s")


class InstanceTracker:
    """The requests admitted to one instance and not completed, as columns (one row per
    request, rows in admission order), so that a decision's snapshot is two array takes
    rather than a walk over Python objects. Completed rows are marked dead and compacted
    away once they outnumber the live ones."""

    def __init__(self, name: str, shape: EngineShape, *, capacity: int = 64) -> None:
        self.name = name
        self.shape = shape
        # Where this instance's last clock search landed: a warm start for the next one
        # (it changes how fast a search is, never its answer).
        self.last_clock_mhz: int | None = None
        # (arrival_s, prompt tokens) of recent admissions, for the rate of future prefills,
        # with their token sum and latest arrival kept as they come and go.
        self.recent: deque[tuple[float, int]] = deque()
        self._recent_tokens = 0
        self._latest_arrival_s = -math.inf
        # (base model, clocks, prefill rate, the model stretched by it): see `perf_for`.
        self.stretched: tuple[PerfModel, SupportedClocks, float, ArrivalPrefillPerf] | None = None
        self._row: dict[str, int] = {}  # request id -> row
        self._n = 0  # rows in use, live or dead
        self._alive = np.zeros(capacity, dtype=np.bool_)
        self._floats = np.repeat(_FLOAT_EMPTY[:, None], capacity, axis=1)
        self._ints = np.zeros((len(_INT_COLUMNS), capacity), dtype=np.int64)
        self._cols: dict[str, npt.NDArray[Any]] = {}
        self._bind_columns()
        # `snapshot`'s row order (running, then queued) and its running count, kept until
        # a request comes, goes or gets its first token
        self._order: tuple[npt.NDArray[np.intp], int] | None = None
        # The last pass's request ids, their rows and whether all of them have a token: an
        # engine's next pass usually holds the very same requests.
        self._last_pass: tuple[list[str], npt.NDArray[np.int64], bool] | None = None

    def _bind_columns(self) -> None:
        """`_cols[name]`: the column's row of its matrix (a view)."""
        self._cols = {**{c: self._floats[i] for i, c in enumerate(_FLOAT_COLUMNS)},
                      **{c: self._ints[i] for i, c in enumerate(_INT_COLUMNS)}}

    @property
    def requests(self) -> list[str]:
        """Ids of the tracked requests, in admission order."""
        return sorted(self._row, key=self._row.__getitem__)

    def column(self, name: str) -> npt.NDArray[Any]:
        """One column over the live requests, in admission order (a copy)."""
        return self._cols[name][: self._n][self._alive[: self._n]]

    def _grow(self) -> None:
        cap = 2 * len(self._alive)
        n = self._n
        self._alive = np.resize(self._alive, cap)
        self._alive[n:] = False
        floats = np.repeat(_FLOAT_EMPTY[:, None], cap, axis=1)
        floats[:, :n] = self._floats[:, :n]
        ints = np.zeros((len(_INT_COLUMNS), cap), dtype=np.int64)
        ints[:, :n] = self._ints[:, :n]
        self._floats, self._ints = floats, ints
        self._bind_columns()

    def _compact(self) -> None:
        live = np.flatnonzero(self._alive[: self._n])
        k = live.size
        new_row = np.empty(self._n, dtype=np.int64)
        new_row[live] = np.arange(k)
        for col, _, empty in _COLUMNS:
            c = self._cols[col]
            c[:k] = c[live]
            c[k: self._n] = empty
        self._alive[:k] = True
        self._alive[k: self._n] = False
        self._order = None
        self._last_pass = None
        self._row = {rid: int(new_row[r]) for rid, r in self._row.items()}
        self._n = k

    def admitted(self, request_id: str, *, prompt_tokens: int, predicted_tokens: float,
                 upper_tokens: float, arrival_s: float, slo: SloClass) -> None:
        self.recent.append((arrival_s, prompt_tokens))
        self._recent_tokens += prompt_tokens
        self._latest_arrival_s = max(self._latest_arrival_s, arrival_s)
        self.completed(request_id)  # admitted again: the latest admission counts
        if self._n == len(self._alive):
            self._grow()
        r = self._n
        self._n += 1
        self._row[request_id] = r
        self._order = None
        self._last_pass = None
        self._alive[r] = True
        c = self._cols
        c["prompt_tokens"][r] = prompt_tokens
        c["predicted_tokens"][r] = predicted_tokens
        c["upper_tokens"][r] = max(upper_tokens, predicted_tokens)
        c["arrival_s"][r] = arrival_s
        c["ttft_bound_ms"][r] = slo.ttft_bound_ms(prompt_tokens)
        c["tbt_bound_ms"][r] = slo.tbt_ms
        c["generated"][r] = 0
        c["first_token_s"][r] = math.nan
        c["last_token_s"][r] = math.nan

    def iteration(self, request_ids: list[str], end_s: float) -> None:
        """Every request in a pass emits one token at its end (ids not tracked here, admitted
        by someone else or completed already, are ignored)."""
        c = self._cols
        last = self._last_pass
        if last is not None and last[0] == request_ids:
            _, idx, started = last
        else:
            get = self._row.get
            rows = [r for r in map(get, request_ids) if r is not None]
            if not rows:
                return
            idx = np.asarray(rows, dtype=np.int64)
            started = False
        c["generated"][idx] += 1
        if not started:
            first = c["first_token_s"]
            new = idx[np.isnan(first[idx])]
            if new.size:
                first[new] = end_s
                self._order = None  # they are running now
            # every request of this pass has its first token from now on
            self._last_pass = (list(request_ids), idx, True)
        c["last_token_s"][idx] = end_s

    def completed(self, request_id: str) -> None:
        r = self._row.pop(request_id, None)
        if r is None:
            return
        self._alive[r] = False
        self._order = None
        self._last_pass = None
        dead = self._n - len(self._row)
        if dead > 32 and dead > len(self._row):
            self._compact()

    def __len__(self) -> int:
        return len(self._row)

    def prefill_rate(self, now_s: float, window_s: float) -> float:
        """Prompt tokens per second admitted here with arrivals in (now − window, now]."""
        recent = self.recent
        while recent and recent[0][0] <= now_s - window_s:
            self._recent_tokens -= recent.popleft()[1]
        if self._latest_arrival_s <= now_s:
            return self._recent_tokens / window_s
        # Some arrival is stamped after `now_s` (clocks of two processes): leave it out.
        return sum(tokens for t, tokens in recent if t <= now_s) / window_s

    def snapshot(self, candidate_slo: RequestSlo | None = None,
                 ) -> tuple[InstanceState, RequestSlo]:
        """Running (has a token) then queued, in admission order, with their SLO arrays;
        `candidate_slo` (one row) is appended to those as the last request."""
        order = self._order
        if order is None:
            live = self._alive[: self._n].nonzero()[0]
            started = self._ints[1, live] > 0
            n_run = int(np.count_nonzero(started))
            ordered = live if n_run == live.size else np.concatenate((live[started],
                                                                       live[~started]))
            order = self._order = (ordered, n_run)
        ordered, n_run = order
        ints = self._ints.take(ordered, axis=1)
        m = ordered.size
        if candidate_slo is None:
            floats = self._floats.take(ordered, axis=1)
        else:
            floats = np.empty((len(_FLOAT_COLUMNS), m + 1))
            self._floats.take(ordered, axis=1, out=floats[:, :m])
            floats[_SLO_ROW:, m] = (candidate_slo.arrival_s[0], candidate_slo.first_token_s[0],
                                    candidate_slo.last_token_s[0],
                                    candidate_slo.ttft_bound_ms[0],
                                    candidate_slo.tbt_bound_ms[0])
        prompt, generated = ints[0], ints[1]
        predicted, upper = floats[0], floats[1]
        s = self.shape
        state = InstanceState(
            prompt[:n_run], generated[:n_run], predicted[:n_run], upper[:n_run],
            prompt[n_run:], predicted[n_run:m], upper[n_run:m],
            kv_block_tokens=s.kv_block_tokens, kv_blocks_total=s.kv_blocks_total,
            max_batch=s.max_batch, max_batched_tokens=s.max_batched_tokens,
            kv_watermark_blocks=s.kv_watermark_blocks)
        r = _SLO_ROW
        slo = RequestSlo(floats[r], floats[r + 1], floats[r + 2], floats[r + 3], floats[r + 4])
        return state, slo


@dataclass(frozen=True, slots=True)
class Policy:
    """The knobs of the controller."""

    perf: PerfModel
    clocks: SupportedClocks
    floor_mhz: int
    use_upper: bool = True
    # "auto" (secant on a monotone model) probes few clocks; a model whose cost is per call
    # rather than per clock (the compiled grid) is faster with one "scan" of all clocks.
    strategy: Strategy = "auto"
    # Seconds of admissions that estimate the rate of future prefills; None: ignore them.
    arrival_window_s: float | None = 10.0
    # Start each instance's search at its last answer (`InstanceTracker.last_clock_mhz`):
    # the same clocks, found in fewer model calls. False only to measure that.
    warm_start: bool = True
    # Tie-break among instances that take a request at the same clock: False spreads (fewer
    # requests first); True packs (more requests first), so batches grow on the busiest
    # instances that still meet every SLO, and the rest idle (`admission_order`).
    pack: bool = False


def clock_policy(setup: Setup, perf: PerfModel, *, use_upper: bool = True,
                 floor_mhz: int | None = None) -> Policy:
    """The controller's clock knobs on a setup: its supported clocks and floor (the setup's
    own unless `floor_mhz` overrides it, as the evaluator's power-sensitivity runs do).

    The search is "auto": the secant search on a model monotone in the clock (the compiled
    grid is, by construction), the full scan otherwise. A grid query's cost grows with the
    clocks it is asked for (it gathers only those columns), so a few probed clocks beat one
    scan of all of them."""
    return Policy(perf=perf, clocks=SupportedClocks(setup.supported_clocks_mhz),
                  floor_mhz=setup.controller.floor_mhz if floor_mhz is None else floor_mhz,
                  use_upper=use_upper, strategy="auto")


@dataclass(frozen=True, slots=True)
class Placement:
    instance: str
    clock_mhz: int
    reason: str


def perf_for(tracker: InstanceTracker, policy: Policy, now_s: float) -> PerfModel:
    """The policy's model, with the instance's future prefills folded in (see the module
    docstring); the plain model while nothing arrived lately."""
    if policy.arrival_window_s is None:
        return policy.perf
    rate = tracker.prefill_rate(now_s, policy.arrival_window_s)
    if rate <= 0:
        return policy.perf
    # The same rate gives the same model: keep the last one (its stretch factors are
    # computed once), as the rate changes only when an admission enters or leaves the window.
    last = tracker.stretched
    if last is not None and last[0] is policy.perf and last[1] is policy.clocks \
            and last[2] == rate:
        return last[3]
    model = ArrivalPrefillPerf(policy.perf, rate, policy.clocks.mhz)
    tracker.stretched = (policy.perf, policy.clocks, rate, model)
    return model


def _search(tracker: InstanceTracker, policy: Policy, now_s: float,
            candidate: tuple[Candidate, RequestSlo] | None = None, *,
            below_mhz: int | None = None) -> tuple[int | None, BoolArray | None]:
    """Lowest feasible clock for the tracker's requests (and the candidate, with its SLO
    row), ignoring requests that miss even at the top clock; returns (clock or None, which
    requests are lost causes). Records the answer as the tracker's next warm start.
    `below_mhz`: only an answer below it matters; (None, None) when it is not."""
    clock, lost = _lowest_clock(tracker, policy, now_s, candidate, below_mhz=below_mhz)
    if clock is not None:
        tracker.last_clock_mhz = clock
    return clock, lost


def _lowest_clock(tracker: InstanceTracker, policy: Policy, now_s: float,
                  with_candidate: tuple[Candidate, RequestSlo] | None, *,
                  below_mhz: int | None = None) -> tuple[int | None, BoolArray | None]:
    candidate = None
    if with_candidate is not None:
        candidate, candidate_slo = with_candidate
        state, slo = tracker.snapshot(candidate_slo)
    else:
        state, slo = tracker.snapshot()
    perf = perf_for(tracker, policy, now_s)
    hint = tracker.last_clock_mhz if policy.warm_start else None
    projection = project(state, use_upper=policy.use_upper, candidate=candidate)
    if candidate is not None and projection.kv_overflow_iter >= 0:
        return None, None
    problem = prepare(projection, slo, now_s=now_s)
    if below_mhz is not None and _secant_applies(policy, perf):
        clock, top_ok = search_below(problem, perf, policy.clocks, floor_mhz=policy.floor_mhz,
                                     below_mhz=below_mhz, hint_mhz=hint)
        if top_ok:  # every request can make it: the answer is `clock` or not below
            return clock, None
    result = search_clock(problem, perf, policy.clocks, floor_mhz=policy.floor_mhz,
                          strategy=policy.strategy, hint_mhz=hint)
    if isinstance(result, FeasibleClock):
        return result.clock_mhz, None
    lost = result.report.miss[:, 0].copy()
    if candidate is not None and lost[-1]:
        return None, lost  # the candidate itself cannot make it here
    retry = min_feasible_clock(projection, perf, policy.clocks, slo, now_s=now_s,
                               floor_mhz=policy.floor_mhz, must_meet=~lost,
                               strategy=policy.strategy, hint_mhz=hint)
    if isinstance(retry, NoFeasibleClock):  # cannot happen for a monotone model
        return policy.clocks.mhz[-1], lost
    return retry.clock_mhz, lost


def _secant_applies(policy: Policy, perf: PerfModel) -> bool:
    """Whether the policy's search is the secant one (`search_below` needs its premise)."""
    if policy.strategy == "auto":
        return is_monotone_in_clock(perf, policy.clocks.mhz)
    return policy.strategy == "secant"


def admission_order(held: Mapping[str, int], *, pack: bool) -> list[str]:
    """Instances in the tie-break order of `place` (`held`: requests each holds).

    Spreading (fewer requests first) evens the batches out. Packing (more requests first)
    fills the busiest instance that still meets every SLO: a decode pass reads the weights
    once for the whole batch, so one instance at twice the batch serves the same tokens for
    far less energy than two half-empty ones, and the instances left with little work run
    at the floor or idle (their lock released). Ties: by name either way."""
    sign = -1 if pack else 1
    return sorted(held, key=lambda n: (sign * held[n], n))


def place(trackers: Mapping[str, InstanceTracker], candidate: Candidate,
          candidate_slo: RequestSlo, policy: Policy, *, now_s: float) -> Placement | None:
    """Where to admit a request and the clock that instance then needs; None: defer.

    Instances are tried in tie-break order (`admission_order`: the lowest clock, then fewer
    requests, or more with `policy.pack`, then name), so the first one that can take the
    request at the floor clock is the answer and the rest need no search."""
    best: tuple[int, int, str] | None = None
    hopeless = 0
    sign = -1 if policy.pack else 1
    order = admission_order({n: len(t) for n, t in trackers.items()}, pack=policy.pack)
    for name in order:
        tracker = trackers[name]
        # Later instances come later in the tie-break: only a lower clock beats the best.
        clock, lost = _search(tracker, policy, now_s, (candidate, candidate_slo),
                              below_mhz=None if best is None else best[0])
        if clock is None:
            hopeless += lost is not None and bool(lost[-1])
            continue
        key = (clock, sign * len(tracker), name)
        best = key if best is None or key < best else best
        if clock <= policy.floor_mhz:  # nothing later can beat it
            break
    if best is not None:
        return Placement(instance=best[2], clock_mhz=best[0], reason="lowest feasible clock")
    if hopeless == len(trackers) and _late_even_alone(candidate, candidate_slo, policy, now_s):
        name = min(trackers, key=lambda n: (len(trackers[n]), n))
        return Placement(instance=name, clock_mhz=policy.clocks.mhz[-1],
                         reason="best effort: misses its SLO even on an idle instance")
    return None


def _late_even_alone(candidate: Candidate, slo: RequestSlo, policy: Policy,
                     now_s: float) -> bool:
    any_tracker = InstanceState.idle(kv_block_tokens=16, kv_blocks_total=1 << 30,
                                     max_batch=1 << 20, max_batched_tokens=1 << 30)
    projection = project(any_tracker, use_upper=policy.use_upper, candidate=candidate)
    result = min_feasible_clock(projection, policy.perf, policy.clocks, slo, now_s=now_s,
                                floor_mhz=policy.floor_mhz)
    return isinstance(result, NoFeasibleClock)


def retune(tracker: InstanceTracker, policy: Policy, *, now_s: float) -> int:
    """The lowest clock at which the instance's current requests meet their SLOs."""
    if not len(tracker):
        return policy.floor_mhz
    clock, _ = _search(tracker, policy, now_s)
    return clock if clock is not None else policy.clocks.mhz[-1]

"""The lowest supported SM clock at which every request meets its SLOs, and hysteresis.

Search. When the performance model never slows down as the clock rises
(`perf.is_monotone_in_clock`, probed once per model and cached) every pass end is
non-increasing in the clock, so feasibility is monotone: infeasible below some clock,
feasible from it up, and any bracketing search finds the lowest feasible clock exactly.
One probe round evaluates a set of clocks at once (one (clocks × T) model evaluation);
its cost is a fixed numpy overhead (tens of µs: several calls over T-long arrays) plus
work ∝ clocks × T. Strategies:
- "binary": one clock per round, 1 + ⌈log2 C⌉ ≈ 8 rounds for the H100's 110 clocks;
  pays the fixed overhead 8 times.
- "scan": all C clocks in one round; ~15× more arithmetic than needed, and the only
  option that assumes nothing (a non-monotone model always gets it).
- "kary": `fanout` evenly spread clocks per round (first round from bottom to top), the
  bracket shrinks to the gap between the highest infeasible and lowest feasible probe;
  fanout 11 ≈ √110 → 2 rounds, ~21 clocks.
- "secant" (default for monotone models): probe bottom and top, then predict the answer:
  every checkpoint's end time and every span is taken as linear in 1/f between the
  bracket's two clocks (exact for a + b/f models), the clock at which each would meet its
  deadline is solved for, and the highest is the prediction; the `SECANT_WINDOW` = 2
  clocks at it (predicted answer and the one below) are probed. Exact models finish in
  2 rounds / 4 clocks; the twin's clock model (not linear in 1/f, slower below its HBM
  knee) in 3–4 rounds / ~8 clocks. After `SECANT_ROUNDS` prediction rounds the rest goes
  to k-ary. Predictions only choose where to probe.
The first round of every strategy includes the top clock (infeasible there → no clock
works) and, but for binary, the bottom one (light load: done at once). A warm start
(`hint_mhz`, the controller passes each instance's last answer) adds that clock and the one
below it to the secant search's first round: an answer that has not moved is then found in
one round.
Fewer clocks probed wins once a round's fixed cost is paid, hence the secant search by
default (`benchmarks/bench_controller.py` times every strategy on the same decisions; the
README gives the figures).

Hysteresis (`next_clock`): raise at once when the proposal is higher (SLOs need it); lower
only when `min_dwell_s` has passed since the last change and the proposal is at least
`down_margin_steps` supported-clock steps lower, so small oscillations of the proposal do
not flap the clock.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from throttllem._core.forecast import Projection
from throttllem._core.perf import PerfModel, is_monotone_in_clock
from throttllem._core.slo_check import (
    BoolArray,
    RequestSlo,
    SloProblem,
    SloReport,
    constrained_s,
    feasible,
    margin_from,
    prepare,
    report,
)
from throttllem._errors import ClockOutOfRangeError, ConfigError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

Strategy = Literal["auto", "secant", "kary", "binary", "scan"]

# Clocks per round of the k-ary search (also the secant search's fallback); ≈ √110 for the
# H100's 110 clocks → two rounds of ≤ 11 clocks (see the module docstring).
DEFAULT_FANOUT: Final = 11
# Clocks probed per prediction round of the secant search (see `_secant`).
SECANT_WINDOW: Final = 2
# Prediction rounds before the secant search hands the bracket to the k-ary search.
SECANT_ROUNDS: Final = 5


@dataclass(frozen=True, eq=False)
class SupportedClocks:
    """A GPU's supported SM clocks (MHz), strictly ascending; validated once, reused."""

    mhz: tuple[int, ...]
    as_f64: FloatArray = field(init=False, repr=False)
    inv_f64: FloatArray = field(init=False, repr=False)  # 1/f, for the secant search

    def __post_init__(self) -> None:
        mhz = tuple(int(c) for c in self.mhz)
        if not mhz or mhz[0] <= 0 or any(b <= a for a, b in itertools.pairwise(mhz)):
            raise ConfigError("supported clocks must be positive and strictly ascending")
        object.__setattr__(self, "mhz", mhz)
        object.__setattr__(self, "as_f64", np.asarray(mhz, dtype=np.float64))
        object.__setattr__(self, "inv_f64", 1.0 / self.as_f64)

    def __len__(self) -> int:
        return len(self.mhz)

    def index(self, clock_mhz: int) -> int:
        """Position of a supported clock; ClockOutOfRangeError for any other value."""
        i = bisect.bisect_left(self.mhz, clock_mhz)
        if i == len(self.mhz) or self.mhz[i] != clock_mhz:
            raise ClockOutOfRangeError(
                f"{clock_mhz} MHz is not a supported SM clock (supported: {self.mhz[0]}–"
                f"{self.mhz[-1]} MHz, {len(self.mhz)} clocks)")
        return i


@dataclass(frozen=True, slots=True)
class FeasibleClock:
    """The lowest clock at which every must-meet request meets its SLOs."""

    clock_mhz: int
    index: int  # into SupportedClocks.mhz
    clocks_evaluated: int
    strategy: str
    report: SloReport | None  # at the chosen clock (one column), when asked for


@dataclass(frozen=True, slots=True)
class NoFeasibleClock:
    """Not even the highest allowed clock meets every SLO: defer, queue or route elsewhere.
    `report` (at that clock) says who misses and by how much."""

    top_clock_mhz: int
    clocks_evaluated: int
    strategy: str
    report: SloReport


ClockSearchResult = FeasibleClock | NoFeasibleClock


def _narrow(problem: SloProblem, perf: PerfModel, clocks: FloatArray, lo: int, hi: int, *,
            fanout: int) -> tuple[int, int]:
    """Lowest feasible index given lo infeasible (or below the range) and hi feasible:
    probe `fanout` evenly spread clocks in between per round. Returns (index, probes).
    Candidate indices are plain Python ints: numpy's helpers cost more than the arithmetic.
    """
    evaluated = 0
    while hi - lo > 1:
        gap = hi - lo - 1
        m = min(fanout, gap)
        cands = sorted({lo + round(j * (gap + 1) / (m + 1)) for j in range(1, m + 1)})
        ok = feasible(problem, perf, clocks[cands])
        evaluated += len(cands)
        i = int(ok.argmax())
        if ok[i]:
            if i > 0:
                lo = cands[i - 1]
            hi = cands[i]
        else:
            lo = cands[-1]
    return hi, evaluated


def _kary(problem: SloProblem, perf: PerfModel, clocks: FloatArray, lo: int, hi: int, *,
          fanout: int) -> tuple[int | None, int]:
    """Lowest feasible index in (lo, hi] under monotone feasibility; (None, n) if hi fails.
    The first round spreads `fanout` probes from the bottom to the top clock."""
    m = min(fanout, hi - lo)
    if m == 1:
        cands = [hi]
    else:
        span = hi - lo - 1
        cands = sorted({lo + 1 + round(j * span / (m - 1)) for j in range(m)})
    ok = feasible(problem, perf, clocks[cands])
    if not ok[-1]:
        return None, len(cands)
    i = int(ok.argmax())
    found, more = _narrow(problem, perf, clocks, cands[i - 1] if i > 0 else lo, cands[i],
                          fanout=fanout)
    return found, len(cands) + more


def _secant(problem: SloProblem, perf: PerfModel, table: SupportedClocks, lo: int, hi: int,
            *, window: int, fanout: int, hint: int | None = None) -> tuple[int | None, int]:
    """Lowest feasible index in (lo, hi] under monotone feasibility, probing where each
    deadline is projected to bind.

    Round 1 probes the bottom and the top clock. From then on, with the bracket (highest
    known infeasible clock, lowest known feasible one) and the constrained times at both
    (every checkpoint's end, every pending request's span), each of them is taken as
    linear in 1/f between the two (exact for models of the form a + b/f, such as
    `AffinePerfModel`; a secant otherwise), the clock at which it would meet its deadline
    is solved for, and the highest of those is the predicted answer. `window` clocks
    around it are probed at once; the bracket shrinks to the probes and, as its ends come
    closer, the secants become exact. After `SECANT_ROUNDS` such rounds what is left goes
    to the k-ary search. The prediction only chooses *where* to probe: the bracket logic,
    hence the answer, is exact under monotone feasibility.

    `hint` (an index, e.g. where this instance's last search landed) adds the hint and the
    clock below it to round 1: when the answer has not moved, that round brackets it
    exactly and the search ends there (one model call instead of three to five); otherwise
    the bracket starts narrower. It changes how many rounds are run, never the answer.
    """
    clocks = table.as_f64
    if hi == lo + 1:
        cands = [hi]
    elif hint is None or not lo + 1 < hint < hi:
        cands = [lo + 1, hi]
    else:
        cands = sorted({lo + 1, hint - 1, hint, hi})
    ends, spans = constrained_s(problem, perf, clocks[cands])
    g = margin_from(problem, ends, spans)
    evaluated = len(cands)
    if not g[-1] >= 0.0:
        return None, evaluated
    if g[0] >= 0.0:
        return cands[0], evaluated
    # Bracket: the highest infeasible probe below the lowest feasible one.
    k = next(k for k, gv in enumerate(g.tolist()) if gv >= 0.0)
    found, more = _secant_rounds(problem, perf, table, bracket=(cands[k - 1], cands[k]),
                                 at_lo=(ends[k - 1], spans[k - 1]), at_hi=(ends[k], spans[k]),
                                 window=window, fanout=fanout)
    return found, evaluated + more


def _secant_rounds(problem: SloProblem, perf: PerfModel, table: SupportedClocks, *,
                   bracket: tuple[int, int], at_lo: tuple[FloatArray, FloatArray],
                   at_hi: tuple[FloatArray, FloatArray], window: int,
                   fanout: int) -> tuple[int, int]:
    """`_secant` from a bracket on: lo infeasible, hi feasible, with the constrained times
    (checkpoint ends, spans) at both. Returns (lowest feasible index, clocks probed)."""
    clocks = table.as_f64
    inv = table.inv_f64
    deadline = problem.deadline_s
    limit = problem.span_limit_s
    lo, hi = bracket
    (e_lo, s_lo), (e_hi, s_hi) = at_lo, at_hi
    evaluated = 0
    rounds = 0
    while hi - lo > 1:
        if rounds == SECANT_ROUNDS:
            found, more = _narrow(problem, perf, clocks, lo, hi, fanout=fanout)
            return found, evaluated + more
        rounds += 1
        du = inv[lo] - inv[hi]
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = (e_lo - e_hi) / du  # seconds of delay per unit of 1/f
            u_bind = np.where(rate > 0.0, (deadline - e_hi) / rate, np.inf).min(initial=np.inf)
            if limit.size:
                rate_s = (s_lo - s_hi) / du
                u_bind = min(u_bind, np.where(rate_s > 0.0, (limit - s_hi) / rate_s,
                                              np.inf).min())
        u_star = inv[hi] + float(u_bind)
        est = bisect.bisect_left(table.mhz, 1.0 / u_star) if u_star > 0.0 else hi
        first = min(max(est - window // 2, lo + 1), max(hi - window, lo + 1))
        cands = list(range(first, min(first + window, hi)))
        ends, spans = constrained_s(problem, perf, clocks[cands])
        g = margin_from(problem, ends, spans)
        evaluated += len(cands)
        for k, gv in enumerate(g.tolist()):
            if gv >= 0.0:
                hi, e_hi, s_hi = cands[k], ends[k], spans[k]
                break
            lo, e_lo, s_lo = cands[k], ends[k], spans[k]
    return hi, evaluated


def search_below(problem: SloProblem, perf: PerfModel, clocks: SupportedClocks, *,
                 floor_mhz: int, below_mhz: int,
                 hint_mhz: int | None = None) -> tuple[int | None, bool]:
    """Only an answer below `below_mhz` matters (a placement that another instance already
    takes at that clock): the lowest feasible clock in [floor, below) or None, and whether
    the top clock is feasible. When it is not, some request misses even there, and the
    caller's rule for such lost causes decides (the answer here says nothing then).

    The model must be monotone in the clock (the secant search's bracket logic, hence the
    same answer as `search_clock` wherever that answer is below `below_mhz`). One probe
    round (floor, the clock just below `below_mhz`, the top, and a warm start in between)
    settles most placements that cannot win; the rest is the secant search in that range.
    """
    lo = clocks.index(floor_mhz) - 1
    cap = clocks.index(below_mhz) - 1
    hi = len(clocks) - 1
    if cap <= lo:
        raise ClockOutOfRangeError(f"{below_mhz} MHz is not above the floor {floor_mhz} MHz")
    if problem.segment_starts.size == 0:
        return clocks.mhz[lo + 1], True
    probes = {lo + 1, cap, hi}
    if hint_mhz is not None:
        hint = bisect.bisect_left(clocks.mhz, hint_mhz)
        if lo + 1 < hint < cap:
            probes.update((hint - 1, hint))
    cands = sorted(probes)
    ends, spans = constrained_s(problem, perf, clocks.as_f64[cands])
    g = margin_from(problem, ends, spans).tolist()
    if not g[-1] >= 0.0:
        return None, False
    k = next(k for k, gv in enumerate(g) if gv >= 0.0)
    if cands[k] > cap:
        return None, True
    if k == 0:
        return clocks.mhz[cands[0]], True
    found, _ = _secant_rounds(problem, perf, clocks, bracket=(cands[k - 1], cands[k]),
                              at_lo=(ends[k - 1], spans[k - 1]), at_hi=(ends[k], spans[k]),
                              window=SECANT_WINDOW, fanout=DEFAULT_FANOUT)
    return clocks.mhz[found], True


def _scan(problem: SloProblem, perf: PerfModel, clocks: FloatArray, lo: int,
          hi: int) -> tuple[int | None, int]:
    ok = feasible(problem, perf, clocks[lo + 1: hi + 1])
    if not ok.any():
        return None, int(ok.size)
    return lo + 1 + int(np.argmax(ok)), int(ok.size)


def search_clock(problem: SloProblem, perf: PerfModel, clocks: SupportedClocks, *,
                 floor_mhz: int | None = None, ceiling_mhz: int | None = None,
                 strategy: Strategy = "auto", fanout: int = DEFAULT_FANOUT,
                 with_report: bool = False, hint_mhz: int | None = None) -> ClockSearchResult:
    """`min_feasible_clock` on an already prepared problem (see the module docstring)."""
    lo_i = 0 if floor_mhz is None else clocks.index(floor_mhz)
    hi_i = len(clocks) - 1 if ceiling_mhz is None else clocks.index(ceiling_mhz)
    if lo_i > hi_i:
        raise ClockOutOfRangeError(f"clock floor {floor_mhz} MHz is above the ceiling "
                                   f"{ceiling_mhz} MHz")
    if fanout < 1:
        raise ValueError("fanout must be at least 1")
    if strategy == "auto":
        strategy = "secant" if is_monotone_in_clock(perf, clocks.mhz) else "scan"
    table = clocks.as_f64
    found: int | None
    if problem.segment_starts.size == 0:  # nothing to serve: every clock works
        found, evaluated = lo_i, 0
    elif strategy == "scan":
        found, evaluated = _scan(problem, perf, table, lo_i - 1, hi_i)
    elif strategy == "secant":
        hint = bisect.bisect_left(clocks.mhz, hint_mhz) if hint_mhz is not None else None
        found, evaluated = _secant(problem, perf, clocks, lo_i - 1, hi_i,
                                   window=SECANT_WINDOW, fanout=fanout, hint=hint)
    else:
        found, evaluated = _kary(problem, perf, table, lo_i - 1, hi_i,
                                 fanout=1 if strategy == "binary" else fanout)
    if found is None:
        return NoFeasibleClock(top_clock_mhz=clocks.mhz[hi_i], clocks_evaluated=evaluated,
                               strategy=strategy,
                               report=report(problem, perf, table[hi_i: hi_i + 1]))
    rep = report(problem, perf, table[found: found + 1]) if with_report else None
    return FeasibleClock(clock_mhz=clocks.mhz[found], index=found, clocks_evaluated=evaluated,
                         strategy=strategy, report=rep)


def min_feasible_clock(projection: Projection, perf: PerfModel, clocks: SupportedClocks,
                       slo: RequestSlo, *, now_s: float, must_meet: BoolArray | None = None,
                       floor_mhz: int | None = None, ceiling_mhz: int | None = None,
                       strategy: Strategy = "auto", fanout: int = DEFAULT_FANOUT,
                       with_report: bool = False,
                       hint_mhz: int | None = None) -> ClockSearchResult:
    """The lowest supported clock in [floor, ceiling] at which every request of the
    projection (running, queued, candidate) in `must_meet` meets its SLOs.

    `now_s` is when the projection's pass 0 starts. Strategy "auto" is the secant search
    when the model is monotone in the clock, else the full scan. A projection whose KV
    overflows (`projection.kv_overflow_iter ≥ 0`) is checked as projected; whether to admit
    into it is the caller's call. `with_report` adds the per-request report at the chosen
    clock (one more model evaluation); a NoFeasibleClock always carries it, at the top
    clock, to say who misses. ClockOutOfRangeError for an unsupported floor/ceiling.
    `hint_mhz` (any clock, e.g. this instance's last answer) warm-starts the secant search:
    fewer rounds when the answer is near it, the same answer always.
    """
    problem = prepare(projection, slo, now_s=now_s, must_meet=must_meet)
    return search_clock(problem, perf, clocks, floor_mhz=floor_mhz, ceiling_mhz=ceiling_mhz,
                        strategy=strategy, fanout=fanout, with_report=with_report,
                        hint_mhz=hint_mhz)


# --------------------------------------------------------------------------- hysteresis


class ClockStep(NamedTuple):
    """The clock to apply and when it last changed."""

    clock_mhz: int
    changed_s: float
    reason: Literal["raise", "lower", "same", "dwell", "margin"]


def next_clock(previous_clock_mhz: int, previous_change_s: float, proposed_mhz: int,
               now_s: float, *, min_dwell_s: float, down_margin_steps: int,
               clocks: SupportedClocks | Sequence[int]) -> ClockStep:
    """Hysteresis on the searched clock (pure; `now_s` passed in).

    Higher proposal → take it now. Lower proposal → take it only when `now_s −
    previous_change_s ≥ min_dwell_s` and it is ≥ `down_margin_steps` supported steps lower;
    otherwise keep the previous clock ("dwell" / "margin"). Both clocks must be supported
    (ClockOutOfRangeError).
    """
    table = clocks if isinstance(clocks, SupportedClocks) else SupportedClocks(tuple(clocks))
    if min_dwell_s < 0 or down_margin_steps < 1:
        raise ConfigError("min_dwell_s must be ≥ 0 and down_margin_steps ≥ 1")
    prev_i = table.index(previous_clock_mhz)
    new_i = table.index(proposed_mhz)
    if new_i > prev_i:
        return ClockStep(proposed_mhz, now_s, "raise")
    if new_i == prev_i:
        return ClockStep(previous_clock_mhz, previous_change_s, "same")
    if now_s - previous_change_s < min_dwell_s:
        return ClockStep(previous_clock_mhz, previous_change_s, "dwell")
    if prev_i - new_i < down_margin_steps:
        return ClockStep(previous_clock_mhz, previous_change_s, "margin")
    return ClockStep(proposed_mhz, now_s, "lower")

"""Cost of one controller decision: forecast + SLO check + clock search over 110 clocks.

A decision is what the forecaster service does per candidate request: append the
candidate's SLO row, project the instance with the candidate at the end of the queue, and
search the lowest feasible clock among the H100's 110 (345–1980 MHz), with the per-request
report at the chosen clock. Instance states are synthetic but Azure-conversation-like:
prompts lognormal (median 1,000 tokens), outputs lognormal (median 200, long tail, capped
at 2,048), each running request somewhere along its output, 4 queued requests and the
candidate. The SLO class is set per size so the chosen clock lands mid-range (a decision
that is infeasible at the top clock exits after one round and would flatter the timings):
"standard" (50 ms TBT) at 256 running, a 130 ms-TBT class at 1,024.

Strategies compared on the very same decisions: the secant search (what "auto" uses for a
monotone model), the k-ary search at two fan-outs, binary search and the full scan (one
110 × T evaluation). Performance models: the affine roofline (cheap, analytic)
the twin's clock model through an adapter (roofline with a smooth max: pow-heavy), and the
shipped ONNX performance model compiled to its grid (what the forecaster uses). The states
are larger than that model's setup (max batch 256, 442,704 KV tokens, 8,192-token prefill
budget): the passes beyond the grid's edge (share printed at the end) are extrapolated with
the model's baseline, never by ONNX.
Timings are wall time on one core (numpy element-wise work is single-threaded; BLAS threads
are pinned to 1), p50/p99 over `--decisions` decisions, all in one run with the strategies
taking turns on each decision, so ratios compare. "fcst" is the forecast alone (candidate
SLO row + projection); "total" adds the SLO check and the clock search (no report); "cpu
p99" is the same decisions' CPU time of this thread (time the process spent descheduled by
other work on a shared machine is not in it, which wall-time p99 there mostly measures).

    python benchmarks/bench_controller.py [--decisions 300] [--json runs/bench_controller.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from throttllem._core.clock_search import (  # noqa: E402
    DEFAULT_FANOUT,
    FeasibleClock,
    Strategy,
    SupportedClocks,
    min_feasible_clock,
)
from throttllem._core.forecast import Candidate, InstanceState, project  # noqa: E402
from throttllem._core.perf import AffinePerfModel, FunctionPerfModel, PerfModel  # noqa: E402
from throttllem._core.slo import SloClass  # noqa: E402
from throttllem._core.slo_check import RequestSlo  # noqa: E402
from throttllem._setup import DEFAULT_SETUP  # noqa: E402

CLOCKS = SupportedClocks(tuple(range(345, 1981, 15)))
NOW_S = 10_000.0
QUEUED = 4
# Chosen so that the lowest feasible clock is mid-range under the affine model.
SLO_BY_SIZE = {256: SloClass(name="standard"),
               1024: SloClass(name="batch-ish", tbt_ms=130.0, ttft_base_ms=3000.0)}


@dataclass
class Case:
    state: InstanceState
    slo: RequestSlo  # running + queued rows, kept by the service between decisions
    candidate: Candidate
    candidate_slo: SloClass


def make_case(rng: np.random.Generator, n: int, slo: SloClass) -> Case:
    def prompts(k: int) -> Any:
        return np.clip(rng.lognormal(np.log(1000), 0.8, k), 16, 8000).astype(np.int64)

    def outputs(k: int) -> Any:
        return np.clip(rng.lognormal(np.log(200), 1.0, k), 1, 2048)

    r_prompt = prompts(n)
    r_pred = outputs(n)
    r_gen = np.maximum(1, (rng.random(n) * r_pred).astype(np.int64))
    q_prompt = prompts(QUEUED)
    q_pred = outputs(QUEUED)
    peak = int(np.sum(np.concatenate((r_prompt + 1.6 * r_pred, q_prompt + 1.6 * q_pred))))
    state = InstanceState(
        running_prompt_tokens=r_prompt, running_generated_tokens=r_gen,
        running_predicted_tokens=r_pred, running_upper_tokens=1.6 * r_pred,
        queued_prompt_tokens=q_prompt, queued_predicted_tokens=q_pred,
        queued_upper_tokens=1.6 * q_pred, kv_block_tokens=16,
        kv_blocks_total=peak // 16 + 4096, max_batch=n + QUEUED + 1,
        max_batched_tokens=16384, kv_watermark_blocks=64)
    # Running requests: decoded so far at ~0.6 of their bound per token.
    tbt_so_far_s = 0.6 * slo.tbt_ms / 1e3
    first = NOW_S - (r_gen - 1) * tbt_so_far_s
    arrival = np.concatenate((first - rng.uniform(0.05, 0.5, n),
                              NOW_S - rng.uniform(0.0, 0.2, QUEUED)))
    nan = np.full(QUEUED, np.nan)
    rows = RequestSlo.from_classes(
        [slo] * (n + QUEUED), prompt_tokens=np.concatenate((r_prompt, q_prompt)),
        arrival_s=arrival, first_token_s=np.concatenate((first, nan)),
        last_token_s=np.concatenate((NOW_S - rng.uniform(0, tbt_so_far_s, n), nan)))
    cand = Candidate(prompt_tokens=int(prompts(1)[0]), predicted_tokens=float(outputs(1)[0]),
                     upper_tokens=0.0)
    cand = Candidate(cand.prompt_tokens, cand.predicted_tokens, 1.6 * cand.predicted_tokens)
    return Case(state, rows, cand, slo)


def decide(case: Case, perf: PerfModel, strategy: Strategy, fanout: int,
           hint_mhz: int | None = None) -> tuple[float, float, int, int, int, float]:
    """One decision; returns (forecast s, total s, chosen clock or 0, clocks evaluated, T,
    total CPU s of this thread)."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    cand_row = RequestSlo.for_request(case.candidate_slo,
                                      prompt_tokens=case.candidate.prompt_tokens,
                                      arrival_s=NOW_S)
    slo = RequestSlo.concat((case.slo, cand_row))
    p = project(case.state, candidate=case.candidate)
    t1 = time.perf_counter()
    res = min_feasible_clock(p, perf, CLOCKS, slo, now_s=NOW_S, strategy=strategy,
                             fanout=fanout, hint_mhz=hint_mhz)
    t2 = time.perf_counter()
    c2 = time.thread_time()
    clock = res.clock_mhz if isinstance(res, FeasibleClock) else 0
    return t1 - t0, t2 - t0, clock, res.clocks_evaluated, p.n_iterations, c2 - c0


def twin_model() -> PerfModel | None:
    try:
        from throttllem._twin import clockmodel  # noqa: PLC0415
        from throttllem._twin.profile import load_profile  # noqa: PLC0415
    except ImportError:
        return None
    profile = load_profile(DEFAULT_SETUP)

    def fn(b: Any, kv: Any, pf: Any, c: Any) -> Any:
        return clockmodel.iteration_time_s(profile, batch=b, kv_tokens=kv, prefill_tokens=pf,
                                           clock_mhz=c)

    return FunctionPerfModel(fn, name="twin clockmodel")


def grid_model(name: str = DEFAULT_SETUP) -> tuple[PerfModel, tuple[float, float, float]] | None:
    """The forecaster's default: the shipped ONNX model (or model `name`) compiled to its
    grid; and the grid's edge (batch, KV tokens, prefill tokens)."""
    try:
        from throttllem._perf.runtime import PerfRuntime  # noqa: PLC0415
    except ImportError:
        return None
    runtime = PerfRuntime.load(name)
    assert runtime.grid is not None
    # as `load_perf_model` gives it to the controller: each problem's passes prepared once
    return (FunctionPerfModel(runtime.iteration_time_s, name="onnx grid", prepared=runtime),
            runtime.grid.edge)


def beyond_edge_share(cases: list[Case], edge: tuple[float, float, float]) -> float:
    """Share of the projected passes (candidate included) past the grid's edge, which the
    runtime extrapolates with the model's baseline."""
    out = total = 0
    for case in cases:
        p = project(case.state, candidate=case.candidate)
        out += int(((p.decode_batch > edge[0]) | (p.kv_tokens > edge[1])
                    | (p.prefill_tokens > edge[2])).sum())
        total += p.n_iterations
    return out / max(total, 1)


def hint_near(answer_mhz: int, offset: int | None) -> int | None:
    """A warm start `offset` clock steps from a decision's answer (None: cold; 0 MHz, an
    infeasible decision: no hint)."""
    if offset is None or not answer_mhz:
        return None
    i = min(max(CLOCKS.index(answer_mhz) + offset, 0), len(CLOCKS) - 1)
    return CLOCKS.mhz[i]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--decisions", type=int, default=300, help="decisions per row (≥ 200)")
    ap.add_argument("--states", type=int, default=30, help="distinct instance states per size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=Path("runs/bench_controller.json"))
    ap.add_argument("--perf-model", default=DEFAULT_SETUP,
                    help="the ONNX model of the 'onnx grid' rows (folder or shipped name)")
    args = ap.parse_args()

    models: list[tuple[str, PerfModel]] = [("affine", AffinePerfModel())]
    twin = twin_model()
    if twin is not None:
        models.append(("twin", twin))
    grid = grid_model(args.perf_model)
    if grid is not None:
        models.append(("onnx grid", grid[0]))
    # (label, strategy, fanout, warm start: None, or the hint's offset in clock steps from
    # the decision's answer; the controller hints each instance's last answer, which on the
    # conversation hour is the new answer for 49% of placements and 80% of retunes).
    strategies: list[tuple[str, Strategy, int, int | None]] = [
        ("secant (default)", "secant", DEFAULT_FANOUT, None),
        ("secant, warm @ans", "secant", DEFAULT_FANOUT, 0),
        ("secant, warm @ans-3", "secant", DEFAULT_FANOUT, -3),
        ("secant, warm @ans+3", "secant", DEFAULT_FANOUT, 3),
        (f"kary-{DEFAULT_FANOUT}", "kary", DEFAULT_FANOUT, None), ("kary-6", "kary", 6, None),
        ("binary", "binary", 1, None), ("scan-110", "scan", len(CLOCKS), None)]

    rows: list[dict[str, Any]] = []
    beyond: dict[int, float] = {}
    for n in args.sizes:
        rng = np.random.default_rng(args.seed + n)
        slo = SLO_BY_SIZE.get(n, SloClass(name="standard"))
        cases = [make_case(rng, n, slo) for _ in range(args.states)]
        if grid is not None:
            beyond[n] = beyond_edge_share(cases, grid[1])
        for model_name, perf in models:
            for _, strategy, fanout, _ in strategies:  # warm-up (and the monotonicity probe)
                for case in cases[:5]:
                    decide(case, perf, strategy, fanout)
            # Each case's answer (by the scan), for the warm-started rows' hints.
            answers = [decide(case, perf, "scan", len(CLOCKS))[2] for case in cases]

            # Strategies take turns on every decision, in a shuffled order (the first to see
            # a new state pays for cold caches, the one after the full scan for the memory
            # it released), so noise on the machine hits them alike and ratios compare.
            samples: list[list[tuple[float, float, int, int, int, float]]] = [
                [] for _ in strategies]
            for k in range(args.decisions):
                case, answer = cases[k % len(cases)], answers[k % len(cases)]
                for i in rng.permutation(len(strategies)).tolist():
                    _, strategy, fanout, offset = strategies[i]
                    got = decide(case, perf, strategy, fanout, hint_near(answer, offset))
                    if got[2] != answer:
                        raise SystemExit(f"{strategies[i][0]} chose {got[2]} MHz, the scan "
                                         f"{answer} MHz")
                    samples[i].append(got)
            for (label, _, fanout, _), got in zip(strategies, samples, strict=True):
                fc = [g[0] for g in got]
                tot = [g[1] for g in got]
                clocks = [g[2] for g in got]
                feasible_clocks = [c for c in clocks if c]
                rows.append({
                    "running": n, "model": model_name, "strategy": label,
                    "fanout": fanout, "decisions": args.decisions,
                    "passes_T_mean": float(np.mean([g[4] for g in got])),
                    "clocks_evaluated_mean": float(np.mean([g[3] for g in got])),
                    "forecast_ms_p50": pct(fc, 50) * 1e3,
                    "total_ms_p50": pct(tot, 50) * 1e3, "total_ms_p99": pct(tot, 99) * 1e3,
                    "cpu_ms_p99": pct([g[5] for g in got], 99) * 1e3,
                    "chosen_mhz_p50": (float(np.median(feasible_clocks))
                                       if feasible_clocks else None),
                    "infeasible_share": 1.0 - len(feasible_clocks) / len(clocks),
                })

    head = (f"{'N':>5} {'model':<7} {'strategy':<20} {'T':>6} {'evals':>5} "
            f"{'fcst p50':>9} {'total p50':>10} {'total p99':>10} {'cpu p99':>9} "
            f"{'clock p50':>9} "
            f"{'infeas':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        chosen = "—" if r["chosen_mhz_p50"] is None else f"{r['chosen_mhz_p50']:.0f}"
        print(f"{r['running']:>5} {r['model']:<7} {r['strategy']:<20} "
              f"{r['passes_T_mean']:>6.0f} {r['clocks_evaluated_mean']:>5.1f} "
              f"{r['forecast_ms_p50']:>7.3f}ms {r['total_ms_p50']:>8.3f}ms "
              f"{r['total_ms_p99']:>8.3f}ms {r['cpu_ms_p99']:>7.3f}ms {chosen:>9} "
              f"{r['infeasible_share']:>6.0%}")
    if grid is not None:
        bm, km, pm = grid[1]
        print("\nonnx grid: edge at batch {:.0f}, KV {:.0f} tokens, prefill {:.0f} tokens; "
              "projected passes beyond it (extrapolated with the model's baseline, no ONNX): "
              "{}".format(bm, km, pm, ", ".join(f"{v:.1%} at {n}" for n, v in beyond.items())))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "controller decision (forecast + SLO check + clock search, 110 clocks)",
        "python": platform.python_version(), "numpy": np.__version__,
        "machine": platform.machine(), "processor": platform.processor(),
        "default_fanout": DEFAULT_FANOUT, "rows": rows,
        "onnx_grid_passes_beyond_edge_share": {str(k): v for k, v in beyond.items()},
    }, indent=2))
    print("\nload average (1/5/15 min) at the end: {:.1f} {:.1f} {:.1f}".format(
        *os.getloadavg()))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

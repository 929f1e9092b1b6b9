"""The performance model: accuracy, query cost (ONNX vs compiled grid), and projection drift.

For each shipped model under models/perf/ (twin models of h100-llama3-8b-tp1 and
h100-llama2-13b-tp2, and the one trained on the measured H100 table):

* accuracy: the held-out R² / MAPE / MAE (iterations per second, as the throttLL'eM paper)
  at the 90% and 10% training splits from the model's metrics.json, and a fresh score on an
  independent twin profile (another seed: rows no model has seen) through ONNX and through
  the grid, plus grid-vs-ONNX agreement; `--score-table` adds any other table (e.g. a real
  GPU sweep from `throttllem profile --target gpu`);
* query cost: the forecaster's queries on 2,000 future iterations (shapes recorded from the
  engine twin replaying the Azure conversation trace): one full scan (× 110 clocks), one
  k-ary round (× 11), and a secant round in the controller's own layout (× 2 clocks, on the
  same passes as the last call, and on new ones), wall time p50/p99 on one core, grid and
  ONNX in the same run (grid calls back to back after a warm-up, then ONNX) so the ratio is
  fair;
* beyond the edge: points past the grid (batch and KV up to 4×, prefill up to 2×), answered
  by the grid's extrapolation with the model's baseline, against ONNX made monotone, and the
  number of ONNX runs it took (0);
* drift: the engine twin replays the Azure conversation trace, time-compressed ×`--rate`
  (8: a loaded engine, mean batch ~180 on 8B TP1, as the paper scales the trace to the
  system's peak), with the SM clock locked at a few clocks; every iteration is predicted with
  the runtime (grid, the forecaster's path) at the clock it ran at, and per request
  |Σ predicted − Σ actual| over the request's iterations / its iteration count is averaged
  (the paper: 0.43 ms/iteration; our target 0.2). Columns (ms per iteration): ``drift`` over
  all iterations, ``bias`` its signed mean, ``decode`` over the decode-only iterations (what
  projecting the running requests' future costs), ``onnx`` the drift of the ONNX model itself
  (so the grid's share shows), and ``floor``: the drift of the twin's *own formula* given
  everything it uses but Σ prompt² (prefill attention), which the PerfModel protocol does not
  carry (only the prefill token count), replaced by the replay's own mean for the prefill
  count (`floor_model`). No model behind this protocol can expect to beat ``floor``; the
  engine twin has no per-iteration noise. One line per model spells out the 1980 MHz figure.
  The measured-table model is not replayed (the twin is not the GPU it was measured on).

    python benchmarks/bench_perf.py [--json runs/bench_perf.json] [--window-s 120]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from throttllem._events import RequestArrived  # noqa: E402
from throttllem._perf.profiler import run_profile  # noqa: E402
from throttllem._perf.runtime import DEFAULT_MODEL_ROOT, PerfRuntime, score_table  # noqa: E402
from throttllem._setup import DEFAULT_SETUP  # noqa: E402
from throttllem._trace import iter_trace  # noqa: E402
from throttllem._twin import clockmodel as cm  # noqa: E402
from throttllem._twin.engine import EngineTwin  # noqa: E402
from throttllem._twin.gpu import GpuIterationResult, GpuTwin  # noqa: E402
from throttllem._twin.profile import load_profile  # noqa: E402

MODELS = (DEFAULT_SETUP, "h100-llama2-13b-tp2", "h100-llama3-8b-tp1-measured")
DRIFT_CLOCKS = (1980, 1410, 990, 600)
QUERY_T = 2000


class _RecordingGpu(GpuTwin):
    """A GpuTwin that remembers each iteration's shape (what the perf model sees) and its
    Σ prompt² (what it does not)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.shapes: list[tuple[int, int, int]] = []
        self.attn_tokens2: list[float] = []

    def run_iteration(self, start_s: float, *, batch: int, kv_tokens: int, prefill_tokens: int,
                      prefill_attn_tokens2: float = 0.0,
                      indices: Any = None) -> GpuIterationResult:
        self.shapes.append((batch, kv_tokens, prefill_tokens))
        self.attn_tokens2.append(float(prefill_attn_tokens2))
        return super().run_iteration(start_s, batch=batch, kv_tokens=kv_tokens,
                                     prefill_tokens=prefill_tokens,
                                     prefill_attn_tokens2=prefill_attn_tokens2, indices=indices)


def replay(setup: str, clock_mhz: int, window_s: float, rate: float) -> dict[str, Any]:
    """Run the engine twin over the conv trace window at a locked clock; iteration arrays
    and per-request iteration membership."""
    profile = load_profile(setup)
    gpu = _RecordingGpu(profile)
    for i in range(gpu.gpu_count()):
        gpu.set_locked_clocks(i, clock_mhz, clock_mhz)
    engine = EngineTwin(profile, "i0", gpu)
    pending = [RequestArrived(id=f"r{r.index}", arrival_s=r.arrival_s / rate,
                              prompt_tokens=r.prompt_tokens,
                              max_tokens=max(4096, r.output_tokens),
                              true_output_tokens=r.output_tokens)
               for r in iter_trace("conv", start_s=0.0, duration_s=window_s * rate)
               if r.prompt_tokens + r.output_tokens < profile.model.max_model_len]
    k = 0
    now = 0.0
    dur: list[float] = []
    clk: list[float] = []
    members: dict[str, list[int]] = defaultdict(list)
    while k < len(pending) or engine.has_work():
        while k < len(pending) and pending[k].arrival_s <= now:
            engine.admit(pending[k], pending[k].arrival_s)
            k += 1
        out = engine.step(now) if engine.has_work() else None
        if out is None:
            if k < len(pending):
                now = max(now, pending[k].arrival_s)
                continue
            break
        it = out.iteration
        j = len(dur)
        dur.append(it.duration_ms / 1e3)
        clk.append(it.clock_mhz)
        for rid in it.request_ids:
            members[rid].append(j)
        now = engine.now_s
    shapes = np.asarray(gpu.shapes, dtype=np.float64)
    return {"batch": shapes[:, 0], "kv": shapes[:, 1], "prefill": shapes[:, 2],
            "attn_tokens2": np.asarray(gpu.attn_tokens2), "actual_s": np.asarray(dur),
            "clock": np.asarray(clk), "members": members, "requests": len(pending),
            "setup": setup}


def _accumulate(pred: np.ndarray, act: np.ndarray, members: dict[str, list[int]],
                keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request: |Σ pred − Σ actual| / iterations, and the signed value (ms)."""
    absd, signed = [], []
    for idx in members.values():
        ii = np.asarray(idx)
        ii = ii[keep[ii]]
        if ii.size:
            d = float(pred[ii].sum() - act[ii].sum()) / ii.size * 1e3
            absd.append(abs(d))
            signed.append(d)
    return np.asarray(absd), np.asarray(signed)


def drift(rt: Any, rep: dict[str, Any]) -> dict[str, float]:
    pred = np.asarray(rt.iteration_time_s(rep["batch"], rep["kv"], rep["prefill"],
                                          rep["clock"]), dtype=np.float64)
    act = rep["actual_s"]
    a, signed = _accumulate(pred, act, rep["members"], np.ones(len(act), dtype=bool))
    dec, _ = _accumulate(pred, act, rep["members"], rep["prefill"] == 0)
    return {"iterations": len(act), "requests": len(a),
            "prefill_iteration_share": float((rep["prefill"] > 0).mean()),
            "drift_ms_per_iter_mean": float(a.mean()), "drift_ms_per_iter_p50": float(
                np.median(a)), "drift_ms_per_iter_p90": float(np.percentile(a, 90)),
            "bias_ms_per_iter_mean": float(signed.mean()),
            "decode_only_drift_ms_per_iter_mean": float(dec.mean()),
            "iter_ms_mean": float(act.mean() * 1e3),
            "iter_mape_pct": float(np.mean(np.abs(pred - act) / act) * 100)}


def floor_model(rep: dict[str, Any]) -> Any:
    """The floor for any model behind the PerfModel protocol on this replay: the twin's *own*
    formula (what produced the times), given everything it uses except Σ prompt² (prefill
    attention), which the protocol does not carry (only the prefill token count), and in its
    place the replay's own mean Σ prompt² / p² over the iterations with a similar prefill
    count p (20 quantile bins). An oracle of both the formula and the serving prompt mix: a
    learned model from a profile cannot beat it, except by luck of cancellation."""
    profile = load_profile(rep["setup"])
    p, attn = rep["prefill"], rep["attn_tokens2"]
    pre = p > 0
    edges = np.quantile(p[pre], np.linspace(0.0, 1.0, 21)) if pre.any() else np.zeros(2)
    ratio = np.zeros(len(edges) - 1)
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(ratio) - 1)
    for k in range(len(ratio)):
        sel = pre & (bins == k)
        ratio[k] = float(np.mean(attn[sel] / p[sel] ** 2)) if sel.any() else 1.0

    class _Floor:
        def iteration_time_s(self, b: Any, kv: Any, pf: Any, f: Any) -> Any:
            pf = np.asarray(pf, dtype=np.float64)
            k = np.clip(np.searchsorted(edges, pf, side="right") - 1, 0, len(ratio) - 1)
            return cm.iteration_time_s(profile, batch=b, kv_tokens=kv, prefill_tokens=pf,
                                       clock_mhz=f, prefill_attn_tokens2=ratio[k] * pf * pf)

    return _Floor()


class _Onnx:
    def __init__(self, rt: PerfRuntime) -> None:
        self.rt = rt

    def iteration_time_s(self, b: Any, kv: Any, p: Any, f: Any) -> Any:
        return self.rt.predict_onnx(b, kv, p, f)


class _CountingSession:
    """Wraps an ONNX Runtime session and counts its runs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.runs = 0

    def run(self, *a: Any) -> Any:
        self.runs += 1
        return self.inner.run(*a)


def beyond_edge(rt: PerfRuntime, n: int = 3000) -> dict[str, Any]:
    """Points past the grid's edge (batch and KV up to 4x, prefill up to 2x): the grid's
    extrapolation against ONNX made monotone in the clock (what the runtime answered there
    before it extrapolated), in % of the ONNX time; and how often ONNX ran to answer them."""
    assert rt.grid is not None
    bm, km, pm = rt.grid.edge
    rng = np.random.default_rng(0)
    b = rng.integers(0, int(bm * 4), n).astype(np.float64)
    kv = rng.uniform(0, km * 4, n).round()
    p = np.where(rng.uniform(size=n) < 0.4, rng.uniform(0, pm * 2, n).round(), 0.0)
    out = (b > bm) | (kv > km) | (p > pm)
    b, kv, p = b[out, None], kv[out, None], p[out, None]
    clocks = rt.clocks_mhz[None, :]
    ref = np.maximum.accumulate(rt.predict_onnx(b, kv, p, clocks)[:, ::-1], axis=1)[:, ::-1]
    counting = _CountingSession(rt._session)
    rt._session = counting
    try:
        got = np.asarray(rt.iteration_time_s(b, kv, p, clocks))
    finally:
        rt._session = counting.inner
    rel = (got / ref - 1.0) * 100.0
    return {"points": int(out.sum()), "mean": float(rel.mean()),
            "p1": float(np.percentile(rel, 1)), "p99": float(np.percentile(rel, 99)),
            "onnx_calls": counting.runs}


def query_cost(rt: PerfRuntime, rep: dict[str, Any], reps: int, onnx_reps: int
               ) -> dict[str, Any]:
    """Forecaster-shaped queries, grid and ONNX in turns.

    "forecast": the replay's (batch, KV) per iteration with a prefill on every 50th (2%): a
    projection prefills only the queued requests and the candidate; (T, 1) × (1, C) clocks,
    all 110 (one full scan) or 11. "secant_2": the controller's own layout, (C, 1) clocks ×
    (1, T) passes, 2 clocks per call as a secant round probes them, on the same passes call
    after call (a search's later rounds: the runtime reuses what does not depend on the
    clock); "first_2": the same with new passes every call (a search's first round).
    "replay": the recorded iterations as they are (under an ×8 trace a third or more of them
    admit a request: a pessimistic mix for the grid, whose prefill path interpolates in
    3-D)."""
    t = min(QUERY_T, len(rep["batch"]))
    b = rep["batch"][:t, None]
    kv = rep["kv"][:t, None]
    p = rep["prefill"][:t, None]
    pre = p[p > 0]
    p_fc = np.zeros_like(p)
    p_fc[::50, 0] = np.resize(pre, len(p_fc[::50, 0])) if pre.size else 512.0
    p_alt = p_fc.copy()
    p_alt[25::50, 0] = 256.0  # other passes: the runtime cannot reuse the last call's work
    pairs = [rt.clocks_mhz[[i, i + 1], None] for i in range(0, len(rt.clocks_mhz) - 1, 7)]
    out: dict[str, Any] = {"iterations": t, "replay_prefill_share": float((p > 0).mean())}
    cases: list[tuple[str, Any, Any, Any, Any]] = [
        ("forecast_110", b, kv, [p_fc], [rt.clocks_mhz[None, :]]),
        ("forecast_11", b, kv, [p_fc], [rt.clocks_mhz[None, ::10]]),
        ("secant_2", b.T, kv.T, [p_fc.T], pairs),
        ("first_2", b.T, kv.T, [p_fc.T, p_alt.T], pairs),
        ("replay_110", b, kv, [p], [rt.clocks_mhz[None, :]])]
    for label, bb, kk, pps, clock_sets in cases:
        grid_s: list[float] = []
        onnx_s: list[float] = []
        for i in range(5):  # warm-up: first-touch of the grid pages, caches
            rt.iteration_time_s(bb, kk, pps[i % len(pps)], clock_sets[i % len(clock_sets)])
        # grid calls back to back (as a clock search makes them), then ONNX: interleaving
        # would hand the grid a cache flushed by each 200 ms ONNX call
        for i in range(reps):
            pp, clocks = pps[i % len(pps)], clock_sets[i % len(clock_sets)]
            t0 = time.perf_counter()
            rt.iteration_time_s(bb, kk, pp, clocks)
            grid_s.append(time.perf_counter() - t0)
        for i in range(onnx_reps):
            pp, clocks = pps[i % len(pps)], clock_sets[i % len(clock_sets)]
            t0 = time.perf_counter()
            rt.predict_onnx(bb, kk, pp, clocks)
            onnx_s.append(time.perf_counter() - t0)
        g = np.asarray(grid_s) * 1e3
        o = np.asarray(onnx_s) * 1e3
        pp0, c0 = pps[0], clock_sets[0]
        out[label] = {"points": int(t * c0.size), "prefill_share": float((pp0 > 0).mean()),
                      "grid_ms_p50": float(np.median(g)), "grid_ms_p99": float(
                          np.percentile(g, 99)),
                      "onnx_ms_p50": float(np.median(o)), "onnx_ms_p99": float(
                          np.percentile(o, 99)),
                      "onnx_over_grid_p50": float(np.median(o) / np.median(g))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", default=str(DEFAULT_MODEL_ROOT),
                    help="folder holding the model folders")
    ap.add_argument("--window-s", type=float, default=60.0,
                    help="seconds of (scaled) trace replayed per clock for drift")
    ap.add_argument("--rate", type=float, default=8.0,
                    help="trace time compression: x8 loads an H100 8B engine (mean batch "
                         "~180), as the paper scales the trace to the system's peak")
    ap.add_argument("--reps", type=int, default=300, help="grid query repetitions")
    ap.add_argument("--onnx-reps", type=int, default=15, help="ONNX query repetitions")
    ap.add_argument("--test-samples", type=int, default=3000,
                    help="rows of the independent twin profile (seed 1)")
    ap.add_argument("--score-table", action="append", default=[], metavar="SETUP=CSV",
                    help="also score the models of SETUP on this table (repeatable), e.g. "
                         "h100-llama3-8b-tp1=runs/h100-gpu-profile.csv")
    ap.add_argument("--json", type=Path, default=Path("runs/bench_perf.json"))
    args = ap.parse_args()
    root = Path(args.models)
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(),
                               "python": platform.python_version(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            folder = root / name
            if not folder.is_dir():
                print(f"skip {name}: no {folder}")
                continue
            t0 = time.perf_counter()
            rt = PerfRuntime.load(folder)
            load_s = time.perf_counter() - t0
            assert rt.grid is not None
            metrics = json.loads((folder / "metrics.json").read_text())
            r: dict[str, Any] = {
                "setup": rt.setup, "load_s": load_s, "grid_build_s": rt.grid_build_s,
                "grid_mb": rt.grid.nbytes / 1e6, "grid_points": rt.grid.points,
                "splits": {k: {m: v[m] for m in ("r2", "mape_pct", "mae_iters_per_s", "how")}
                           for k, v in metrics["splits"].items()},
            }
            test_csv = Path(tmp) / f"{rt.setup}-seed1.csv"
            if not test_csv.exists():
                run_profile(setup=rt.setup, out=test_csv,
                            samples=args.test_samples, seed=1, log=open(os.devnull, "w"))  # noqa: SIM115
            scored = {}
            extra = [(v, Path(v)) for k, _, v in
                     (item.partition("=") for item in args.score_table) if k == rt.setup]
            tables = [] if name.endswith("-measured") else [("twin_seed1", test_csv)]
            for label, table in [*tables, *extra]:
                mo, notes = score_table(rt, table)
                mg, _ = score_table(rt, table, use_grid=True)
                scored[label] = {"onnx": mo._asdict(), "grid": mg._asdict(), "notes": notes}
            r["independent"] = scored
            from throttllem._perf.table import read_table  # noqa: PLC0415

            tt = read_table(test_csv)
            b, kv, p, f = tt.features()
            yo = rt.predict_onnx(b, kv, p, f)
            yg = np.asarray(rt.iteration_time_s(b, kv, p, f))
            rel = np.abs(yg - yo) / yo * 100
            r["grid_vs_onnx_pct"] = {"mean": float(rel.mean()),
                                     "p99": float(np.percentile(rel, 99)),
                                     "max": float(rel.max())}
            r["beyond_edge"] = beyond_edge(rt)
            if not name.endswith("-measured"):
                drifts = {}
                first = None
                for c in DRIFT_CLOCKS:
                    rep = replay(rt.setup, c, args.window_s, args.rate)
                    first = first or rep
                    drifts[str(c)] = drift(rt, rep)
                    drifts[str(c)]["onnx_drift_ms_per_iter"] = drift(
                        _Onnx(rt), rep)["drift_ms_per_iter_mean"]
                    drifts[str(c)]["floor_ms_per_iter"] = drift(
                        floor_model(rep), rep)["drift_ms_per_iter_mean"]
                r["drift"] = drifts
                r["query"] = query_cost(rt, first, args.reps, args.onnx_reps)
            results["models"][name] = r
            print(f"done {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    _print(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def _print(results: dict[str, Any]) -> None:
    head = (f"{'model':<28} {'accuracy':<10} {'R2':>7} {'MAPE%':>6} {'MAE it/s':>8} | "
            f"{'query (2000 it)':<13} {'grid p50/p99 ms':>15} {'onnx p50/p99 ms':>15} "
            f"{'onnx/grid':>9} | {'clock':>5} {'drift':>6} {'bias':>7} {'decode':>6} "
            f"{'onnx':>6} {'floor':>6}")
    print(head)
    print("-" * len(head))
    for name, r in results["models"].items():
        left = []
        for k, lab in (("90", "90% split"), ("10", "10% split"), ("10_stratified", "10% strat")):
            if k in r["splits"]:
                s = r["splits"][k]
                left.append(f"{lab:<10} {s['r2']:>7.4f} {s['mape_pct']:>6.2f} "
                            f"{s['mae_iters_per_s']:>8.3f}")
        for label, sc in r["independent"].items():
            for how in ("onnx", "grid"):
                m = sc[how]
                tag = ("seed1" if label == "twin_seed1" else "gpu") + "/" + how
                left.append(f"{tag:<10} {m['r2']:>7.4f} {m['mape_pct']:>6.2f} "
                            f"{m['mae_iters_per_s']:>8.3f}")
        mid = []
        for q in ("forecast_110", "forecast_11", "secant_2", "first_2", "replay_110"):
            if "query" in r:
                x = r["query"][q]
                mid.append(f"{q:<15} {x['grid_ms_p50']:>6.3f}/{x['grid_ms_p99']:<6.3f} "
                           f"{x['onnx_ms_p50']:>7.1f}/{x['onnx_ms_p99']:<7.1f} "
                           f"{x['onnx_over_grid_p50']:>9.0f}")
        right = [f"{c:>5} {d['drift_ms_per_iter_mean']:>6.3f} {d['bias_ms_per_iter_mean']:>+7.3f} "
                 f"{d['decode_only_drift_ms_per_iter_mean']:>6.3f} "
                 f"{d['onnx_drift_ms_per_iter']:>6.3f} {d['floor_ms_per_iter']:>6.3f}"
                 for c, d in r.get("drift", {}).items()]
        n = max(len(left), len(mid), len(right))
        for i in range(n):
            a = left[i] if i < len(left) else " " * 34
            bm = mid[i] if i < len(mid) else " " * 59
            c = right[i] if i < len(right) else ""
            print(f"{name if i == 0 else '':<28} {a} | {bm} | {c}")
        g = r["grid_vs_onnx_pct"]
        print(f"{'':<28} grid: built in {r['grid_build_s']:.1f} s, {r['grid_mb']:.1f} MB, "
              f"{r['grid_points'] / 1e6:.2f}M points; grid vs ONNX on twin rows: mean "
              f"{g['mean']:.3f}% p99 {g['p99']:.2f}% max {g['max']:.1f}%")
        x = r.get("beyond_edge")
        if x:
            print(f"{'':<28} beyond the grid's edge ({x['points']} points, up to 4x batch/KV, "
                  f"2x prefill): extrapolated vs ONNX (made monotone) mean {x['mean']:+.2f}% "
                  f"p1 {x['p1']:+.2f}% p99 {x['p99']:+.2f}%, ONNX calls {x['onnx_calls']}")
        d = r.get("drift", {}).get("1980")
        if d:
            print(f"{'':<28} DRIFT at 1980 MHz: {d['drift_ms_per_iter_mean']:.3f} ms/iteration "
                  f"over whole requests (target <= 0.2, paper 0.43), "
                  f"{d['decode_only_drift_ms_per_iter_mean']:.3f} over decode-only iterations; "
                  f"{d['prefill_iteration_share']:.0%} of iterations prefill; floor for any "
                  f"model without prompt lengths {d['floor_ms_per_iter']:.3f}")


if __name__ == "__main__":
    main()

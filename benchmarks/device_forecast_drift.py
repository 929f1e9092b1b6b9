"""On the device: the forecaster against a real decode loop at the card's own clock.

A Llama-3-8B-shaped random-weight decoder serves a time-scaled window of the Azure conv trace
through the engine twin's scheduler (`throttllem._gpulab.loop`: inflight batching, FCFS,
paged-KV accounting, prefill inside the pass under the token budget), every pass really run
on the GPU (`throttllem._gpulab.passes`: FlashAttention-2 varlen over per-sequence KV
regions, CUDA graphs per decode batch bucket, eager passes when prefilling) and timed with
CUDA events. The performance model is trained on a profile of the same runner's passes
(random shapes, measured the same way), then every logged pass is predicted by `PerfRuntime`
and compared with its measured time: drift per request and iteration, MAPE per pass, and the
controller's projection (`throttllem._core.forecast.project`, true lengths) at admission
instants against the end times the loop produced. SM clocks, power limits and every other
GPU setting are left alone (NVML is only read).

Steps (the device has torch, numpy, pynvml, onnxruntime; msgspec and structlog travel as
wheels in .whl/):

    # here: the trace rows the loop needs (git-ignored)
    python benchmarks/device_forecast_drift.py prepare --out .device/drift/conv.csv
    # device: smoke test, profile of the runner's passes, the loop (optionally --model M to
    # analyze there too); writes log/smoke/profile/passes/serve[/drift] under --out
    python3 benchmarks/device_forecast_drift.py device --out $OUT --requests .device/drift/conv.csv
    # here: train on the measured profile, then analyze the loop
    throttllem train perf --data RUN/profile.csv --setup h100-llama3-8b-tp1 --out MODEL
    python benchmarks/device_forecast_drift.py analyze --run RUN --model MODEL --json RUN/drift.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from throttllem._gpulab.loop import (
    PASS_COLUMNS,
    DriftStats,
    LoopGpu,
    PassRecord,
    ServeResult,
    Snapshot,
    pass_errors,
    pass_spec,
    profile_passes,
    projected_ends_s,
    request_drift_ms,
    serve,
    sweep_shapes,
)
from throttllem._setup import DEFAULT_SETUP

SETUP = DEFAULT_SETUP  # engine limits (max batch 256, 8192-token budget, KV blocks)
TRACE = "/work/shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"


def say(msg: str) -> None:
    print(f"[drift {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- here: the rows


def cmd_prepare(args: argparse.Namespace) -> int:
    from throttllem._trace import iter_trace  # noqa: PLC0415

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["arrival_s", "prompt_tokens", "output_tokens", "index"])
        for r in iter_trace(args.trace, duration_s=args.minutes * 60.0):
            w.writerow([f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens, r.index])
            n += 1
    say(f"wrote {n} rows ({args.minutes:g} trace minutes) to {out}")
    return 0


def load_requests(path: str | Path, *, speed: float, window_s: float, start_s: float = 0.0,
                  max_len: int = 8192) -> list[Any]:
    """Trace rows arriving in [0, window_s) of *scaled* time ((arrival − start_s) / speed,
    start_s in trace time), as `RequestArrived` with their true lengths; rows that cannot
    fit the context dropped."""
    from throttllem._events import RequestArrived  # noqa: PLC0415

    out = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            t = (float(row["arrival_s"]) - start_s) / speed
            if t < 0:
                continue
            if t >= window_s:
                break
            p, o = int(row["prompt_tokens"]), int(row["output_tokens"])
            if p + o >= max_len or p < 1 or o < 1:
                continue
            out.append(RequestArrived(id=f"r{row['index']}", arrival_s=t, prompt_tokens=p,
                                      max_tokens=4096, true_output_tokens=o))
    return out


# --------------------------------------------------------------------------- device


def smoke(torch: Any, runner: Any) -> dict[str, Any]:
    """Correctness and cost checks of the runner on the full-size model."""
    out: dict[str, Any] = {"attention": runner.attention, "probe": runner.probe,
                           "notes": dict(runner.notes)}
    rng = np.random.default_rng(3)
    cap = runner.kv_capacity_tokens
    saved = runner.tok.clone()
    # graph vs eager on a decode pass
    ctx = rng.integers(50, 3000, 5)
    starts = np.cumsum(np.concatenate(([1000], ctx[:-1] + 8)))
    spec = pass_spec(ctx, starts, [11, 12, 13, 14, 15])
    if runner.graphs:
        eager = runner.logits(spec)
        runner.tok.copy_(saved)
        graph = runner.logits(spec, use_graph=True)
        out["graph_vs_eager_rel_err"] = float((graph - eager).norm() / eager.norm())
    runner.tok.copy_(saved)
    # decode after a prefill of L tokens == the last row of a prefill of L + 1 tokens; a
    # decode over one key too few is the yardstick of a wrong answer
    toks = [int(x) for x in rng.integers(0, runner.shape.vocab, 20)]
    runner.forward_tokens(toks, 200_000, 20)
    nxt = int(runner.tok[20])
    ref = runner.forward_tokens([*toks, nxt], 210_000, 21)
    for name, c in (("decode_vs_prefill_rel_err", 21), ("decode_wrong_ctx_rel_err", 20)):
        runner.tok[20] = nxt
        got = runner.logits(pass_spec([c], [200_000], [20]), use_graph=bool(runner.graphs))
        out[name] = float((got - ref).norm() / ref.norm())
    runner.tok.copy_(saved)

    def timed(s: Any, use_graph: bool, n: int = 10) -> float:
        for _ in range(2):
            runner.run(s, use_graph=use_graph)
        return float(statistics.median(runner.run(s, use_graph=use_graph).gpu_ms
                                       for _ in range(n)))

    one = pass_spec([1000], [5000], [30])
    out["decode_b1_ctx1000_ms"] = {"graph": timed(one, True) if runner.graphs else None,
                                   "eager": timed(one, False)}
    b64 = pass_spec([1000] * 64, 10_000 + 1001 * np.arange(64), np.arange(100, 164))
    out["decode_b64_ctx1000_ms"] = {"graph": timed(b64, True) if runner.graphs else None,
                                    "eager": timed(b64, False)}
    pf = pass_spec([], [], [], prefill_len=[1024], prefill_start=[cap - 2048],
                   prefill_slot=[40])
    out["prefill_1024_ms"] = timed(pf, False, 5)
    if runner.nvml is not None:
        t0 = time.perf_counter()
        for _ in range(100):
            runner.nvml.sm_clock_mhz(runner.nvml_index)
            runner.nvml.energy_mj(runner.nvml_index)
        out["nvml_two_reads_us"] = (time.perf_counter() - t0) / 100 * 1e6
    runner.tok.copy_(saved)
    return out


def write_passes(path: Path, passes: list[PassRecord]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(PASS_COLUMNS)
        for p in passes:
            w.writerow([f"{v:.6f}" if isinstance(v, float) else int(v) for v in p])


def serve_json(res: ServeResult, requests: list[Any], meta: dict[str, Any]) -> dict[str, Any]:
    done = {c.id: c for c in res.completed}
    reqs = []
    for r in requests:
        c = done.get(r.id)
        if c is None and r.id not in res.segments:
            continue
        reqs.append({
            "id": r.id, "arrival_s": r.arrival_s, "prompt": r.prompt_tokens,
            "output": r.true_output_tokens,
            "segments": [list(s) for s in res.segments.get(r.id, [])],
            **({"first_token_s": c.first_token_s, "completed_s": c.completed_s,
                "generated": c.generated_tokens, "preemptions": c.preemptions,
                "ttft_ms": c.ttft_ms, "tbt_mean_ms": c.tbt_mean_ms} if c else {})})
    return {"meta": meta, "requests": reqs, "snapshots": [s.to_json() for s in res.snapshots]}


def cmd_device(args: argparse.Namespace) -> int:
    import importlib  # noqa: PLC0415

    from throttllem._gpulab.passes import TorchPassRunner  # noqa: PLC0415
    from throttllem._gpulab.sampler import describe_gpu  # noqa: PLC0415
    from throttllem._perf.table import TableWriter  # noqa: PLC0415
    from throttllem._twin.engine import EngineTwin  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch: Any = importlib.import_module("torch")
    if not torch.cuda.is_available():
        say("no CUDA device")
        return 2
    torch.cuda.set_device(0)
    free, total = torch.cuda.mem_get_info(0)
    say(f"{torch.cuda.get_device_name(0)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free; "
        f"torch {torch.__version__}; clocks and power limits are never changed (NVML reads "
        "only)")
    cap = min(args.kv_tokens, int((free - 16.1e9 - 12 * 2**30) // (128 * 1024)))
    runner = TorchPassRunner(torch, kv_capacity_tokens=cap, graphs=not args.eager,
                             seed=args.seed)
    say(f"runner: KV {runner.kv_capacity_tokens} tokens, attention {runner.attention} "
        f"{runner.probe}, graphs {sorted(runner.graphs)} {runner.notes}")
    meta: dict[str, Any] = {
        "device": describe_gpu(runner.nvml_index) if runner.nvml else {},
        "torch": torch.__version__,
        "cuda": torch.version.cuda, "kv_capacity_tokens": cap, "attention": runner.attention,
        "attention_probe": runner.probe, "graph_buckets": sorted(runner.graphs),
        "runner_notes": runner.notes, "clocks_locked": False,
        "note": "SM clocks and power limits never changed; sm_clock_mhz is what the card "
                "chose itself (NVML read after each pass)"}
    if args.smoke:
        sm = smoke(torch, runner)
        say(f"smoke: {json.dumps(sm)}")
        (out / "smoke.json").write_text(json.dumps({**meta, "smoke": sm}, indent=1) + "\n")
        bad = []
        if not sm.get("graph_vs_eager_rel_err", 0.0) < 0.15:  # bf16 drift, not wiring
            bad.append("graph_vs_eager_rel_err")
        if not sm["decode_vs_prefill_rel_err"] < 0.3:  # gross wiring errors only
            bad.append("decode_vs_prefill_rel_err")
        if runner.attention == "math":
            bad.append("attention: no FlashAttention backend passed its check")
        if bad and not args.no_gate:
            say(f"smoke FAILED on {bad}: stopping")
            return 3
    kvb = runner.shape.kv_bytes_per_token
    if args.profile_budget_s > 0:
        shapes = sweep_shapes(20_000, seed=args.seed, kv_cap_tokens=int(cap * 0.9))
        prof_path = out / "profile.csv"
        t0 = time.perf_counter()
        with TableWriter(prof_path) as writer:
            count = [0]

            def on_row(row: Any, m: Any) -> None:
                writer.write(row)
                count[0] += 1
                if count[0] % 200 == 0:
                    say(f"profile: {count[0]} shapes, {time.perf_counter() - t0:.0f} s; last "
                        f"{row.phase} b={row.batch} kv={row.kv_tokens} p={row.prefill_tokens}: "
                        f"{row.iter_ms:.2f} ms at {row.sm_clock_mhz:.0f} MHz")

            rows = profile_passes(runner, shapes, kv_bytes_per_token=kvb,
                                  budget_s=args.profile_budget_s, reps=args.reps,
                                  seed=args.seed, on_row=on_row)
        clocks = [r.sm_clock_mhz for r in rows]
        pmeta = {**meta, "rows": len(rows), "elapsed_s": time.perf_counter() - t0,
                 "reps": args.reps, "warmup": 1, "sweep": "loop.sweep_shapes seed "
                 f"{args.seed}", "sweep_kv_cap_tokens": int(cap * 0.9),
                 "sm_clock_mhz_min_median_max": [
                     min(clocks), statistics.median(clocks), max(clocks)] if clocks else None}
        (out / "profile.csv.meta.json").write_text(json.dumps(pmeta, indent=1) + "\n")
        say(f"profile: {len(rows)} rows in {pmeta['elapsed_s']:.0f} s, clocks "
            f"{pmeta['sm_clock_mhz_min_median_max']}")
    if args.requests:
        profile = load_profile(SETUP)
        for k, spec in enumerate(args.runs.split(",")):
            name, trace_start, window = spec.split(":")
            window_s = float(window)
            requests = load_requests(args.requests, speed=args.speed, window_s=window_s,
                                     start_s=float(trace_start))
            gpu = LoopGpu(profile, runner)
            engine = EngineTwin(profile, f"i{k}", gpu)
            snaps = [window_s * f for f in np.linspace(0.1, 0.7, args.snapshots)]
            left = args.wall_s - (time.perf_counter() - t_start)
            runs_left = len(args.runs.split(",")) - k
            budget = left / runs_left
            say(f"serve {name}: {len(requests)} requests arriving over {window_s:g} s "
                f"(trace from {float(trace_start):g} s, time / {args.speed:g}), engine limits "
                f"of {SETUP}; wall budget {budget:.0f} s")
            res = serve(engine, gpu, requests, snapshot_times_s=snaps,
                        arrivals_wall_s=max(10.0, budget - args.drain_s),
                        wall_limit_s=max(20.0, budget), progress=say)
            write_passes(out / f"passes_{name}.csv", res.passes)
            clocks = [p.clock_mhz for p in res.passes]
            smeta = {**meta, "run": name, "trace_start_s": float(trace_start),
                     "setup_limits": SETUP, "speed": args.speed, "window_s": window_s,
                     "requests_loaded": len(requests), "admitted": res.admitted,
                     "completed": len(res.completed), "stopped_early": res.stopped_early,
                     "wall_s": res.wall_s, "passes": len(res.passes),
                     "event_time_s": engine.now_s, "preemptions": engine.preemptions_total,
                     "sm_clock_mhz_min_median_max": [min(clocks), statistics.median(clocks),
                                                     max(clocks)] if clocks else None}
            (out / f"serve_{name}.json").write_text(
                json.dumps(serve_json(res, requests, smeta)) + "\n")
            say(f"serve {name}: {len(res.passes)} passes, {len(res.completed)}/"
                f"{res.admitted} completed in {res.wall_s:.0f} s wall ({engine.now_s:.1f} s "
                f"engine time), clocks {smeta['sm_clock_mhz_min_median_max']}")
            if args.model:
                rep = analyze(out / f"passes_{name}.csv", out / f"serve_{name}.json",
                              args.model)
                (out / f"drift_{name}.json").write_text(json.dumps(rep, indent=1) + "\n")
                print_table(rep)
    say(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


# --------------------------------------------------------------------------- analysis


def read_passes(path: str | Path) -> dict[str, np.ndarray[Any, Any]]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {c: np.asarray([float(r[c]) for r in rows]) for c in PASS_COLUMNS}


def analyze(passes_csv: str | Path, serve_path: str | Path, model: str | Path) -> dict[str, Any]:
    """Drift, per-pass errors and projections of a loop run under a performance model."""
    from throttllem._perf.runtime import PerfRuntime  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    p = read_passes(passes_csv)
    run = json.loads(Path(serve_path).read_text(encoding="utf-8"))
    perf = PerfRuntime.load(model)
    b, kv, pf, meas = p["batch"], p["kv_tokens"], p["prefill_tokens"], p["gpu_ms"]
    # Σ prompt² of each pass's prefills: a model with that input uses it, others ignore it
    a2 = p["prefill_attn_tokens2"]
    clock_obs = p["clock_mhz"]
    clock_mode = float(statistics.mode(clock_obs.tolist()))
    clock_med = float(np.median(clock_obs))
    variants = {
        "observed_clock": perf.iteration_time_s(b, kv, pf, clock_obs, a2) * 1e3,
        "fixed_clock": perf.iteration_time_s(b, kv, pf, np.full_like(b, clock_mode), a2) * 1e3,
        # the ONNX model itself, not the grid the forecaster compiles from it
        "observed_clock_onnx": perf.predict_onnx(b, kv, pf, clock_obs, a2) * 1e3,
    }
    decode = pf == 0
    done = [r for r in run["requests"] if "completed_s" in r]
    segs = [[tuple(s) for s in r["segments"]] for r in done]
    report: dict[str, Any] = {
        "model": str(model), "model_setup": perf.setup,
        "model_features": perf.metadata.get("features", "").split(","),
        "trained_clock_range_mhz": list(perf.trained_clock_range_mhz),
        "device": run["meta"].get("device", {}),
        "passes": int(meas.size), "decode_only_passes": int(decode.sum()),
        "prefill_passes": int((~decode).sum()), "requests_completed": len(done),
        "requests_admitted": run["meta"].get("admitted"),
        "preemptions": run["meta"].get("preemptions"),
        "mean_decode_batch": float(b.mean()), "p90_decode_batch": float(np.percentile(b, 90)),
        "max_decode_batch": int(b.max()), "mean_kv_tokens": float(kv.mean()),
        "measured_pass_ms": {"mean": float(meas.mean()), "decode_mean": float(
            meas[decode].mean()) if decode.any() else None, "prefill_mean": float(
            meas[~decode].mean()) if (~decode).any() else None},
        "host_overhead_ms_per_pass": float((p["wall_ms"] - meas).mean()),
        "graphed_fraction": float(p["graphed"].mean()),
        "sm_clock_mhz": {"min": float(clock_obs.min()), "median": clock_med,
                         "max": float(clock_obs.max()), "mode": clock_mode,
                         "share_at_mode": float((clock_obs == clock_mode).mean())},
        "energy_j_total": float(np.nansum(p["energy_mj"]) / 1e3),
        "event_time_s": run["meta"].get("event_time_s"), "speed": run["meta"].get("speed"),
        "variants": {},
    }
    for name, pred in variants.items():
        per, signed, n_it = request_drift_ms(pred, meas, segs)
        per_d, _, _ = request_drift_ms(pred, meas, segs, mask=decode)
        per_p, _, _ = request_drift_ms(pred, meas, segs, mask=~decode)
        report["variants"][name] = {
            "drift_ms_per_iter": DriftStats.of(per).to_json(),
            "signed_drift_ms_per_iter": DriftStats.of(signed).to_json(),
            "drift_ms_per_iter_decode_only_passes": DriftStats.of(per_d).to_json(),
            "drift_ms_per_iter_prefill_passes": DriftStats.of(per_p).to_json(),
            "iterations_per_request": DriftStats.of(n_it.astype(float)).to_json(),
            "pass_errors": {"all": pass_errors(pred, meas),
                            "decode_only": pass_errors(pred, meas, decode),
                            "prefill_bearing": pass_errors(pred, meas, ~decode)},
        }
    report["projection"] = projections(run, load_profile(SETUP), perf, clock=clock_mode,
                                       pred_ms=variants["fixed_clock"])
    return report


def projections(run: dict[str, Any], profile: Any, perf: Any, *, clock: float,
                pred_ms: np.ndarray[Any, Any]) -> dict[str, Any]:
    """At each snapshot: `project` (true lengths) timed by the model at `clock` — ``plain``,
    and ``arrival_prefill`` as the controller times it (`ArrivalPrefillPerf`: passes
    stretched by the prompt tokens admitted over the last 10 s) — vs the loop's end times;
    ``replay`` times the passes the loop really ran with the same model."""
    from throttllem._core.perf import ArrivalPrefillPerf  # noqa: PLC0415

    by_id = {r["id"]: r for r in run["requests"] if "completed_s" in r}
    arrivals = np.asarray([r["arrival_s"] for r in run["requests"]])
    prompts = np.asarray([r["prompt"] for r in run["requests"]], dtype=np.float64)
    cum_pred = np.concatenate(([0.0], np.cumsum(pred_ms)))
    clocks = tuple(int(c) for c in perf.clocks_mhz)
    rows = []
    acc: dict[str, list[float]] = {k: [] for k in (
        "plain", "plain_rel", "arrival_prefill", "arrival_prefill_rel", "replay", "passes")}
    for sj in run["snapshots"]:
        s = Snapshot.from_json(sj)
        recent = (arrivals > s.time_s - 10.0) & (arrivals <= s.time_s)
        rate = float(prompts[recent].sum() / 10.0)
        models = {"plain": perf, "arrival_prefill": ArrivalPrefillPerf(perf, rate, clocks)
                  if rate > 0 else perf}
        row: dict[str, Any] = {"time_s": s.time_s, "running": len(s.running_ids),
                               "queued": len(s.queued_ids), "prompt_tokens_per_s": rate}
        for name, model in models.items():

            def time_s(b: Any, kv: Any, pf: Any, a2: Any, model: Any = model) -> Any:
                return model.iteration_time_s(b, kv, pf, np.full_like(b, clock), a2)

            ids, ends, last_rel, proj = projected_ends_s(s, profile, time_s)
            err, rel, rep, it = [], [], [], []
            for rid, e_pred, lr in zip(ids, ends.tolist(), last_rel.tolist(), strict=True):
                r = by_id.get(rid)
                if r is None:
                    continue
                actual = float(r["completed_s"])
                last_pass = int(r["segments"][-1][1])
                err.append((e_pred - actual) * 1e3)
                rel.append(abs(e_pred - actual) / max(actual - s.time_s, 1e-9))
                rep.append((s.time_s + (cum_pred[last_pass + 1] - cum_pred[s.next_pass]) / 1e3
                            - actual) * 1e3)
                it.append(lr - (last_pass - s.next_pass))
            if not err:
                continue
            row["requests"] = len(err)
            row["projected_passes"] = proj.n_iterations
            row[f"{name}_mean_abs_end_err_ms"] = float(np.mean(np.abs(err)))
            row[f"{name}_mean_end_err_ms"] = float(np.mean(err))
            row[f"{name}_mean_rel_err_pct"] = float(np.mean(rel) * 100)
            acc[name] += err
            acc[f"{name}_rel"] += rel
            if name == "plain":
                row["replay_mean_abs_end_err_ms"] = float(np.mean(np.abs(rep)))
                row["mean_pass_count_err"] = float(np.mean(it))
                acc["replay"] += rep
                acc["passes"] += it
        if "requests" in row:
            rows.append(row)

    def stat(v: list[float]) -> dict[str, float] | None:
        if not v:
            return None
        a = np.abs(np.asarray(v))
        return {"mean_abs": float(a.mean()), "median_abs": float(np.median(a)),
                "mean_signed": float(np.mean(v))}

    return {"clock_mhz": clock, "snapshots": rows, "overall": {
        "requests": len(acc["plain"]),
        "plain_end_err_ms": stat(acc["plain"]),
        "plain_rel_err_pct": float(np.mean(acc["plain_rel"]) * 100) if acc["plain"] else None,
        "arrival_prefill_end_err_ms": stat(acc["arrival_prefill"]),
        "arrival_prefill_rel_err_pct": float(np.mean(acc["arrival_prefill_rel"]) * 100)
        if acc["arrival_prefill"] else None,
        "replay_end_err_ms": stat(acc["replay"]),
        "mean_abs_pass_count_err": float(np.mean(np.abs(acc["passes"]))) if acc["passes"]
        else None}}


def print_table(rep: dict[str, Any]) -> None:
    dev = rep.get("device", {})
    ck = rep["sm_clock_mhz"]
    print(f"\n{dev.get('name', '?')} | passes {rep['passes']} ({rep['decode_only_passes']} "
          f"decode-only, {rep['prefill_passes']} prefill-bearing) | requests "
          f"{rep['requests_completed']} | decode batch mean {rep['mean_decode_batch']:.1f} "
          f"p90 {rep['p90_decode_batch']:.0f} max {rep['max_decode_batch']} | SM clock "
          f"{ck['min']:.0f}-{ck['max']:.0f} MHz (median {ck['median']:.0f}, "
          f"{ck['share_at_mode'] * 100:.0f}% at {ck['mode']:.0f})")
    print(f"{'model predicts at':<18} {'drift ms/iter mean/med/p90':>28} {'signed mean':>12} "
          f"{'dec-only drift':>15} {'prefill drift':>14} {'MAPE all/dec/pre %':>20}")
    for name, v in rep["variants"].items():
        d, sd = v["drift_ms_per_iter"], v["signed_drift_ms_per_iter"]
        dd, dp = v["drift_ms_per_iter_decode_only_passes"], v["drift_ms_per_iter_prefill_passes"]
        pe = v["pass_errors"]
        print(f"{name:<18} {d['mean']:>10.3f}/{d['median']:.3f}/{d['p90']:.3f}     "
              f"{sd['mean']:>12.3f} {dd['mean']:>15.3f} {dp['mean']:>14.3f} "
              f"{pe['all']['mape_pct']:>8.2f}/{pe['decode_only']['mape_pct']:.2f}/"
              f"{pe['prefill_bearing']['mape_pct']:.2f}")
    pr = rep["projection"]["overall"]
    if pr["requests"]:
        pl, ap, rp = pr["plain_end_err_ms"], pr["arrival_prefill_end_err_ms"], \
            pr["replay_end_err_ms"]
        print(f"projection (true lengths) at {len(rep['projection']['snapshots'])} admission "
              f"instants, {pr['requests']} request ends, |predicted - actual end| mean/median:")
        print(f"  project() alone {pl['mean_abs']:.0f}/{pl['median_abs']:.0f} ms "
              f"(signed {pl['mean_signed']:+.0f}, {pr['plain_rel_err_pct']:.1f}% of remaining)"
              f" | with future prefills {ap['mean_abs']:.0f}/{ap['median_abs']:.0f} ms "
              f"(signed {ap['mean_signed']:+.0f}, {pr['arrival_prefill_rel_err_pct']:.1f}%)"
              f" | model on the passes that ran {rp['mean_abs']:.1f}/{rp['median_abs']:.1f} ms"
              f" | pass count off by {pr['mean_abs_pass_count_err']:.2f}")


def cmd_analyze(args: argparse.Namespace) -> int:
    run = Path(args.run)
    sfx = f"_{args.name}" if args.name else ""
    rep = analyze(run / f"passes{sfx}.csv", run / f"serve{sfx}.json", args.model)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    print_table(rep)
    return 0


def cmd_loop_table(args: argparse.Namespace) -> int:
    """A loop run's passes as a profile table (to train the performance model on)."""
    from throttllem._gpulab.loop import record_row  # noqa: PLC0415
    from throttllem._perf.table import write_table  # noqa: PLC0415

    p = read_passes(args.passes)
    recs = []
    for vals in zip(*(p[c] for c in PASS_COLUMNS), strict=True):
        fields: list[Any] = [bool(v) if isinstance(d, bool) else int(v) if isinstance(d, int)
                             else float(v) for v, d in zip(vals, _RECORD_KINDS, strict=True)]
        recs.append(PassRecord(*fields))
    n = write_table(args.out, (record_row(r, kv_bytes_per_token=args.kv_bytes_per_token)
                               for r in recs))
    say(f"wrote {n} rows to {args.out}")
    return 0


def cmd_profile_a2(args: argparse.Namespace) -> int:
    """A profile written before tables had the Σ prompt² column, with that column filled in:
    the profile's pass shapes are the seeded sweep (`sweep_shapes`), regenerated here and
    checked row by row (decode batch or prompt count, KV tokens and prefill tokens must all
    match, in order); any mismatch stops it, writing nothing."""
    from throttllem._perf.table import ALL_COLUMNS  # noqa: PLC0415

    src = Path(args.profile)
    with src.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    shapes = sweep_shapes(args.sweep_n, seed=args.seed, kv_cap_tokens=args.sweep_kv_cap_tokens)
    if len(rows) > len(shapes):
        say(f"{src}: {len(rows)} rows but the sweep has {len(shapes)} shapes")
        return 2
    out_rows = []
    for i, (row, shape) in enumerate(zip(rows, shapes, strict=False)):
        n_dec, n_pre = len(shape.decode_ctx), len(shape.prefill_len)
        want = (n_dec if n_dec else n_pre, sum(shape.decode_ctx), sum(shape.prefill_len))
        got = (int(row["batch"]), int(float(row["kv_tokens"])), int(float(row["prefill_tokens"])))
        if want != got:
            say(f"{src}, row {i + 2}: (batch, kv_tokens, prefill_tokens) {got} but sweep shape "
                f"{i} gives {want}: not this sweep (seed {args.seed}, KV cap "
                f"{args.sweep_kv_cap_tokens}); nothing written")
            return 3
        out_rows.append({**row, "prefill_attn_tokens2": str(sum(x * x for x in
                                                                shape.prefill_len))})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ALL_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in ALL_COLUMNS} for r in out_rows)
    multi = sum(1 for s in shapes[:len(rows)] if len(s.prefill_len) > 1)
    say(f"wrote {len(out_rows)} rows to {out}: every row matched its sweep shape; "
        f"{multi} rows prefill several prompts (Σ prompt² < prefill_tokens² there)")
    return 0


# int or float per PassRecord field (a zero of the field's type)
_RECORD_KINDS = (0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0, 0.0, 0.0, False, 0, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="copy the trace rows the loop needs")
    p.add_argument("--trace", default=TRACE)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_prepare)
    d = sub.add_parser("device", help="on the GPU: smoke, profile, serve")
    d.add_argument("--out", required=True)
    d.add_argument("--requests", default=None, help="rows from `prepare`; omit to skip serving")
    d.add_argument("--smoke", action="store_true")
    d.add_argument("--profile-budget-s", type=float, default=0.0)
    d.add_argument("--reps", type=int, default=5)
    d.add_argument("--speed", type=float, default=3.0, help="trace time / loop time")
    d.add_argument("--runs", default="A:0:60",
                   help="loop runs NAME:TRACE_START_S:WINDOW_S, comma-separated (window in "
                        "loop time); each writes passes_NAME.csv and serve_NAME.json")
    d.add_argument("--wall-s", type=float, default=540.0, help="whole command's wall budget")
    d.add_argument("--drain-s", type=float, default=40.0, help="wall kept for draining")
    d.add_argument("--snapshots", type=int, default=8)
    d.add_argument("--kv-tokens", type=int, default=480_000)
    d.add_argument("--eager", action="store_true", help="no CUDA graphs")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-gate", action="store_true", help=argparse.SUPPRESS)  # CPU dry runs
    d.add_argument("--model", default=None, help="analyze with this performance model too")
    d.set_defaults(fn=cmd_device)
    a = sub.add_parser("analyze", help="drift of a loop run under a performance model")
    a.add_argument("--run", required=True, help="folder with passes.csv and serve.json")
    a.add_argument("--model", required=True)
    a.add_argument("--name", default="", help="run name (passes_NAME.csv, serve_NAME.json)")
    a.add_argument("--json", default=None)
    a.set_defaults(fn=cmd_analyze)
    lt = sub.add_parser("loop-table", help="a loop run's passes as a profile table")
    lt.add_argument("--passes", required=True)
    lt.add_argument("--out", required=True)
    lt.add_argument("--kv-bytes-per-token", type=int, default=131072)
    lt.set_defaults(fn=cmd_loop_table)
    pa = sub.add_parser("profile-a2", help="fill in Σ prompt² of a profile from its sweep")
    pa.add_argument("--profile", required=True, help="profile.csv written by `device`")
    pa.add_argument("--out", required=True)
    pa.add_argument("--seed", type=int, default=0, help="the sweep's seed (device --seed)")
    pa.add_argument("--sweep-n", type=int, default=20_000, help="shapes the sweep drew")
    pa.add_argument("--sweep-kv-cap-tokens", type=int, default=432_000,
                    help="int(0.9 × the runner's KV capacity), as `device` passes it")
    pa.set_defaults(fn=cmd_profile_a2)
    args = ap.parse_args(argv)
    rc: int = args.fn(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())

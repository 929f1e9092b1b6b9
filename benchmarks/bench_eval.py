"""Speed of `throttllem evaluate`: simulated trace-seconds per wall-second, per policy.

Each policy runs alone on the same window (default: the whole hour of the Azure conversation
trace, time-scaled to the peak of four H100 Llama-3-8B instances as `throttllem evaluate`
does), timed wall-clock around `evaluate` (trace loading, oracle predictions, the static
clock search and the performance model load included; one instance's capacity is measured
once, before the timed runs). "sim s" is the simulated span; "iters" the engine passes;
"ticks" controller ticks; "s per trace-hour" scales the wall time to a 60-minute window;
"cpu s" is the process's CPU time over the same span (what other work on a shared machine
inflates least; ONNX Runtime's threads count too, when the model's grid is compiled). The
load average before and after is printed with the table.
With `--cold`, each predictive policy also runs with every clock search started cold
(`warm_start=False`; same decisions, checked) right after its warm run, and "warm/cold"
is the ratio of the two wall times.

    python benchmarks/bench_eval.py [--minutes 60] [--perf-model twin] [--cold]
        [--json runs/bench_eval.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import msgspec  # noqa: E402

from throttllem._eval import POLICIES, EvalOptions, evaluate  # noqa: E402

# Policies whose runs make no controller clock search (`static` picks its one clock by
# whole simulations): warm or cold, they are the same run.
NO_CLOCK_SEARCH = {"default", "autoscale", "retail", "static"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="conv")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--start-minute", type=float, default=0.0)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--peak-rps", type=float, default=None)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--perf-model", default=None,
                    help="default: the shipped model (as the CLI); 'twin': the oracle formula")
    ap.add_argument("--cold", action="store_true",
                    help="also run predictive policies with cold clock searches (ratio)")
    ap.add_argument("--json", type=Path, default=Path("runs/bench_eval.json"))
    args = ap.parse_args()

    rows = []
    load_before = os.getloadavg()
    base = EvalOptions(trace=args.trace, minutes=args.minutes, start_minute=args.start_minute,
                       instances=args.instances, peak_rps=args.peak_rps,
                       perf_model=args.perf_model, policies=["default"])
    capacity = evaluate(base).capacity_rps
    for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
        opts = msgspec.structs.replace(base, policies=[name], capacity_rps=capacity)
        t0 = time.perf_counter()
        c0 = time.process_time()
        run = evaluate(opts).runs[name]
        wall_s = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        r = run.report
        row = {"policy": name, "wall_s": wall_s, "cpu_s": cpu_s, "sim_s": r.duration_s,
               "sim_s_per_wall_s": r.duration_s / wall_s,
               "wall_s_per_trace_hour": wall_s * 60.0 / args.minutes,
               "requests": r.requests_submitted, "iterations": run.iterations,
               "ticks": run.ticks, "energy_j": r.energy_j,
               "slo_attainment": r.slo_attainment}
        if args.cold and name not in NO_CLOCK_SEARCH:
            t0 = time.perf_counter()
            cold = evaluate(msgspec.structs.replace(opts, warm_start=False)).runs[name]
            row["cold_wall_s"] = time.perf_counter() - t0
            if cold.report != r:
                raise SystemExit(f"{name}: cold searches decided differently from warm ones")
        rows.append(row)

    load_after = os.getloadavg()
    head = f"{'policy':<12}{'requests':>9}{'iters':>9}{'ticks':>8}{'sim s':>9}{'wall s':>9}" \
           f"{'cpu s':>8}{'s per trace-hour':>18}{'warm/cold':>11}"
    print(head)
    print("-" * len(head))
    for row in rows:
        ratio = (f"{row['wall_s'] / row['cold_wall_s']:>11.2f}" if "cold_wall_s" in row
                 else f"{'–':>11}")
        print(f"{row['policy']:<12}{row['requests']:>9}{row['iterations']:>9}{row['ticks']:>8}"
              f"{row['sim_s']:>9.0f}{row['wall_s']:>9.1f}{row['cpu_s']:>8.1f}"
              f"{row['wall_s_per_trace_hour']:>18.1f}"
              f"{ratio}")
    print("load average (1/5/15 min) before {:.1f} {:.1f} {:.1f}, after {:.1f} {:.1f} {:.1f}"
          .format(*load_before, *load_after))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "bench_eval", "trace": args.trace, "minutes": args.minutes,
        "load_average_before": load_before, "load_average_after": load_after,
        "instances": args.instances, "peak_rps": args.peak_rps, "capacity_rps": capacity,
        "perf_model": args.perf_model or "shipped", "python": platform.python_version(),
        "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"(wrote {args.json})")


if __name__ == "__main__":
    main()

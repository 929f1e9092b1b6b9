"""How much of throttLL'eM's saving rests on the twin's power model: the `freq` policy's
energy saving vs `default`, and its SLO attainment, with one stated assumption changed at a
time: the profile's `[power]` parameters whose source says "assumption", and its
`[clocking]` ones (locked idle power, clock-switch latency); plus the older twin without the
clocking costs (`--no-fidelity`).

Simulated throughout (the serving twin): this is a sensitivity of the simulation, not a
measurement. Each row is one `throttllem evaluate` of the same window.

    python benchmarks/bench_eval_sensitivity.py [--minutes 20] [--json PATH]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from throttllem._eval import EvalOptions, evaluate  # noqa: E402
from throttllem._eval.driver import BAND_VARIANTS  # noqa: E402
from throttllem._setup import DEFAULT_SETUP  # noqa: E402
from throttllem._twin.profile import load_profile  # noqa: E402

# One assumption at a time, around the shipped value (the profile's sources say why each is
# an assumption: the measured table, all at the card's own clock, cannot pin them down).
SWEEP: dict[str, tuple[float, ...]] = {
    "static_w": (120.0, 240.0),
    "voltage_min_ratio": (0.6, 0.8),
    "voltage_knee_mhz": (800.0, 1200.0),
}
# The clocking assumptions, at the ends of the evaluator's saving band (BAND_VARIANTS).
CLOCKING_SWEEP = ("locked_idle=low", "locked_idle=high", "switch_latency_s=0.02",
                  "switch_latency_s=0.5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="conv")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--peak-load", type=float, default=1.0)
    ap.add_argument("--perf-model", default=None)
    ap.add_argument("--json", type=Path, default=Path("runs/bench_eval_sensitivity.json"))
    args = ap.parse_args()

    power = load_profile(DEFAULT_SETUP).power
    cases: list[tuple[str, dict[str, float], dict[str, str | float], bool]] = [
        ("shipped profile", {}, {}, True), ("older twin (--no-fidelity)", {}, {}, False)]
    for name, values in SWEEP.items():
        cases += [(f"{name}={v:g} (shipped {getattr(power, name):g})", {name: v}, {}, True)
                  for v in values]
    cases += [(variant, {}, BAND_VARIANTS[variant][1], True) for variant in CLOCKING_SWEEP]
    rows = []
    capacity = None
    for label, overrides, clocking, fidelity in cases:
        t0 = time.perf_counter()
        ev = evaluate(EvalOptions(trace=args.trace, minutes=args.minutes,
                                  instances=args.instances, peak_load=args.peak_load,
                                  capacity_rps=capacity, policies=["default", "freq"],
                                  perf_model=args.perf_model, power=overrides,
                                  clocking=clocking, fidelity=fidelity))
        capacity = ev.capacity_rps  # power does not change capacity: measure it once
        d, f = ev.runs["default"].report, ev.runs["freq"].report
        rows.append({"case": label, "overrides": {**overrides, **clocking},
                     "fidelity": fidelity, "floor_mhz": ev.floor_mhz,
                     "default_kj": d.energy_j / 1e3, "freq_kj": f.energy_j / 1e3,
                     "saving": 1 - f.energy_j / d.energy_j, "freq_slo": f.slo_attainment,
                     "default_slo": d.slo_attainment, "freq_clock_mhz": f.mean_sm_clock_mhz,
                     "wall_s": time.perf_counter() - t0})
    head = (f"{'twin assumption':<40}{'floor MHz':>10}{'default kJ':>12}{'freq kJ':>10}"
            f"{'saving':>8}{'freq SLO':>10}{'clock':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case']:<40}{r['floor_mhz']:>10}{r['default_kj']:>12.1f}{r['freq_kj']:>10.1f}"
              f"{100 * r['saving']:>7.1f}%{100 * r['freq_slo']:>9.1f}%"
              f"{r['freq_clock_mhz']:>7.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "bench_eval_sensitivity",
                                     "trace": args.trace, "minutes": args.minutes,
                                     "instances": args.instances, "peak_load": args.peak_load,
                                     "capacity_rps": capacity, "energy": "twin (simulated)",
                                     "rows": rows}, indent=2))
    print(f"(simulated; wrote {args.json})")


if __name__ == "__main__":
    main()

"""Cross-check: the twin's prefill power per clock against published clock-locked H100
figures (2048-token prefill, ratio to the 1830 MHz value; `throttllem._twin.crosscheck`
says where they come from). Simulated (the twin's model), compared with published numbers.

    python benchmarks/bench_twin_prefill_power.py [--setup NAME]
"""

from __future__ import annotations

import argparse

from throttllem._setup import DEFAULT_SETUP
from throttllem._twin.crosscheck import REFERENCE_MHZ, prefill_power_ratios
from throttllem._twin.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", default=DEFAULT_SETUP)
    args = ap.parse_args()
    profile = load_profile(args.setup)
    print(f"setup {profile.name}: 2048-token prefill, power relative to {REFERENCE_MHZ} MHz")
    print("clock MHz  twin W  twin ratio  published ratio  verdict")
    for r in prefill_power_ratios(profile):
        print(f"{r.clock_mhz:>9}  {r.twin_power_w:6.0f}  {r.twin_ratio:10.2f}  "
              f"{r.published_low:.2f}-{r.published_high:.2f}       {r.verdict}")


if __name__ == "__main__":
    main()

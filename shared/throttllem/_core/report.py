"""The run summary shared by `throttllem demo` and `throttllem evaluate`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from throttllem._core.slo import DEFAULT_SLO_CLASSES, SloClass, check_slo
from throttllem._events import EngineIteration, RequestCompleted


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    p50: float
    p99: float


class ClockAccumulator:
    """Busy-time-weighted mean SM clock over engine iterations."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self._clock_x_s = 0.0
        self.iterations = 0
        self._batch_x_s = 0.0

    def add(self, it: EngineIteration) -> None:
        dur_s = it.duration_ms / 1e3
        self.busy_s += dur_s
        self._clock_x_s += it.clock_mhz * dur_s
        self._batch_x_s += it.batch_size * dur_s
        self.iterations += 1

    @property
    def mean_clock_mhz(self) -> float:
        return self._clock_x_s / self.busy_s if self.busy_s > 0 else float("nan")

    @property
    def mean_batch(self) -> float:
        return self._batch_x_s / self.busy_s if self.busy_s > 0 else float("nan")


class RunReport(msgspec.Struct, frozen=True, kw_only=True):
    policy: str
    requests_submitted: int
    requests_served: int
    prompt_tokens: int
    generated_tokens: int
    energy_j: float
    j_per_token: float
    ttft_ms: Percentiles
    tbt_ms: Percentiles
    e2e_ms: Percentiles
    mean_sm_clock_mhz: float
    mean_batch: float
    slo_attainment: float
    ttft_attainment: float
    tbt_attainment: float
    e2e_attainment: float
    duration_s: float
    energy_source: str = "twin (simulated)"
    requests_rejected: int = 0
    latency_source: str = "twin (simulated)"


def _pct(values: Sequence[float]) -> Percentiles:
    if not values:
        return Percentiles(p50=float("nan"), p99=float("nan"))
    arr = np.asarray(values, dtype=np.float64)
    p50, p99 = np.percentile(arr, [50.0, 99.0])
    return Percentiles(p50=float(p50), p99=float(p99))


def summarize(completions: Sequence[RequestCompleted], *, policy: str, submitted: int,
              energy_j: float, clocks: ClockAccumulator, duration_s: float, rejected: int = 0,
              slo_classes: Mapping[str, SloClass] = DEFAULT_SLO_CLASSES,
              energy_source: str = "twin (simulated)",
              latency_source: str = "twin (simulated)") -> RunReport:
    """Summarize a run. Unserved requests (rejected or never finished) count against SLO
    attainment."""
    outcomes = [check_slo(c, slo_classes) for c in completions]
    denominator = max(submitted, 1)
    generated = sum(c.generated_tokens for c in completions)
    # Single-token requests have no time between tokens; leave them out of TBT percentiles.
    tbts = [c.tbt_mean_ms for c in completions if c.generated_tokens > 1]
    return RunReport(
        policy=policy,
        requests_submitted=submitted,
        requests_served=len(completions),
        prompt_tokens=sum(c.prompt_tokens for c in completions),
        generated_tokens=generated,
        energy_j=energy_j,
        j_per_token=energy_j / generated if generated else float("nan"),
        ttft_ms=_pct([c.ttft_ms for c in completions]),
        tbt_ms=_pct(tbts),
        e2e_ms=_pct([c.e2e_ms for c in completions]),
        mean_sm_clock_mhz=clocks.mean_clock_mhz,
        mean_batch=clocks.mean_batch,
        slo_attainment=sum(o.all_ok for o in outcomes) / denominator,
        ttft_attainment=sum(o.ttft_ok for o in outcomes) / denominator,
        tbt_attainment=sum(o.tbt_ok for o in outcomes) / denominator,
        e2e_attainment=sum(o.e2e_ok for o in outcomes) / denominator,
        duration_s=duration_s,
        energy_source=energy_source,
        requests_rejected=rejected,
        latency_source=latency_source,
    )


def _or_unmeasured(value: float, text: str) -> str:
    return "not measured" if math.isnan(value) else text


def format_table(reports: Sequence[RunReport]) -> str:
    """One plain-text table, a column per report."""
    base = next((r for r in reports if r.policy == "default"), None)
    rows: list[tuple[str, list[str]]] = [
        ("policy", [r.policy for r in reports]),
        ("requests served", [f"{r.requests_served}/{r.requests_submitted}" for r in reports]),
        ("  refused or failed", [f"{r.requests_rejected}" for r in reports]),
        ("prompt tokens", [f"{r.prompt_tokens:,}" for r in reports]),
        ("generated tokens", [f"{r.generated_tokens:,}" for r in reports]),
        ("energy (J)", [_or_unmeasured(r.energy_j, f"{r.energy_j:,.0f}") for r in reports]),
        ("energy (J/gen. token)", [_or_unmeasured(r.j_per_token, f"{r.j_per_token:.3f}")
                                   for r in reports]),
        *([("energy saved vs default", [
            _or_unmeasured(r.energy_j + base.energy_j,
                           f"{100 * (1 - r.energy_j / base.energy_j):.1f}%")
            for r in reports])] if base is not None else []),
        ("TTFT p50/p99 (ms)", [f"{r.ttft_ms.p50:.0f} / {r.ttft_ms.p99:.0f}" for r in reports]),
        ("TBT p50/p99 (ms)", [f"{r.tbt_ms.p50:.1f} / {r.tbt_ms.p99:.1f}" for r in reports]),
        ("E2E p50/p99 (ms)", [f"{r.e2e_ms.p50:.0f} / {r.e2e_ms.p99:.0f}" for r in reports]),
        ("SLO attainment", [f"{100 * r.slo_attainment:.1f}%" for r in reports]),
        ("  TTFT / TBT / E2E", [f"{100 * r.ttft_attainment:.1f} / {100 * r.tbt_attainment:.1f} / "
                                f"{100 * r.e2e_attainment:.1f}%" for r in reports]),
        ("mean SM clock (MHz)", [f"{r.mean_sm_clock_mhz:.0f}" for r in reports]),
        ("mean batch size", [f"{r.mean_batch:.1f}" for r in reports]),
        ("trace time (s)", [f"{r.duration_s:.0f}" for r in reports]),
        ("energy source", [r.energy_source for r in reports]),
        ("latency source", [r.latency_source for r in reports]),
    ]
    width = max(len(name) for name, _ in rows)
    cols = [max(len(v[i]) for _, v in rows) for i in range(len(reports))]
    lines = []
    for n, (name, values) in enumerate(rows):
        cells = "  ".join(v.rjust(cols[i]) for i, v in enumerate(values))
        lines.append(f"{name.ljust(width)}  {cells}")
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)

"""The evaluation driver: policies compared on a trace window in simulated time.

How a run is set up, as the paper sets up its evaluation:

1. **Capacity.** One instance's capacity `C` (requests/s) is measured on the twin: the
   window's first requests, re-timed to a mean rate r, served by one instance at the top
   clock; `C` is the highest r (bisection) at which the SLO attainment still reaches the
   target (`--slo-target`, default 99%). `--capacity-rps` sets it instead.
2. **Time-scaling.** The window is time-scaled so that its busiest minute carries
   `--peak-load` × N × C requests/s, N = `--instances`: the system is sized for the trace's
   peak, as the `default` baseline is. `--peak-rps` sets the peak rate instead.
3. **Policies** (`throttllem._eval.policies`) serve the very same requests (the demo's ids,
   tenants and oracle length noise) on fresh engine twins. `static` first searches its clock
   on the busiest minutes of the scaled window. `--length-errors` adds `throttllem` runs at
   other length-prediction errors.
4. **Energy** is integrated over a common horizon (the latest end of any run), so idle tails
   count the same for all. Energy and latencies come from the serving twin, never from
   measured hardware.
5. **Saving band** (`--band`): every policy but `static` again, with each assumed power,
   idle-power and clock-switch parameter of the twin at the low and at the high end of its
   plausible range (`BAND_VARIANTS`), one at a time, on the same requests; each policy's
   saving vs `default` then spans a band, not one number.

The twin's clock costs (`[clocking]`: locked idle power, switch latency) are on by default and
the predictive controller knows them; `fidelity=False` (`--no-fidelity`) is the older twin
(one idle power whatever the lock, instant clock changes) and a controller that knows neither.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from throttllem._core.perf import PerfModel
from throttllem._core.placement import EngineShape, Policy, clock_policy
from throttllem._core.report import ClockAccumulator, RunReport, summarize
from throttllem._core.scaling import ScalingPolicy
from throttllem._core.slo import (
    DEFAULT_SLO_CLASSES,
    SloClass,
    load_slo_classes,
    require_slo_class,
)
from throttllem._errors import ConfigError
from throttllem._eval.node import (
    NODE_POLICIES,
    build_node,
    format_node_lines,
    node_simulation,
    node_summary,
)
from throttllem._eval.policies import (
    DEFAULT_POLICIES,
    POLICIES,
    POLICY_SPECS,
    PREDICTIVE,
    PolicySpec,
    lowest_passing_clock,
    make_policy,
    oracle_predictions,
)
from throttllem._eval.sim import Simulation, Timeline
from throttllem._events import RequestArrived
from throttllem._length.oracle import parse_length_error
from throttllem._setup import DEFAULT_SETUP, load_setup
from throttllem._trace import WindowSpec, peak_rate_per_s, window_requests
from throttllem._twin.clockmodel import efficient_clock_mhz, oracle_perf_model
from throttllem._twin.costs import controller_idle_power
from throttllem._twin.profile import SetupProfile


class EvalOptions(msgspec.Struct, frozen=True, kw_only=True):
    trace: str = "conv"
    minutes: float = 60.0
    start_minute: float = 0.0
    instances: int = 4  # sized for the peak: `default` runs them all the time
    peak_rps: float | None = None  # None: peak_load × instances × capacity
    peak_load: float = 1.0
    time_scale: bool = True  # False: replay at the trace's own rate (peak_* ignored)
    capacity_rps: float | None = None  # None: measured on the twin
    policies: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_POLICIES))
    length_error: str = "0.15"
    length_errors: list[str] = msgspec.field(default_factory=list)  # extra throttllem runs
    setup: str = DEFAULT_SETUP
    perf_model: str | None = None  # None: the shipped model for the setup; "twin": oracle
    seed: int = 0
    retune_s: float = 0.1  # the live forecaster's retune period (at --speed 1)
    slo_target: float = 0.99
    warmup_s: float = 60.0  # a new instance's warm-up (model load), drawing idle power
    cooldown_s: float = 30.0
    future_prefills: bool = True  # False: the controller ignores arrivals to come (ablation)
    # False: every clock search starts cold, not at the instance's last answer (same
    # decisions, slower; benchmarks/bench_eval.py --cold measures the difference).
    warm_start: bool = True
    # Sensitivity: the twin's power-model parameters replaced (profile [power] names).
    power: dict[str, float] = msgspec.field(default_factory=dict)
    slo_config: Path | None = None  # TOML SLO classes (None: the built-in ones)
    slo_class: str = "standard"  # the class of every replayed request
    # The twin's clock costs (locked idle power, switch latency), known to the controller;
    # False: the older twin (flat idle power, instant switches) and a controller without them.
    fidelity: bool = True
    # Twin `[clocking]` parameters replaced, e.g. {"switch_latency_s": 0.5}.
    clocking: dict[str, str | float] = msgspec.field(default_factory=dict)
    # Also run every policy but `static` under each `BAND_VARIANTS` entry (saving band).
    band: bool = False
    # The node policies (`_eval/node.py`): the setups (TP configurations) the node autoscaler
    # may mix, and the node's GPUs (None: `instances` × the setup's TP degree).
    node_setups: list[str] = msgspec.field(default_factory=list)
    node_gpus: int | None = None


# One assumed parameter at a time at the low and high end of its plausible range: the
# `[power]` assumptions (the ranges of `benchmarks/bench_eval_sensitivity.py`), the locked
# idle power (per clock the lower and the higher of the published TP2 and TP4 per-GPU
# figures), and the switch latency (tens of ms to half a second: Velicka et al. report wide
# variation between GPUs; the throttLL'eM paper ~200 ms).
BAND_VARIANTS: dict[str, tuple[dict[str, float], dict[str, str | float]]] = {
    "static_w=120": ({"static_w": 120.0}, {}),
    "static_w=240": ({"static_w": 240.0}, {}),
    "voltage_min_ratio=0.6": ({"voltage_min_ratio": 0.6}, {}),
    "voltage_min_ratio=0.8": ({"voltage_min_ratio": 0.8}, {}),
    "voltage_knee_mhz=800": ({"voltage_knee_mhz": 800.0}, {}),
    "voltage_knee_mhz=1200": ({"voltage_knee_mhz": 1200.0}, {}),
    "locked_idle=low": ({}, {"locked_idle_w": "360:79 570:85 780:83 1080:92 1380:105 "
                                              "1680:139 1830:155"}),
    "locked_idle=high": ({}, {"locked_idle_w": "360:81 570:86 780:88 1080:96 1380:109 "
                                               "1680:150 1830:165"}),
    "switch_latency_s=0.02": ({}, {"switch_latency_s": 0.02}),
    "switch_latency_s=0.5": ({}, {"switch_latency_s": 0.5}),
}

class PolicyRun(msgspec.Struct, frozen=True, kw_only=True):
    report: RunReport
    gpu_energy_mj: list[float]  # each GPU's counter at the horizon
    idle_floor_j: float  # idle power × GPU-seconds provisioned
    instance_hours: float
    gpu_hours: float  # GPUs provisioned (warming and draining included) × hours
    deferred: int
    iterations: int
    ticks: int
    length_error: str | None  # None: the policy uses no length prediction
    timeline: Timeline
    tbt_ms: list[float]  # each served request's mean TBT (more than one token)
    e2e_ms: list[float]
    scale_events: int
    node: dict[str, Any] | None = None  # the node autoscaler's figures (node policies)


class Evaluation(msgspec.Struct, frozen=True, kw_only=True):
    runs: dict[str, PolicyRun]
    capacity_rps: float | None  # None: not needed (no time-scaling, no autoscaler)
    capacity_measured: bool
    peak_rps: float
    rate_factor: float
    static_clock_mhz: int | None
    floor_mhz: int | None
    requests: int
    horizon_s: float
    slo_classes: dict[str, SloClass]  # the classes that steered and scored the runs
    # variant -> policy -> saving vs default (the `--band` runs; empty without them)
    band_savings: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)

    def saving_band(self, policy: str) -> tuple[float, float] | None:
        """(min, max) saving vs default over the base run and every band variant."""
        base = self.runs.get("default")
        run = self.runs.get(policy)
        if base is None or run is None or not self.band_savings:
            return None
        values = [1 - run.report.energy_j / base.report.energy_j]
        values += [v[policy] for v in self.band_savings.values() if policy in v]
        return (min(values), max(values)) if len(values) > 1 else None


def perf_model_for(setup: str, spec: str | None) -> PerfModel:
    """The controller's performance model on `setup` (a setup name or file): `spec` names a
    model folder or shipped model (default: the setup's own), or `twin` for the twin's own
    formula (an oracle, for ablations)."""
    if spec == "twin":
        from throttllem._twin.profile import load_profile  # noqa: PLC0415

        return oracle_perf_model(load_profile(setup))
    from throttllem._perf.runtime import load_perf_model  # noqa: PLC0415 - onnxruntime

    return load_perf_model(spec or load_setup(setup).name)


def with_power(profile: SetupProfile, overrides: dict[str, float]) -> SetupProfile:
    """The profile with some `[power]` parameters replaced (for sensitivity studies)."""
    if not overrides:
        return profile
    known = {f.name for f in dataclasses.fields(profile.power)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"--power: unknown parameter(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(profile, power=dataclasses.replace(profile.power, **overrides))


def parse_power(text: str) -> dict[str, float]:
    """`static_w=120,voltage_min_ratio=0.6` → {name: value}."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise ConfigError(f"--power takes name=value pairs, not {part!r}") from exc
        if not sep:
            raise ConfigError(f"--power takes name=value pairs, not {part!r}")
    return out


def _retimed(requests: Sequence[RequestArrived], factor: float) -> list[RequestArrived]:
    """Arrivals compressed by `factor` (> 1: faster), the first at 0."""
    t0 = requests[0].arrival_s
    return [msgspec.structs.replace(r, arrival_s=(r.arrival_s - t0) / factor)
            for r in requests]


def _attainment(profile: SetupProfile, requests: Sequence[RequestArrived],
                instances: int, *, clock_mhz: int | None = None,
                slo_classes: Mapping[str, SloClass] = DEFAULT_SLO_CLASSES) -> float:
    """SLO attainment of join-shortest-queue serving at one fixed clock (None: default)."""
    names = [f"p{k}" for k in range(instances)]
    shape = EngineShape.of(profile.setup)
    if clock_mhz is None:
        policy = make_policy("default", names, shape=shape)
    else:
        policy = make_policy("static", names, shape=shape, static_clock_mhz=clock_mhz)
    sim = Simulation(profile, names, policy)
    res = sim.run(requests)
    report = summarize(res.completions, policy="probe", submitted=res.submitted, energy_j=0.0,
                       clocks=ClockAccumulator(), duration_s=res.end_s,
                       rejected=len(res.rejected), slo_classes=slo_classes)
    return report.slo_attainment


def measure_capacity_rps(profile: SetupProfile, requests: Sequence[RequestArrived], *,
                         slo_target: float, probe_requests: int = 800,
                         steps: int = 7,
                         slo_classes: Mapping[str, SloClass] = DEFAULT_SLO_CLASSES) -> float:
    """The highest mean arrival rate (requests/s) at which one instance at its default
    clock still meets `slo_target` attainment on the window's first requests (bisection
    after a doubling search; the trace's own burstiness is kept, only re-timed)."""
    sample = list(requests[:probe_requests])
    if len(sample) < 20:
        raise ConfigError("too few requests in the window to measure capacity; pass "
                          "--capacity-rps")
    span_s = sample[-1].arrival_s - sample[0].arrival_s
    base_rps = (len(sample) - 1) / span_s if span_s > 0 else 1.0

    def meets(rate_rps: float) -> bool:
        return _attainment(profile, _retimed(sample, rate_rps / base_rps), 1,
                           slo_classes=slo_classes) >= slo_target

    lo, hi = 0.0, 1.0
    while meets(hi):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError("capacity search diverged; pass --capacity-rps")
    if lo == 0.0:
        lo = hi / 64
        if not meets(lo):
            raise ConfigError(f"one instance misses the SLO target even at {lo:.3g} "
                              f"requests/s; check the SLO classes or pass --capacity-rps")
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def peak_segment(requests: Sequence[RequestArrived], *, window_s: float = 60.0,
                 margin_s: float = 120.0) -> list[RequestArrived]:
    """The busiest `window_s` of the arrivals with `margin_s` on each side (queues that
    build up just before the peak count), re-based to start at 0."""
    times = [r.arrival_s for r in requests]
    best, best_start, j = 0, 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window_s:
            j += 1
        if i - j + 1 > best:
            best, best_start = i - j + 1, j
    t_peak = times[best_start]
    seg = [r for r in requests if t_peak - margin_s <= r.arrival_s <= t_peak + window_s
           + margin_s]
    return _retimed(seg, 1.0)


def static_clock_mhz(profile: SetupProfile, requests: Sequence[RequestArrived],
                     instances: int, clocks: Sequence[int], floor_mhz: int, *,
                     slo_target: float,
                     slo_classes: Mapping[str, SloClass] = DEFAULT_SLO_CLASSES) -> int:
    """The lowest clock (not below the efficiency floor) at which the busiest minutes of
    the window meet `slo_target` attainment with every instance locked there; the top
    clock when none does."""
    segment = peak_segment(requests)
    candidates = [c for c in clocks if c >= floor_mhz]
    chosen = lowest_passing_clock(
        candidates,
        lambda c: _attainment(profile, segment, instances, clock_mhz=c,
                              slo_classes=slo_classes) >= slo_target)
    return chosen if chosen is not None else clocks[-1]


def _spec(name: str) -> PolicySpec:
    return POLICY_SPECS[name] if name in POLICY_SPECS else NODE_POLICIES[name]


def _runs_to_make(opts: EvalOptions) -> list[tuple[str, str, str | None]]:
    """(label, policy, length error) for every run, in table order."""
    out: list[tuple[str, str, str | None]] = []
    for name in opts.policies:
        predictive = name in PREDICTIVE or _spec(name).admission == "place"
        out.append((name, name, opts.length_error if predictive else None))
    if "throttllem" in opts.policies:
        for err in opts.length_errors:
            if parse_length_error(err) != parse_length_error(opts.length_error):
                out.append((f"throttllem[err={err}]", "throttllem", err))
    return out


def _twin_profile(opts: EvalOptions, setup: str) -> SetupProfile:
    """The twin profile of `setup` with the options' power, fidelity and clocking changes."""
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    profile = with_power(load_profile(setup), opts.power)
    if not opts.fidelity:
        profile = profile.with_overrides({"clocking.locked_idle_w": "flat",
                                          "clocking.switch_latency_s": 0.0})
    if opts.clocking:
        profile = profile.with_overrides({f"clocking.{k}": v for k, v in opts.clocking.items()})
    return profile


def _node_clock_policy(opts: EvalOptions, profile: SetupProfile) -> Policy:
    """A node pool's clock policy, as the single-setup runs get theirs: the setup's own
    shipped performance model (or the twin's formula with `--perf-model twin`)."""
    spec = "twin" if opts.perf_model == "twin" else None
    policy = clock_policy(profile.setup, perf_model_for(profile.setup.name, spec))
    if not opts.future_prefills:
        policy = dataclasses.replace(policy, arrival_window_s=None)
    if not opts.warm_start:
        policy = dataclasses.replace(policy, warm_start=False)
    if opts.power:
        policy = dataclasses.replace(policy, floor_mhz=efficient_clock_mhz(profile))
    return policy


def evaluate(opts: EvalOptions) -> Evaluation:
    """Set up the window (capacity, time-scaling) and run every policy on it."""
    if opts.instances < 1:
        raise ConfigError("--instances must be at least 1")
    if opts.minutes <= 0 or opts.retune_s <= 0 or opts.peak_load <= 0:
        raise ConfigError("the window length, --retune-s and --peak-load must be positive")
    if not 0 < opts.slo_target <= 1:
        raise ConfigError("--slo-target is a fraction in (0, 1]")
    known = (*POLICIES, *NODE_POLICIES)
    unknown = [p for p in opts.policies if p not in known]
    if unknown or not opts.policies:
        raise ConfigError(f"--policies takes some of {', '.join(known)}, not {unknown}")
    if any(p in NODE_POLICIES for p in opts.policies) and not opts.node_setups:
        raise ConfigError("the node policies need --node-setups (the TP configurations the "
                          "node may run, e.g. h100-llama2-13b-tp1,h100-llama2-13b-tp2)")
    for spec in (opts.length_error, *opts.length_errors):
        parse_length_error(spec)
    profile = _twin_profile(opts, opts.setup)
    idle_power = controller_idle_power(profile) if opts.fidelity else None
    switch_latency_s = profile.clocking.switch_latency_s
    slo_classes = load_slo_classes(opts.slo_config)
    require_slo_class(opts.slo_class, slo_classes)

    def window(peak_rps: float | None) -> list[RequestArrived]:
        return list(window_requests(WindowSpec(
            trace=opts.trace, minutes=opts.minutes, start_minute=opts.start_minute,
            seed=opts.seed, peak_rps=peak_rps, slo_class=opts.slo_class), offset_s=0.0))

    unscaled = window(None)
    if len(unscaled) < 2:
        raise ConfigError(f"the trace window (start {opts.start_minute} min, "
                          f"{opts.minutes} min) holds too few requests")
    runs_to_make = _runs_to_make(opts)
    scaled_by_capacity = opts.time_scale and opts.peak_rps is None
    capacity = opts.capacity_rps
    measured = capacity is None
    if capacity is not None and capacity <= 0:
        raise ConfigError("--capacity-rps must be positive")
    if capacity is None and (scaled_by_capacity or any(
            _spec(name).scaling for _, name, _ in runs_to_make)):
        capacity = measure_capacity_rps(profile, unscaled, slo_target=opts.slo_target,
                                        slo_classes=slo_classes)
    if not opts.time_scale:
        peak_rps, requests = peak_rate_per_s([r.arrival_s for r in unscaled]), unscaled
    else:
        peak_rps = opts.peak_rps or opts.peak_load * opts.instances * (capacity or 0.0)
        requests = window(peak_rps)
    span_unscaled = unscaled[-1].arrival_s - unscaled[0].arrival_s
    span_scaled = requests[-1].arrival_s - requests[0].arrival_s
    rate_factor = span_unscaled / span_scaled if span_scaled > 0 else 1.0

    instances = [f"i{n}" for n in range(opts.instances)]
    needs_controller = any(name not in {"default", "autoscale", *NODE_POLICIES}
                           for _, name, _ in runs_to_make)
    shape = EngineShape.of(profile.setup)
    policy = None
    if needs_controller:
        policy = clock_policy(profile.setup, perf_model_for(opts.setup, opts.perf_model))
        if not opts.future_prefills:
            policy = dataclasses.replace(policy, arrival_window_s=None)
        if not opts.warm_start:
            policy = dataclasses.replace(policy, warm_start=False)
        if opts.power:  # the floor is the most efficient clock under the power model used
            policy = dataclasses.replace(policy, floor_mhz=efficient_clock_mhz(profile))
    scaling = None if capacity is None else ScalingPolicy(
        capacity_per_instance=capacity, min_instances=1, max_instances=opts.instances,
        warmup_s=opts.warmup_s, cooldown_s=opts.cooldown_s)
    static_mhz = None
    if "static" in opts.policies:
        assert policy is not None
        static_mhz = static_clock_mhz(profile, requests, opts.instances, policy.clocks.mhz,
                                      policy.floor_mhz, slo_target=opts.slo_target,
                                      slo_classes=slo_classes)
    predictions: dict[str, dict[str, tuple[float, float]]] = {}
    node = None
    if any(name in NODE_POLICIES for _, name, _ in runs_to_make):
        assert capacity is not None
        node = build_node(
            opts.node_setups, node_gpus=opts.node_gpus or opts.instances
            * profile.engine.tp_degree, base=profile, base_capacity=capacity,
            profile_of=lambda s: _twin_profile(opts, s),
            capacity_of=lambda p: measure_capacity_rps(
                p, unscaled, slo_target=opts.slo_target, slo_classes=slo_classes),
            clock_policy_of=lambda p: _node_clock_policy(opts, p),
            fidelity=opts.fidelity, warmup_s=opts.warmup_s, cooldown_s=opts.cooldown_s)

    sims: dict[str, Simulation] = {}
    errors: dict[str, str | None] = {}
    for label, name, err in runs_to_make:
        preds: dict[str, tuple[float, float]] | None = None
        if err is not None:
            if err not in predictions:
                predictions[err] = oracle_predictions(requests, parse_length_error(err),
                                                      opts.seed)
            preds = predictions[err]
        if name in NODE_POLICIES:
            assert node is not None
            sim = node_simulation(name, node.policy, node.pools(name), base=profile,
                                  predictions=preds, tick_s=opts.retune_s,
                                  slo_classes=slo_classes, label=label)
        else:
            sim = Simulation(profile, instances, make_policy(
                name, instances, shape=shape, policy=policy, predictions=preds,
                scaling=scaling, static_clock_mhz=static_mhz, tick_s=opts.retune_s,
                label=label, slo_classes=slo_classes, idle_power=idle_power,
                switch_latency_s=switch_latency_s))
        sim.run(requests)
        sims[label] = sim
        errors[label] = err
    horizon_s = max(sim.result.end_s for sim in sims.values())
    runs: dict[str, PolicyRun] = {}
    for label, sim in sims.items():
        res = sim.result
        energy_j = sim.finish(horizon_s)
        report = summarize(res.completions, policy=label, submitted=res.submitted,
                           energy_j=energy_j, clocks=res.clocks, rejected=len(res.rejected),
                           duration_s=horizon_s, slo_classes=slo_classes)
        instance_s = sim.instance_seconds(horizon_s)
        runs[label] = PolicyRun(
            report=report, gpu_energy_mj=sim.gpu_energy_mj(),
            idle_floor_j=profile.gpu.idle_power_w * sim.gpu_seconds(horizon_s),
            instance_hours=instance_s / 3600.0,
            gpu_hours=sim.gpu_seconds(horizon_s) / 3600.0, deferred=sim.policy.deferred,
            iterations=res.iterations, ticks=res.ticks, length_error=errors[label],
            timeline=res.timeline,
            tbt_ms=[c.tbt_mean_ms for c in res.completions if c.generated_tokens > 1],
            e2e_ms=[c.e2e_ms for c in res.completions],
            scale_events=len(getattr(sim.policy, "scale_log", ())),
            node=node_summary(sim.policy, horizon_s))
    band: dict[str, dict[str, float]] = {}
    if opts.band:
        band = _band_savings(opts, capacity, peak_rps if opts.time_scale else None)
    return Evaluation(runs=runs, capacity_rps=capacity,
                      capacity_measured=measured and capacity is not None,
                      peak_rps=peak_rps, rate_factor=rate_factor, static_clock_mhz=static_mhz,
                      floor_mhz=policy.floor_mhz if policy is not None else None,
                      requests=len(requests), horizon_s=horizon_s,
                      slo_classes=dict(slo_classes), band_savings=band)


def _band_savings(opts: EvalOptions, capacity: float | None,
                  peak_rps: float | None) -> dict[str, dict[str, float]]:
    """Each policy's saving vs default under every `BAND_VARIANTS` entry, on the same
    requests (the same capacity and peak rate as the base run)."""
    policies = ["default", *(p for p in opts.policies if p not in ("default", "static"))]
    out: dict[str, dict[str, float]] = {}
    for variant, (power, clocking) in BAND_VARIANTS.items():
        ev = evaluate(msgspec.structs.replace(
            opts, band=False, policies=policies, length_errors=[], capacity_rps=capacity,
            peak_rps=peak_rps, power={**opts.power, **power},
            clocking={**opts.clocking, **clocking}))
        base = ev.runs["default"].report.energy_j
        out[variant] = {name: 1 - run.report.energy_j / base for name, run in ev.runs.items()
                        if name != "default"}
    return out


def to_document(ev: Evaluation, opts: EvalOptions) -> dict[str, Any]:
    """The JSON layout: {"policies": {name: figures}, "setup": ..., "options": ...}."""
    base = ev.runs.get("default")
    policies: dict[str, Any] = {}
    for name, run in ev.runs.items():
        r = run.report
        policies[name] = {
            **msgspec.to_builtins(r),
            "saving_vs_default": (1 - r.energy_j / base.report.energy_j) if base else None,
            "tokens_per_joule": r.generated_tokens / r.energy_j if r.energy_j > 0 else None,
            "instance_hours": run.instance_hours,
            "gpu_hours": run.gpu_hours,
            "idle_floor_j": run.idle_floor_j,
            "deferred": run.deferred,
            "iterations": run.iterations,
            "controller_ticks": run.ticks,
            "scale_events": run.scale_events,
            "length_error": run.length_error,
            "saving_band": (None if (band := ev.saving_band(name)) is None else list(band)),
            "node": run.node,
        }
    options = {k: str(v) if isinstance(v, Path) else v
               for k, v in msgspec.structs.asdict(opts).items()
               if not (isinstance(v, float) and math.isinf(v))}
    return {"policies": policies,
            "setup": {"capacity_rps": ev.capacity_rps,
                      "capacity": "measured on the twin" if ev.capacity_measured else "given",
                      "peak_rps": ev.peak_rps, "rate_factor": ev.rate_factor,
                      "requests": ev.requests, "horizon_s": ev.horizon_s,
                      "static_clock_mhz": ev.static_clock_mhz, "floor_mhz": ev.floor_mhz},
            "options": options,
            "slo_classes": msgspec.to_builtins(ev.slo_classes),
            "band_savings": ev.band_savings,
            "band_variants": {k: {**p, **c} for k, (p, c) in BAND_VARIANTS.items()}
            if ev.band_savings else {},
            "energy_source": "twin (simulated)", "time": "simulated (no wall clock)"}


def format_evaluation(ev: Evaluation) -> str:
    """One table, a row per run (the columns the comparison needs), under one line that says
    how the window was set up."""
    base = ev.runs.get("default")
    banded = bool(ev.band_savings)
    header = ("policy", "energy kJ", "saved", *(("band",) if banded else ()), "tok/J",
              "SLO met", "TTFT/TBT/E2E met",
              "TTFT p50/p99", "TBT p50/p99", "E2E p50/p99", "clock", "batch", "inst-h",
              "GPU-h", "deferred")
    rows: list[tuple[str, ...]] = []
    for name, run in ev.runs.items():
        r = run.report
        saved = "-" if base is None else f"{100 * (1 - r.energy_j / base.report.energy_j):.1f}%"
        band = ev.saving_band(name)
        band_cell = (("-" if band is None else
                      f"{100 * band[0]:.1f}..{100 * band[1]:.1f}%",) if banded else ())
        rows.append((
            name, f"{r.energy_j / 1e3:,.1f}", saved, *band_cell,
            f"{r.generated_tokens / r.energy_j:.2f}" if r.energy_j > 0 else "-",
            f"{100 * r.slo_attainment:.1f}%",
            f"{100 * r.ttft_attainment:.1f}/{100 * r.tbt_attainment:.1f}/"
            f"{100 * r.e2e_attainment:.1f}",
            f"{r.ttft_ms.p50:.0f}/{r.ttft_ms.p99:.0f}", f"{r.tbt_ms.p50:.1f}/{r.tbt_ms.p99:.1f}",
            f"{r.e2e_ms.p50:.0f}/{r.e2e_ms.p99:.0f}", f"{r.mean_sm_clock_mhz:.0f}",
            f"{r.mean_batch:.1f}", f"{run.instance_hours:.2f}", f"{run.gpu_hours:.2f}",
            f"{run.deferred}"))
    widths = [max(len(row[k]) for row in (header, *rows)) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if k == 0 else cell.rjust(widths[k])
                       for k, cell in enumerate(row)) for row in (header, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    static = f", static clock {ev.static_clock_mhz} MHz" if ev.static_clock_mhz else ""
    capacity = ("" if ev.capacity_rps is None else
                f"one instance's capacity {ev.capacity_rps:.2f} req/s "
                f"({'measured on the twin' if ev.capacity_measured else 'given'}); ")
    served = {f"{r.report.requests_served}/{r.report.requests_submitted}"
              for r in ev.runs.values()}
    head = (f"{ev.requests} requests (served: {', '.join(sorted(served))}); {capacity}trace "
            f"time-scaled x{ev.rate_factor:.2f} to a peak of {ev.peak_rps:.2f} req/s{static}; "
            f"{ev.horizon_s:.0f} s simulated")
    legend = ("saved: energy vs default; SLO met: share of requests meeting TTFT, mean TBT "
              "and E2E bounds (unserved count as missed); latencies in ms; clock: busy-time "
              "mean SM clock (MHz); inst-h: instance-hours; GPU-h: GPU-hours"
              + ("; band: saving's min..max over the assumed twin parameters' plausible "
                 "ranges (BAND_VARIANTS)" if banded else ""))
    nodes = {name: run.node for name, run in ev.runs.items() if run.node is not None}
    return "\n".join([head, *lines, legend, *format_node_lines(nodes), *_ranking(ev)])


def _ranking(ev: Evaluation, slo_target: float = 0.99) -> list[str]:
    """One line ranking the runs by saving: first those meeting `slo_target`, then the rest."""
    base = ev.runs.get("default")
    if base is None or len(ev.runs) < 2:
        return []
    saved = {n: 1 - r.report.energy_j / base.report.energy_j for n, r in ev.runs.items()}
    meeting = sorted((n for n, r in ev.runs.items() if r.report.slo_attainment >= slo_target),
                     key=lambda n: -saved[n])
    missing = sorted((n for n in ev.runs if n not in meeting), key=lambda n: -saved[n])
    line = (f"ranking (SLO met >= {100 * slo_target:.0f}%): "
            + ", ".join(f"{k}. {n} {100 * saved[n]:.1f}%" for k, n in enumerate(meeting, 1)))
    if missing:
        line += "; missing it: " + ", ".join(f"{n} {100 * saved[n]:.1f}%" for n in missing)
    return [line]

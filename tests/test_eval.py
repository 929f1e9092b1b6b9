"""`throttllem evaluate`: the controller's and scaler's functions on engine twins in simulated
time; the harness's accounting (energy integrates power, every request is served or
reported), the policies' rules, and the CLI's table, JSON and plots."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import msgspec
import pytest

from throttllem._core.clock_search import SupportedClocks
from throttllem._core.governor import ReactiveGovernor, reactive_clock
from throttllem._core.placement import EngineShape
from throttllem._errors import ConfigError
from throttllem._eval import EvalOptions, Simulation, evaluate, make_policy, to_document
from throttllem._eval.cli import add_evaluate_parser
from throttllem._eval.driver import (
    Evaluation,
    measure_capacity_rps,
    parse_length_error,
    peak_segment,
)
from throttllem._eval.policies import lowest_passing_clock
from throttllem._events import EngineIteration, RequestArrived
from throttllem._twin.profile import load_profile

SETUP = "h100-llama3-8b-tp1"
# Three minutes of the conversation trace time-scaled to a light peak (the autoscaler then
# has room to scale in), short warm-up and cool-down so it acts within the window. The
# twin's own timing formula as the controller's model keeps the test fast (the shipped ONNX
# model is the CLI's default).
OPTS = EvalOptions(trace="conv", minutes=3.0, instances=2, capacity_rps=15.0, peak_load=0.3,
                   perf_model="twin", seed=0, warmup_s=5.0, cooldown_s=5.0,
                   length_errors=["0.3"])


@pytest.fixture(scope="module")
def ev() -> Evaluation:
    return evaluate(OPTS)


def test_energy_is_the_gpus_counters_and_the_timeline_adds_up(ev: Evaluation) -> None:
    profile = load_profile(SETUP)
    for name, run in ev.runs.items():
        r = run.report
        assert r.energy_j == pytest.approx(sum(run.gpu_energy_mj) / 1e3, rel=1e-12), name
        assert sum(run.timeline.energy_j) == pytest.approx(r.energy_j, rel=1e-9), name
        assert r.energy_j >= run.idle_floor_j
        assert run.idle_floor_j == pytest.approx(
            profile.gpu.idle_power_w * run.instance_hours * 3600 * profile.engine.tp_degree)
    # One common horizon: every policy's idle tail counts up to the same instant.
    assert len({run.report.duration_s for run in ev.runs.values()}) == 1
    fixed = ev.runs["default"]
    assert fixed.instance_hours == pytest.approx(2 * ev.horizon_s / 3600)


def test_energy_integrates_pass_energy_and_idle_power() -> None:
    """Energy = Σ pass energy + idle power × (GPU-seconds existed − GPU-seconds busy), also
    across an instance added late and one removed early."""
    profile = load_profile(SETUP)
    requests = [RequestArrived(id=f"r{i}", arrival_s=0.2 * i, prompt_tokens=300 + 37 * i,
                               max_tokens=4096, true_output_tokens=40 + 11 * i)
                for i in range(30)]
    passes: list[EngineIteration] = []
    policy = make_policy("default", ["i0", "i1"], shape=EngineShape.of(profile.setup))
    on_iteration = policy.on_iteration

    def record(sim: Simulation, it: EngineIteration) -> None:
        passes.append(it)
        on_iteration(sim, it)

    policy.on_iteration = record  # type: ignore[method-assign]
    sim = Simulation(profile, ["i0", "i1"], policy)
    res = sim.run(requests)
    assert len(res.completions) == 30
    sim.now_s = res.end_s
    sim.remove_instance("i1")  # holds nothing now: stops drawing power at end_s
    sim.now_s = res.end_s + 2.0
    sim.add_instance("i9")  # exists (idles) from end_s + 2
    horizon_s = res.end_s + 10.0
    energy_j = sim.finish(horizon_s)
    busy_s = sum(p.duration_ms for p in passes) / 1e3
    existed_s = sim.instance_seconds(horizon_s)
    assert existed_s == pytest.approx(2 * res.end_s + 10.0 + 8.0)
    expected_j = (sum(p.energy_mj for p in passes) / 1e3
                  + profile.gpu.idle_power_w * (existed_s - busy_s))
    assert energy_j == pytest.approx(expected_j, rel=1e-6)
    with pytest.raises(ConfigError, match="exists already"):
        sim.add_instance("i0")


def test_every_request_is_served_or_reported(ev: Evaluation) -> None:
    submitted = {run.report.requests_submitted for run in ev.runs.values()}
    assert submitted == {ev.requests}
    assert ev.requests > 300
    for run in ev.runs.values():
        r = run.report
        assert r.requests_served + r.requests_rejected == r.requests_submitted
    tokens = {run.report.generated_tokens for run in ev.runs.values()}
    assert len(tokens) == 1  # the same work whatever the policy


def test_autoscaler_scales_in_and_new_instances_serve_only_after_warm_up(
        ev: Evaluation) -> None:
    default, autoscale = ev.runs["default"], ev.runs["autoscale"]
    assert autoscale.scale_events > 0
    assert autoscale.instance_hours < default.instance_hours
    assert autoscale.report.energy_j < default.report.energy_j
    assert default.scale_events == 0
    assert ev.runs["throttllem"].instance_hours < ev.runs["freq"].instance_hours


def test_a_scaled_out_instance_draws_power_while_warming_and_serves_after() -> None:
    profile = load_profile(SETUP)
    from throttllem._core.scaling import ScalingPolicy  # noqa: PLC0415

    # Load ramps from ~1 to ~20 requests/s: one instance (capacity 5/s) must scale out.
    requests, t = [], 0.0
    for i in range(400):
        t += 1.0 if i < 20 else 0.05
        requests.append(RequestArrived(id=f"r{i}", arrival_s=t, prompt_tokens=200,
                                       max_tokens=4096, true_output_tokens=30))
    scaling = ScalingPolicy(capacity_per_instance=5.0, max_instances=3, warmup_s=8.0,
                            cooldown_s=2.0)
    policy = make_policy("autoscale", ["i0"], shape=EngineShape.of(profile.setup),
                         scaling=scaling)
    sim = Simulation(profile, ["i0"], policy)
    res = sim.run(requests)
    outs = [(t_s, m.group(1)) for t_s, reason in policy.scale_log
            for m in re.finditer(r"scale-out (\w+)", reason)]
    assert outs, policy.scale_log
    for t_out, name in outs:
        served = [c for c in res.completions if c.instance == name]
        assert served, f"{name} never served"
        assert min(c.admitted_s for c in served) >= t_out + scaling.warmup_s - 1e-9
    assert len(res.completions) == 400
    assert sim.instance_seconds(res.end_s) > res.end_s  # more than one instance existed


def test_clock_policies_save_energy_within_slo(ev: Evaluation) -> None:
    default = ev.runs["default"].report
    for name in ("freq", "throttllem", "static"):
        r = ev.runs[name].report
        assert r.energy_j < 0.9 * default.energy_j, name
        assert r.mean_sm_clock_mhz < default.mean_sm_clock_mhz, name
        assert r.slo_attainment >= 0.95, name
    assert ev.runs["freq"].ticks > 0
    assert ev.runs["default"].ticks == 0
    assert ev.static_clock_mhz is not None
    assert ev.floor_mhz is not None
    assert ev.floor_mhz <= ev.static_clock_mhz <= 1980
    assert ev.runs["throttllem[err=0.3]"].length_error == "0.3"
    assert ev.runs["throttllem"].length_error == "0.15"
    assert ev.runs["default"].length_error is None


def test_json_document_has_the_promised_fields(ev: Evaluation) -> None:
    doc = to_document(ev, OPTS)
    assert set(doc["policies"]) == {"default", "autoscale", "freq", "throttllem", "retail",
                                    "static", "agft", "voltana", "throttllem[err=0.3]"}
    for figures in doc["policies"].values():
        assert {"energy_j", "saving_vs_default", "tokens_per_joule", "slo_attainment",
                "ttft_attainment", "tbt_attainment", "e2e_attainment", "instance_hours",
                "mean_sm_clock_mhz", "mean_batch", "saving_band"} <= set(figures)
        assert figures["saving_band"] is None  # no --band runs here
        assert 0.0 <= figures["slo_attainment"] <= 1.0
        assert figures["tokens_per_joule"] == pytest.approx(
            figures["generated_tokens"] / figures["energy_j"])
    assert doc["policies"]["default"]["saving_vs_default"] == 0.0
    assert doc["policies"]["throttllem"]["saving_vs_default"] == pytest.approx(
        1 - ev.runs["throttllem"].report.energy_j / ev.runs["default"].report.energy_j)
    assert doc["setup"]["capacity"] == "given"
    assert doc["setup"]["peak_rps"] == pytest.approx(0.3 * 2 * 15.0)


def test_same_options_same_json(ev: Evaluation) -> None:
    again = evaluate(msgspec.structs.replace(OPTS, policies=["default", "throttllem"],
                                             length_errors=[]))
    for name in ("default", "throttllem"):
        a, b = again.runs[name], ev.runs[name]
        # Energy is integrated up to the latest end of any run (other runs here): compare
        # everything that does not depend on that horizon, exactly.
        skip = {"energy_j", "j_per_token", "duration_s"}
        assert ({k: v for k, v in msgspec.to_builtins(a.report).items() if k not in skip}
                == {k: v for k, v in msgspec.to_builtins(b.report).items() if k not in skip})
        # Above the (unlocked) idle floor, only a GPU still locked at the horizon draws
        # more: at most the highest locked idle power's excess, over the horizons' gap.
        profile = load_profile(OPTS.setup)
        points = profile.clocking.locked_idle_points
        excess_w = 0.0 if points is None else (
            max(w for _, w in points) + 20.0 - profile.gpu.idle_power_w)  # +20: past 1830 MHz
        bound_j = excess_w * len(a.gpu_energy_mj) * abs(again.horizon_s - ev.horizon_s)
        assert abs((a.report.energy_j - a.idle_floor_j)
                   - (b.report.energy_j - b.idle_floor_j)) <= bound_j + 1e-6


def _request(i: int, t: float, prompt: int, out: int) -> RequestArrived:
    return RequestArrived(id=f"r{i}", arrival_s=t, prompt_tokens=prompt, max_tokens=4096,
                          true_output_tokens=out)


@pytest.mark.parametrize("policy_name", ["default", "freq"])
def test_rejected_request_is_reported_and_clock_is_not_pinned(policy_name: str) -> None:
    from throttllem.testing import setup_policy  # noqa: PLC0415

    profile = load_profile(SETUP)
    requests = [_request(0, 0.0, 200, 50), _request(1, 0.5, 9000, 10),  # 9000 > context
                _request(2, 1.0, 300, 80)]
    policy, shape = setup_policy(SETUP)
    preds = {r.id: (float(r.true_output_tokens or 1), float(r.true_output_tokens or 1))
             for r in requests}
    sim = Simulation(profile, ["i0", "i1"], make_policy(
        policy_name, ["i0", "i1"], policy=policy, shape=shape, predictions=preds))
    res = sim.run(requests)
    assert sorted(c.id for c in res.completions) == ["r0", "r2"]
    assert list(res.rejected) == ["r1"]
    assert "context window" in res.rejected["r1"]  # said by the engine, or by the controller
    energy_j = sim.finish(res.end_s + 10.0)
    assert energy_j == pytest.approx(sum(sim.gpu_energy_mj()) / 1e3)
    assert energy_j >= profile.gpu.idle_power_w * (res.end_s + 10.0) * 2
    if policy_name == "freq":
        trackers = sim.policy.controller.trackers  # type: ignore[attr-defined]
        assert all(len(t) == 0 for t in trackers.values())  # no ghost of r1
        assert sim.clock_mhz("i0") is not None


def test_reactive_governor_rules() -> None:
    clocks = SupportedClocks(tuple(range(345, 1981, 15)))
    gov = ReactiveGovernor()

    def step(current: int, busy: float, pass_ms: float) -> int:
        return reactive_clock(gov, clocks, 1005, current, busy_fraction=busy,
                              mean_pass_ms=pass_ms, tbt_bound_ms=50.0)

    assert step(1500, 0.01, 10.0) == 1005  # idle: the floor
    assert step(1500, 1.0, float("nan")) == 1005
    assert step(1500, 1.0, 46.0) == 1980  # ≥ 0.9 × bound: jump to the top
    assert step(1500, 1.0, 36.0) == 1560  # ≥ 0.7 × bound: four steps up
    assert step(1950, 1.0, 36.0) == 1980  # capped at the top
    assert step(1500, 1.0, 20.0) == 1485  # < 0.5 × bound: one step down
    assert step(1005, 1.0, 20.0) == 1005  # never below the floor
    assert step(1500, 1.0, 30.0) == 1500  # in the dead band: stay


def test_lowest_passing_clock_matches_a_scan() -> None:
    clocks = list(range(345, 1981, 15))
    for threshold in (345, 360, 1005, 1965, 1980):
        calls: list[int] = []

        def passes(c: int, threshold: int = threshold, calls: list[int] = calls) -> bool:
            calls.append(c)
            return c >= threshold

        assert lowest_passing_clock(clocks, passes) == threshold
        assert len(calls) <= 9  # bisection, not a scan of 110 clocks
    assert lowest_passing_clock(clocks, lambda c: False) is None


def test_peak_segment_holds_the_busiest_minute() -> None:
    requests = [_request(i, float(i), 100, 10) for i in range(600)]  # 1/s
    requests += [_request(1000 + i, 300.0 + 0.1 * i, 100, 10) for i in range(300)]  # burst
    requests.sort(key=lambda r: r.arrival_s)
    seg = peak_segment(requests)
    ids = {r.id for r in seg}
    assert {f"r{1000 + i}" for i in range(300)} <= ids
    assert seg[0].arrival_s == 0.0
    assert max(r.arrival_s for r in seg) <= 60.0 + 2 * 120.0


def test_measured_capacity_is_the_edge_of_the_slo_target() -> None:
    from throttllem._demo import DemoOptions, trace_requests  # noqa: PLC0415
    from throttllem._eval.driver import _attainment, _retimed  # noqa: PLC0415

    profile = load_profile(SETUP)
    requests = list(trace_requests(DemoOptions(minutes=10.0), offset_s=0.0))
    sample = requests[:300]
    capacity = measure_capacity_rps(profile, sample, slo_target=0.99, probe_requests=300)
    base = (len(sample) - 1) / (sample[-1].arrival_s - sample[0].arrival_s)
    assert _attainment(profile, _retimed(sample, capacity / base), 1) >= 0.99
    assert _attainment(profile, _retimed(sample, 1.5 * capacity / base), 1) < 0.99


def test_cli_writes_one_table_json_and_plots(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval.json"
    args = parser.parse_args(["evaluate", "--minutes", "0.5", "--policies", "default,freq",
                              "--no-time-scale", "--instances", "1", "--perf-model", "twin",
                              "--length-error", "0.3", "--json", str(out),
                              "--plots", str(tmp_path / "plots")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("policy"))
    for column in ("energy kJ", "saved", "tok/J", "SLO met", "TTFT p50/p99", "inst-h"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in ("default", "freq")}
    assert rows["default"][2] == "0.0%"
    assert float(rows["freq"][2].rstrip("%")) == pytest.approx(
        100 * doc_saving(out), abs=0.05)
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"default", "freq"}
    assert doc["options"]["length_error"] == "0.3"
    assert doc["setup"]["rate_factor"] == pytest.approx(1.0)
    for name in ("energy.png", "clock.png", "tbt.png", "e2e.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(png) > 5_000, name


def doc_saving(path: Path) -> float:
    saving = json.loads(path.read_text())["policies"]["freq"]["saving_vs_default"]
    assert isinstance(saving, float)
    return saving


def test_bad_options_are_refused() -> None:
    assert parse_length_error("0.15") == 0.15
    assert parse_length_error("15%") == 0.15
    assert parse_length_error("measured") == "measured"
    with pytest.raises(ConfigError):
        parse_length_error("1.5")
    with pytest.raises(ConfigError, match="--policies"):
        evaluate(EvalOptions(minutes=1.0, policies=["nope"]))
    with pytest.raises(ConfigError, match="slo-target"):
        evaluate(EvalOptions(minutes=1.0, slo_target=1.5))
    with pytest.raises(ConfigError, match="capacity"):
        evaluate(EvalOptions(minutes=1.0, capacity_rps=-1.0))


def test_power_overrides_change_the_twin_and_are_checked() -> None:
    from throttllem._eval.driver import parse_power, with_power  # noqa: PLC0415
    from throttllem._twin.clockmodel import efficient_clock_mhz  # noqa: PLC0415

    profile = load_profile(SETUP)
    assert parse_power("static_w=120, voltage_min_ratio=0.6") == {"static_w": 120.0,
                                                                   "voltage_min_ratio": 0.6}
    lean = with_power(profile, {"static_w": 60.0})
    assert lean.power.static_w == 60.0
    assert lean.power.clock_w == profile.power.clock_w
    assert with_power(profile, {}) is profile
    assert efficient_clock_mhz(profile) == 1005  # the shipped profile's floor
    assert efficient_clock_mhz(with_power(profile, {"static_w": 20.0})) < 1005
    with pytest.raises(ConfigError, match="unknown parameter"):
        with_power(profile, {"static_watts": 1.0})
    with pytest.raises(ConfigError, match="name=value"):
        parse_power("static_w")
    base = evaluate(EvalOptions(minutes=0.5, instances=1, time_scale=False,
                                policies=["default"]))
    hot = evaluate(EvalOptions(minutes=0.5, instances=1, time_scale=False,
                               policies=["default"], power={"static_w": 300.0}))
    assert hot.runs["default"].report.energy_j > base.runs["default"].report.energy_j

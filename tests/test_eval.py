"""`throttllem evaluate`: the controller's functions on engine twins in simulated time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec
import pytest

from throttllem._eval import EvalOptions, Simulation, evaluate, make_policy, to_document
from throttllem._eval.cli import PolicyRun, add_evaluate_parser, parse_length_error
from throttllem._events import RequestArrived
from throttllem._twin.profile import load_profile

SETUP = "h100-llama3-8b-tp1"
# One minute of the conversation trace (~230 requests); the twin's own timing formula as the
# controller's model keeps the test fast (the shipped ONNX model is the CLI's default).
OPTS = EvalOptions(trace="conv", minutes=1.0, instances=2, perf_model="twin", seed=0)


@pytest.fixture(scope="module")
def runs() -> dict[str, PolicyRun]:
    return evaluate(OPTS)


def test_energy_is_the_gpus_counters_and_at_least_idle(runs: dict[str, PolicyRun]) -> None:
    profile = load_profile(SETUP)
    for name, run in runs.items():
        r = run.report
        assert r.energy_j == pytest.approx(sum(run.gpu_energy_mj) / 1e3, rel=1e-12), name
        assert len(run.gpu_energy_mj) == 2 * profile.engine.tp_degree
        assert r.energy_j >= run.idle_floor_j
        assert run.idle_floor_j == pytest.approx(
            profile.gpu.idle_power_w * r.duration_s * len(run.gpu_energy_mj))
    # One common horizon: every policy's idle tail counts up to the same instant.
    assert len({run.report.duration_s for run in runs.values()}) == 1


def test_every_request_is_served_or_reported(runs: dict[str, PolicyRun]) -> None:
    submitted = {run.report.requests_submitted for run in runs.values()}
    assert len(submitted) == 1
    assert submitted.pop() > 100
    for run in runs.values():
        r = run.report
        assert r.requests_served + r.requests_rejected == r.requests_submitted
        assert r.generated_tokens > 0


def test_throttllem_saves_energy_within_slo(runs: dict[str, PolicyRun]) -> None:
    default, throttllem = runs["default"].report, runs["throttllem"].report
    assert throttllem.energy_j < 0.9 * default.energy_j
    assert throttllem.mean_sm_clock_mhz < default.mean_sm_clock_mhz
    assert 0.0 <= throttllem.slo_attainment <= 1.0
    assert throttllem.slo_attainment >= 0.95
    assert runs["freq"].report.energy_j < default.energy_j
    assert runs["freq"].ticks > 0
    assert runs["default"].ticks == 0
    doc = to_document(runs, OPTS)
    for name in ("default", "freq", "throttllem"):
        figures = doc["policies"][name]
        assert {"energy_j", "saving_vs_default", "tokens_per_joule", "slo_attainment"} <= set(
            figures)
    assert doc["policies"]["default"]["saving_vs_default"] == 0.0
    assert doc["policies"]["throttllem"]["saving_vs_default"] > 0.1


def test_same_seed_same_json(runs: dict[str, PolicyRun]) -> None:
    again = evaluate(OPTS)
    first = msgspec.json.encode(to_document(runs, OPTS))
    assert msgspec.json.encode(to_document(again, OPTS)) == first


def _request(i: int, t: float, prompt: int, out: int) -> RequestArrived:
    return RequestArrived(id=f"r{i}", arrival_s=t, prompt_tokens=prompt, max_tokens=4096,
                          true_output_tokens=out)


@pytest.mark.parametrize("policy_name", ["default", "throttllem"])
def test_rejected_request_is_reported_and_clock_is_not_pinned(policy_name: str) -> None:
    from throttllem._services.forecaster import setup_policy  # noqa: PLC0415

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
    energy_j = sim.finish(res.end_s + 10.0)
    assert energy_j == pytest.approx(sum(sim.gpu_energy_mj()) / 1e3)
    assert energy_j >= profile.gpu.idle_power_w * (res.end_s + 10.0) * 2
    if policy_name == "throttllem":
        trackers = sim.policy.trackers  # type: ignore[attr-defined]
        assert all(len(t) == 0 for t in trackers.values())  # no ghost of r1
        assert sim.clock_mhz("i0") is not None


def test_cli_writes_one_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval.json"
    args = parser.parse_args(["evaluate", "--minutes", "0.5", "--policies", "default,throttllem",
                              "--perf-model", "twin", "--length-error", "0.3",
                              "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "energy saved vs default" in text
    assert "throttllem" in text
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"default", "throttllem"}
    assert doc["options"]["length_error"] == "0.3"
    assert doc["options"]["minutes"] == 0.5


def test_length_error_parsing() -> None:
    assert parse_length_error("0.15") == 0.15
    assert parse_length_error("15%") == 0.15
    assert parse_length_error("measured") == "measured"
    from throttllem._errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError):
        parse_length_error("1.5")
    with pytest.raises(ConfigError):
        evaluate(EvalOptions(minutes=1.0, policies=["nope"]))

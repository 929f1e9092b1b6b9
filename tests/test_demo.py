"""The whole system end to end: services as separate processes on a real nats-server,
a real trace window, the twin; then the durable records a billing consumer would read."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._demo import DemoOptions, run_demo
from throttllem._events import ENERGY_CODEC, RequestEnergy
from throttllem._subjects import ENERGY_REQUEST

pytestmark = pytest.mark.slow


async def read_energy_records(url: str, expected: int) -> list[RequestEnergy]:
    bus = await Bus.connect(url, name="billing")
    records: list[RequestEnergy] = []
    async with anyio.create_task_group() as tg:
        async def collect(record: RequestEnergy) -> None:
            records.append(record)
            if len(records) >= expected:
                tg.cancel_scope.cancel()

        await tg.start(partial(bus.consume, durable="billing", subject=ENERGY_REQUEST,
                               codec=ENERGY_CODEC, handler=collect))
        with anyio.move_on_after(15):
            await anyio.sleep_forever()
        tg.cancel_scope.cancel()
    await bus.close()
    return records


def test_demo_serves_every_request_and_accounts_energy(
        nats: EmbeddedNatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    json_path = tmp_path / "demo.json"
    [report] = run_demo(DemoOptions(nats_url=nats.url, trace="conv", minutes=0.25, speed=4.0,
                                    instances=2, json_path=json_path, log_dir=tmp_path / "logs",
                                    progress=False, policies=["default"]))
    out = capsys.readouterr().out
    assert "SLO attainment" in out
    assert "not measured hardware" in out

    assert report.requests_submitted > 10
    assert report.requests_served == report.requests_submitted
    assert 0.0 <= report.slo_attainment <= 1.0
    # Two twin H100s for at least the window: above idle power, below the 700 W cap each.
    assert 2 * 60.0 * 15 < report.energy_j < 2 * 700.0 * report.duration_s
    assert 345 <= report.mean_sm_clock_mhz <= 1980

    document = json.loads(json_path.read_text())
    assert document["energy_j"] == pytest.approx(report.energy_j)
    assert 0.0 <= document["slo_attainment"] <= 1.0
    assert set(document["ttft_ms"]) == {"p50", "p99"}
    assert document["policies"]["default"]["requests_served"] == report.requests_served

    # A billing consumer reads one durable energy record per request from JetStream.
    records = anyio.run(read_energy_records, nats.url, report.requests_served)
    assert len({r.id for r in records}) == report.requests_served
    attributed_j = sum(r.energy_mj for r in records) / 1e3
    assert 0 < attributed_j <= report.energy_j  # the rest is idle energy, billed to nobody
    assert {r.source for r in records} == {"engine"}
    assert {r.tenant for r in records} <= {"tenant-a", "tenant-b", "tenant-c"}


def test_a_request_that_can_never_fit_is_reported_not_waited_for(
        nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    # conv row 5442 (t≈1109.5 s) has a 14,050-token prompt: longer than Llama-3-8B's window.
    [report] = run_demo(DemoOptions(nats_url=nats.url, trace="conv", start_minute=1109.0 / 60,
                                  minutes=2.0 / 60, speed=2.0, instances=1,
                                  log_dir=tmp_path / "logs", progress=False,
                                  drain_timeout_s=60.0, policies=["default"]))
    assert report.requests_rejected == 1
    assert report.requests_served == report.requests_submitted - 1
    assert report.slo_attainment <= (report.requests_submitted - 1) / report.requests_submitted
    assert report.duration_s < 30.0, "the demo waited out its drain timeout"


def test_demo_time_scales_the_window_to_a_peak_rate() -> None:
    from throttllem._demo import trace_requests  # noqa: PLC0415
    from throttllem._trace import peak_rate_per_s  # noqa: PLC0415

    plain = list(trace_requests(DemoOptions(minutes=2.0), offset_s=100.0))
    scaled = list(trace_requests(DemoOptions(minutes=2.0, peak_rps=6.0), offset_s=100.0))
    assert [r.id for r in scaled] == [r.id for r in plain]
    assert scaled[0].arrival_s == pytest.approx(100.0, abs=1.0)
    assert peak_rate_per_s([r.arrival_s for r in scaled]) == pytest.approx(6.0)
    assert peak_rate_per_s([r.arrival_s for r in plain]) < 6.0


def test_throttllem_policy_saves_energy_against_default_on_the_same_window(
        nats: EmbeddedNatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reports = run_demo(DemoOptions(nats_url=nats.url, trace="conv", minutes=0.25, speed=1.0,
                                   instances=1, log_dir=tmp_path / "logs", progress=False,
                                   json_path=tmp_path / "both.json",
                                   plots_dir=tmp_path / "plots"))
    default, throttllem = reports  # both policies: the demo's default
    out = capsys.readouterr().out
    saved = 100 * (1 - throttllem.energy_j / default.energy_j)
    assert f"throttLL'eM used {saved:.1f}% less energy than default" in out
    assert f"at {100 * throttllem.slo_attainment:.1f}% SLO attainment" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "clock.png", "e2e.png", "energy.png", "tbt.png"]
    assert default.policy == "default"
    assert throttllem.policy.startswith("throttllem (length error 0.15)")
    for report in reports:
        assert report.requests_served == report.requests_submitted
    assert throttllem.generated_tokens == default.generated_tokens  # the same work
    assert throttllem.mean_sm_clock_mhz < default.mean_sm_clock_mhz
    assert throttllem.energy_j < default.energy_j
    document = json.loads((tmp_path / "both.json").read_text())
    saving = document["policies"][throttllem.policy]["saving_vs_default"]
    assert saving == pytest.approx(1 - throttllem.energy_j / default.energy_j)
    # The actuator ran the clocks the forecaster asked for, through the twin's NVML surface.
    actuator_log = (tmp_path / "logs" / "throttllem" / "actuator-i0.log").read_text()
    assert "actuator.applied" in actuator_log

    # The evaluator runs the same core functions in simulated time: on the same window the
    # totals match the live run (`freq` is the live throttllem policy: no autoscaler).
    from throttllem._eval import EvalOptions, evaluate  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    ev = evaluate(EvalOptions(trace="conv", minutes=0.25, instances=1, time_scale=False,
                              policies=["default", "freq"], length_error="0.15", seed=0))
    idle_w = load_profile("h100-llama3-8b-tp1").gpu.idle_power_w
    for live, name in ((default, "default"), (throttllem, "freq")):
        sim = ev.runs[name]
        assert sim.report.requests_submitted == live.requests_submitted
        assert sim.report.requests_served == live.requests_served
        assert sim.report.generated_tokens == live.generated_tokens
        # Energy above idle does not depend on how long each run idled at its end.
        live_busy_j = live.energy_j - idle_w * live.duration_s
        sim_busy_j = sim.report.energy_j - sim.idle_floor_j
        assert sim_busy_j == pytest.approx(live_busy_j, rel=0.10), name
    assert ev.runs["freq"].report.energy_j < ev.runs["default"].report.energy_j


def test_the_demo_runs_locked_down(tmp_path: Path) -> None:
    """`--secure`: TLS with client certificates and one NATS identity per service, generated
    for the run; every service still does its job (both policies serve every request)."""
    reports = run_demo(DemoOptions(trace="conv", minutes=0.25, speed=4.0, instances=1,
                                   secure=True, log_dir=tmp_path / "logs", progress=False))
    assert [r.policy.split()[0] for r in reports] == ["default", "throttllem"]
    for report in reports:
        assert report.requests_submitted > 5
        assert report.requests_served == report.requests_submitted
    secrets = tmp_path / "logs" / "nats-secrets"
    assert (secrets / "clients" / "forecaster" / "nkey.seed").stat().st_mode & 0o077 == 0
    actuator_log = (tmp_path / "logs" / "throttllem" / "actuator-i0.log").read_text()
    assert "actuator.applied" in actuator_log  # the actuator locked clocks as its identity

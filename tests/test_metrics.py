"""Prometheus metrics: one place names them (the README table and the specs agree), and the
services export them over HTTP with the figures of their own run (real nats-server, real
engine twins, scraped with urllib and parsed with prometheus_client's own parser)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from throttllem import _metrics as m
from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._engines.twin import EngineTwinService
from throttllem._errors import ConfigError
from throttllem._events import (
    ENERGY_CODEC,
    FreqTarget,
    RequestAdmitted,
    RequestArrived,
    RequestEnergy,
)
from throttllem._gpu.remote import serve_gpu
from throttllem._runtime import Clock
from throttllem._services.actuator import ActuatorService
from throttllem._services.telemetry import TelemetryService
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import ENERGY_REQUEST, freq_target, request_admitted, twin_gpu
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import load_profile
from throttllem.testing import ServiceProcess, wait_for_metrics_url

ROOT = Path(__file__).resolve().parents[1]
README_TABLE = re.compile(r"<!-- metrics-table:start -->\n(.*?)\n<!-- metrics-table:end -->",
                          re.S)


def scrape(url: str) -> dict[str, tuple[str, list[tuple[dict[str, str], float]]]]:
    """name -> (type, [(labels, value)]) of every family on a /metrics page."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # prometheus_client's counter start times
            continue
        # The parser strips a counter's _total from the family name; samples keep it.
        name = family.name + "_total" if family.type == "counter" else family.name
        # A histogram keeps its _count samples (one per label set).
        keep = (name + "_count",) if family.type == "histogram" else (name, family.name)
        out[name] = (family.type, [(s.labels, s.value) for s in family.samples
                                   if s.name in keep])
    return out


def test_readme_table_lists_exactly_the_defined_metrics() -> None:
    match = README_TABLE.search((ROOT / "README.md").read_text())
    assert match, "README lacks the metrics table markers"
    assert match.group(1) == m.metrics_table(), (
        "README metrics table is stale: paste `python -c 'from throttllem._metrics import "
        "metrics_table; print(metrics_table())'` between its markers")


def test_specs_follow_the_naming_conventions() -> None:
    names = [s.name for s in m.METRICS]
    assert len(names) == len(set(names)), "a metric name is defined twice"
    units = ("_total", "_seconds", "_joules", "_watts", "_mhz", "_tokens", "_ratio", "_info",
             "_instances", "_requests", "_per_second", "_per_token", "_dry_run",
             "_connected", "_up")
    for spec in m.METRICS:
        assert spec.name.endswith(units), f"{spec.name}: no unit in the name"
        assert "id" not in spec.labels, "a request id would be one series per request"
    with pytest.raises(ConfigError, match="_total"):
        m.CounterSpec("throttllem_energy_joules", help="a counter without _total")
    with pytest.raises(ConfigError, match="prefix"):
        m.GaugeSpec("energy_joules", help="no prefix")


async def start(tg: anyio.abc.TaskGroup, service: object, url: str, clock: Clock) -> Bus:
    bus = await Bus.connect(url, name=getattr(service, "name", "svc"))
    run: Callable[..., Awaitable[None]] = service.run  # type: ignore[attr-defined]
    await tg.start(run, bus, clock)
    return bus


@pytest.mark.anyio
@pytest.mark.slow
async def test_telemetry_serves_energy_tokens_and_latency_of_its_own_records(
        nats: EmbeddedNatsServer) -> None:
    clock = Clock(epoch_wall_s=time.time(), speed=5.0)
    records: list[RequestEnergy] = []
    observer = await Bus.connect(nats.url, name="observer")
    await observer.ensure_request_stream()

    async def on_energy(record: RequestEnergy) -> None:
        records.append(record)

    telemetry = TelemetryService(gpu="twin", instances=["i0", "i1"], interval_s=0.1)
    server = telemetry.metrics.serve(0)
    buses: list[Bus] = []
    try:
        async with anyio.create_task_group() as tg:
            for inst in ("i0", "i1"):
                buses.append(await start(tg, EngineTwinService(instance=inst), nats.url, clock))
            buses.append(await start(tg, telemetry, nats.url, clock))
            telemetry.metrics.watch_bus(buses[-1].counters)
            await tg.start(partial(observer.consume, durable="bill", subject=ENERGY_REQUEST,
                                   codec=ENERGY_CODEC, handler=on_energy))
            for n in range(10):
                request = RequestArrived(id=f"r{n}", arrival_s=clock.now_s(),
                                         tenant=("acme", "globex")[n % 2],
                                         slo_class=("standard", "batch")[n % 2],
                                         prompt_tokens=100 + 40 * n, true_output_tokens=15 + n)
                inst = f"i{n % 2}"
                await observer.publish_durable(request_admitted(inst), RequestAdmitted(
                    request=request, instance=inst, decided_s=clock.now_s()))
            with anyio.fail_after(30):
                while len(records) < 10:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.3)  # a few more GPU samples
            page = scrape(server.url)
            tg.cancel_scope.cancel()
    finally:
        server.close()
        for bus in [*buses, observer]:
            await bus.close()

    kind, samples = page["throttllem_request_energy_joules_total"]
    assert kind == "counter"
    for instance in ("i0", "i1"):
        for tenant in ("acme", "globex"):
            mine = [r for r in records if r.instance == instance and r.tenant == tenant]
            value = sum(v for labels, v in samples
                        if labels == {"instance": instance, "tenant": tenant})
            assert value == pytest.approx(sum(r.energy_mj for r in mine) / 1e3, rel=1e-9)
    _, tokens = page["throttllem_generated_tokens_total"]
    assert sum(v for _, v in tokens) == sum(r.generated_tokens for r in records)
    kind, completed = page["throttllem_requests_completed_total"]
    assert kind == "counter"
    assert sum(v for _, v in completed) == len(records)
    assert {labels["slo_class"] for labels, _ in completed} == {"standard", "batch"}
    assert {labels["slo_met"] for labels, _ in completed} <= {"true", "false"}
    kind, ttft = page["throttllem_request_ttft_seconds"]
    assert kind == "histogram"
    assert sum(v for _, v in ttft) == len(records)
    kind, power = page["throttllem_gpu_power_watts"]
    assert kind == "gauge"
    assert {labels["node"] for labels, _ in power} == {"i0", "i1"}
    assert all(labels["source"] == "twin" and 60 <= v <= 700 for labels, v in power)
    _, gpu_energy = page["throttllem_gpu_energy_joules_total"]
    assert all(v > 0 for _, v in gpu_energy), "the twins drew energy while serving"
    _, info = page["throttllem_build_info"]
    assert info[0][0]["service"] == "telemetry"
    assert "throttllem_bus_rejected_events_total" in page
    # Every family on the page is one the specs define, with the spec's type.
    specs = {s.name: s.kind for s in m.METRICS}
    assert {name: kind for name, (kind, _) in page.items()} == {
        name: specs[name] for name in page}


@pytest.mark.anyio
@pytest.mark.slow
async def test_actuator_exports_target_and_applied_clock(nats: EmbeddedNatsServer) -> None:
    gpu = GpuTwin(load_profile("h100-llama3-8b-tp1"))
    clock = Clock(epoch_wall_s=time.time())
    engine_bus = await Bus.connect(nats.url, name="engine")
    await serve_gpu(engine_bus, twin_gpu("i0"), gpu)
    actuator = ActuatorService(instance="i0", backend="twin", tick_s=0.05)
    bus = await Bus.connect(nats.url, name="actuator")
    controller = await Bus.connect(nats.url, name="controller")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(actuator.run, bus, clock)
            await controller.publish(freq_target("i0"), FreqTarget(
                instance="i0", clock_mhz=1200, lease_s=60, decided_s=clock.now_s()))
            await controller.publish(freq_target("i0"), FreqTarget(
                instance="i0", clock_mhz=1234, lease_s=60, decided_s=clock.now_s()))
            with anyio.fail_after(5):
                while len(actuator.applied) < 2:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    finally:
        for b in (bus, controller, engine_bus):
            await b.close()
    assert actuator.metrics.value("throttllem_clock_applied_mhz", {"instance": "i0"}) == 0.0, (
        "reset to the default clock at shutdown")
    assert actuator.metrics.value("throttllem_clock_target_mhz", {"instance": "i0"}) == 1234
    assert actuator.metrics.value("throttllem_clock_changes_total",
                                  {"instance": "i0", "outcome": "refused"}) == 1
    assert actuator.metrics.value("throttllem_clock_changes_total",
                                  {"instance": "i0", "outcome": "ok"}) == 2  # lock, reset


@pytest.mark.slow
def test_run_metrics_port_serves_the_scalers_target_over_http(
        nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    with ServiceProcess("scaler", ["scaler", "--instances", "i0,i1", "--capacity", "10",
                                   "--metrics-port", "0"], nats.url, tmp_path) as scaler:
        scaler.start()
        url = wait_for_metrics_url(scaler.log_path)
        deadline = time.monotonic() + 30
        assert url.startswith("http://127.0.0.1:"), "bound to loopback by default"
        page: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] = {}
        while time.monotonic() < deadline:
            page = scrape(url)
            if page.get("throttllem_scale_target_instances", ("", []))[1]:
                break
            time.sleep(0.1)
        assert page["throttllem_scale_target_instances"] == (
            "gauge", [({"setup": DEFAULT_SETUP}, 2.0)])
        _, phases = page["throttllem_scale_instances"]
        assert {labels["phase"]: v for labels, v in phases} == {
            "warming": 0.0, "active": 2.0, "draining": 0.0}
        assert page["throttllem_build_info"][1][0][0]["service"] == "scaler"


def test_dashboard_queries_only_defined_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "throttllem.json").read_text())
    specs = {s.name: s.kind for s in m.METRICS}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        for name in re.findall(r"\bthrottllem_\w+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name:
                assert specs.get(base) == "histogram", f"{name}: not a histogram's series"
            else:
                assert name in specs, f"the dashboard queries {name}, which _metrics lacks"
            used.add(base)
            if specs[base] == "counter":
                assert re.search(rf"(rate|increase)\({name}\b", expr), (
                    f"{name} is a counter: graph its rate or increase")
    # The dashboard shows what the issue asks for: energy, J/token, clocks, SLOs, decisions.
    assert {"throttllem_request_energy_joules_total", "throttllem_generated_tokens_total",
            "throttllem_clock_applied_mhz", "throttllem_requests_completed_total",
            "throttllem_admissions_total"} <= used


def test_a_metrics_port_that_cannot_be_served_is_a_clear_error() -> None:
    metrics = m.ServiceMetrics("scaler")
    server = metrics.serve(0)
    try:
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127.0.0.1:{server.port}"):
            m.ServiceMetrics("other").serve(server.port)
    finally:
        server.close()
    with pytest.raises(ConfigError, match="0-65535"):
        metrics.serve(70000)

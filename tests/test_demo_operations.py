"""The demo as an operator sees it: `throttllem demo --metrics-port 0 --keep-serving` as a real
process (its services as processes of their own, its embedded nats-server), scraped over HTTP
while and after it runs, and `throttllem report energy` run against its bus; both must agree
with the demo's own per-tenant figures (its JSON)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from throttllem import _metrics as m
from throttllem._cli import main

pytestmark = pytest.mark.slow

POLICY = "default"
# Guards against a hang, not a speed requirement: the run itself takes seconds.
HANG_GUARD_S = 240.0


@dataclass
class DemoProcess:
    proc: subprocess.Popen[str]
    json_path: Path
    metrics_url: str = ""
    nats_url: str = ""
    stderr: list[str] = field(default_factory=list)
    scrapes_before_the_end: list[str] = field(default_factory=list)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """family name -> (type, samples), parsed by prometheus_client's own parser."""
    return {f.name: (f.type, list(f.samples)) for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    out = tmp_path_factory.mktemp("demo-ops")
    json_path = out / "demo.json"
    # The smallest window with requests of every tenant: 9 s of trace, replayed 4x faster.
    proc = subprocess.Popen(
        [sys.executable, "-m", "throttllem", "demo", "--minutes", "0.15", "--speed", "4",
         "--instances", "1", "--policy", POLICY, "--no-plots", "--no-progress",
         "--metrics-port", "0", "--keep-serving", "--json", str(json_path),
         "--log-dir", str(out / "logs")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    run = DemoProcess(proc=proc, json_path=json_path)
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                pytest.fail(f"the demo exited ({proc.wait()}): {''.join(run.stderr)}")
            run.stderr.append(line)
            if found := re.search(r"metrics of every service of this demo at (\S+)", line):
                run.metrics_url = found.group(1)
            if found := re.search(r"serving NATS at (\S+)", line):
                run.nats_url = found.group(1)
                break
            if run.metrics_url:  # while it runs: every scrape must be a valid exposition
                run.scrapes_before_the_end.append(get(run.metrics_url))
        else:
            pytest.fail(f"the demo did not finish: {''.join(run.stderr)}")
        yield run
    finally:
        proc.send_signal(signal.SIGINT)  # --keep-serving holds until Ctrl-C
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            pumping.join(timeout=10)
            proc.stderr.close()
    assert code == 0, "".join(run.stderr)


def own_tenants(run: DemoProcess) -> dict[str, dict[str, float]]:
    document = json.loads(run.json_path.read_text())
    tenants = document["policies"][POLICY]["tenants"]
    assert tenants == document["tenants"], "top level: the first policy's figures"
    assert sum(t["requests"] for t in tenants.values()) == document["requests_served"]
    assert document["requests_served"] == document["requests_submitted"] > 5
    return dict(tenants)


def test_one_endpoint_serves_every_services_metrics_and_they_agree_with_the_run(
        demo: DemoProcess) -> None:
    assert demo.scrapes_before_the_end, "never scraped while the demo ran"
    for text in demo.scrapes_before_the_end:
        assert m.BUILD_INFO.name in samples(text)

    final = samples(get(demo.metrics_url))
    # Every service of the run, kept after it stopped, and labelled with policy and process.
    up_type, up = final[m.DEMO_TARGET_UP.name]
    assert up_type == "gauge"
    assert {(s.labels["policy"], s.labels["process"]): s.value for s in up} == {
        (POLICY, "engine-i0"): 1.0, (POLICY, "forecaster"): 1.0, (POLICY, "telemetry"): 1.0}
    build = {s.labels["service"]: s.labels.get("process") for s in final[m.BUILD_INFO.name][1]}
    assert build == {"demo": None, "engine": "engine-i0", "forecaster": "forecaster",
                     "telemetry": "telemetry"}
    # Types survive the re-exposition (the parser drops a counter's _total from the family).
    assert final[m.REQUEST_ENERGY.name.removesuffix("_total")][0] == "counter"
    assert final[m.TTFT.name][0] == "histogram"
    assert final[m.CLOCK_TARGET.name][0] == "gauge"

    def per_tenant(spec: m.MetricSpec) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in final[spec.name.removesuffix("_total")][1]:
            if s.name == spec.name:
                assert (s.labels["policy"], s.labels["process"]) == (POLICY, "telemetry")
                out[s.labels["tenant"]] = out.get(s.labels["tenant"], 0.0) + s.value
        return out

    tenants = own_tenants(demo)
    energy = per_tenant(m.REQUEST_ENERGY)
    tokens = per_tenant(m.GENERATED_TOKENS)
    assert set(energy) == set(tenants)
    for tenant, own in tenants.items():
        # Request-attributed energy against the run's own request-attributed energy.
        assert energy[tenant] == pytest.approx(own["energy_j"], rel=0.01), tenant
        assert tokens[tenant] == own["generated_tokens"], tenant
    completed = final[m.REQUESTS_COMPLETED.name.removesuffix("_total")][1]
    assert sum(s.value for s in completed if s.name == m.REQUESTS_COMPLETED.name) == sum(
        t["requests"] for t in tenants.values())


def test_report_energy_on_the_demos_bus_matches_the_demos_tenants(
        demo: DemoProcess, capsys: pytest.CaptureFixture[str]) -> None:
    tenants = own_tenants(demo)
    capsys.readouterr()
    assert main(["report", "energy", "--nats", demo.nats_url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tenants"]) == set(tenants)
    for tenant, own in tenants.items():
        got = report["tenants"][tenant]
        assert got["energy_j"] == pytest.approx(own["energy_j"], rel=0.01), tenant
        for key in ("requests", "prompt_tokens", "generated_tokens"):
            assert got[key] == own[key], (tenant, key)
    assert report["duplicates"] == 0

    # A demo's request ids start with their policy: one run's records, or none of another's.
    assert main(["report", "energy", "--nats", demo.nats_url, "--json",
                 "--id-prefix", f"{POLICY}-"]) == 0
    assert json.loads(capsys.readouterr().out)["tenants"] == report["tenants"]
    assert main(["report", "energy", "--nats", demo.nats_url, "--json",
                 "--id-prefix", "throttllem-"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["requests"] == 0


def test_bad_metrics_options_are_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--metrics-port", "70000", "--no-progress", "--no-plots"]) == 2
    assert "--metrics-port must be 0-65535, not 70000" in capsys.readouterr().err
    assert main(["demo", "--engine", "vllm", "--metrics-port", "0", "--no-progress",
                 "--no-plots"]) == 2
    assert "--metrics-port serves the twin demo's services" in capsys.readouterr().err

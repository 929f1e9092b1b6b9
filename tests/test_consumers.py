"""Plug-in consumers over a real nats-server: a throwaway plug-in package installed with pip
gets every energy record, exactly once per id after de-duplication, across a hard restart;
the shipped ledger and Prometheus exporter count each record once, duplicates included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._consumers import ConsumerContext, load_plugin
from throttllem._consumers.ledger import EnergyLedgerConsumer, read_ledger
from throttllem._consumers.prometheus import TenantEnergyExporter
from throttllem._consumers.service import ConsumerService
from throttllem._errors import ConfigError
from throttllem._events import RequestEnergy
from throttllem._metrics import ServiceMetrics
from throttllem._runtime import Clock
from throttllem._subjects import ENERGY_REQUEST

PLUGIN_SOURCE = '''
"""A third-party consumer: appends every record it is handed to a JSON-lines file."""
import json
import os

from throttllem.consumers import Consumer, ConsumerContext, RequestEnergy


class AuditTrail(Consumer):
    def __init__(self, context: ConsumerContext) -> None:
        self.path = context.option("path")

    async def on_energy(self, record: RequestEnergy) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"id": record.id, "pid": os.getpid()}) + "\\n")
            f.flush()
            os.fsync(f.fileno())
'''


def record(n: int, *, tenant: str | None = None) -> RequestEnergy:
    return RequestEnergy(id=f"req-{n}", tenant=tenant or ("acme", "globex", "initech")[n % 3],
                         instance=f"i{n % 2}", energy_mj=1000.0 + 37.5 * n,
                         prompt_tokens=100 + n, generated_tokens=10 + n, completed_s=float(n))


async def publish(url: str, records: list[RequestEnergy], *, msg_ids: bool = True) -> None:
    bus = await Bus.connect(url, name="telemetry-stand-in")
    try:
        await bus.ensure_request_stream()
        for r in records:
            await bus.publish_durable(ENERGY_REQUEST, r,
                                      msg_id=f"energy-{r.id}" if msg_ids else None)
    finally:
        await bus.close()


def install_plugin(tmp_path: Path) -> Path:
    """Build (hatchling, the dev extra has it) and install a plug-in package with pip, into a
    folder of its own so the test venv stays as it was."""
    src = tmp_path / "audit-plugin"
    (src / "audit_plugin").mkdir(parents=True)
    (src / "audit_plugin" / "__init__.py").write_text(PLUGIN_SOURCE)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "audit-plugin"
        version = "0.0.1"

        [project.entry-points."throttllem.consumers"]
        audit = "audit_plugin:AuditTrail"
        '''))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
                   check=True, capture_output=True, timeout=120)
    return target


def received(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_pip_installed_plugin_gets_every_record_once_per_id_across_a_kill(
        nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    site = install_plugin(tmp_path)
    out = tmp_path / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "throttllem", "run", "consumer", "--plugin", "audit",
           "--option", f"path={out}", "--nats", nats.url, "--ack-wait", "2"]
    first_batch = [record(n) for n in range(30)]
    second_batch = [record(n) for n in range(30, 50)]
    anyio.run(publish, nats.url, first_batch)

    with (tmp_path / "consumer-1.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(received(out)) >= 10, 60, "the plug-in's first records")
        proc.send_signal(signal.SIGKILL)  # mid-stream: what it had not acked comes back
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    anyio.run(publish, nats.url, second_batch)

    with (tmp_path / "consumer-2.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        expected = {r.id for r in first_batch + second_batch}
        wait_until(lambda: {row["id"] for row in received(out)} >= expected, 60,
                   f"all records: {(tmp_path / 'consumer-2.log').read_text()[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    rows = received(out)
    ids = [str(row["id"]) for row in rows]
    assert set(ids) == expected, "exactly the published records, after de-duplication"
    assert len({row["pid"] for row in rows}) == 2, "both runs of the plug-in received records"
    # At least once: a record may come twice (handled, killed before its ack), never lost.
    assert len(ids) >= len(expected)


def test_unknown_plugin_names_the_installed_ones() -> None:
    with pytest.raises(ConfigError, match=r"installed: .*ledger.*prometheus"):
        load_plugin("no-such-plugin")
    assert load_plugin("ledger") is EnergyLedgerConsumer
    assert load_plugin("prometheus") is TenantEnergyExporter


@pytest.mark.anyio
@pytest.mark.slow
async def test_ledger_and_exporter_count_each_record_once_across_a_restart(
        nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger" / "energy.sqlite"
    first = [record(n) for n in range(12)]
    # The same three records published again without message ids: the stream keeps both
    # copies (no de-duplication there), as a redelivery would hand them over twice.
    await publish(nats.url, first)
    await publish(nats.url, first[:3], msg_ids=False)

    async def run_until(service: ConsumerService, done: object) -> None:
        bus = await Bus.connect(nats.url, name=service.context.plugin)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(service.run, bus, Clock())
                with anyio.fail_after(30):
                    while not done():  # type: ignore[operator]
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            await bus.close()

    def services() -> tuple[ConsumerService, ConsumerService]:
        """A fresh plug-in and registry each, as a restarted process has."""
        ledger_ctx = ConsumerContext(plugin="ledger", durable="ledger",
                                     options={"path": str(ledger_path)})
        exporter_ctx = ConsumerContext(plugin="prometheus", durable="prometheus",
                                       metrics=ServiceMetrics("consumer"))
        return (ConsumerService(EnergyLedgerConsumer(ledger_ctx), ledger_ctx),
                ConsumerService(TenantEnergyExporter(exporter_ctx), exporter_ctx))

    def count(service: ConsumerService, outcome: str) -> float:
        return service.metrics.value("throttllem_consumer_records_total",
                                     {"plugin": service.context.plugin,
                                      "outcome": outcome}) or 0.0

    def totals(service: ConsumerService, records: list[RequestEnergy]) -> None:
        for tenant in ("acme", "globex", "initech"):
            mine = [r for r in records if r.tenant == tenant]
            assert service.metrics.value("throttllem_tenant_energy_joules_total",
                                         {"tenant": tenant}) == pytest.approx(
                sum(r.energy_mj for r in mine) / 1e3, rel=1e-12)
            assert service.metrics.value("throttllem_tenant_generated_tokens_total",
                                         {"tenant": tenant}) == sum(
                r.generated_tokens for r in mine)

    ledger, exporter = services()
    for service in (ledger, exporter):
        await run_until(service, lambda s=service: count(s, "new") + count(s, "duplicate") >= 15)
        assert (count(service, "new"), count(service, "duplicate")) == (12, 3)
    totals(exporter, first)

    # Restart: the durables resume after the last acked record; nothing is handed over twice.
    later = [record(n) for n in range(12, 20)]
    await publish(nats.url, later)
    ledger, exporter = services()
    for service in (ledger, exporter):
        await run_until(service, lambda s=service: count(s, "new") >= len(later))
        assert count(service, "duplicate") == 0
    totals(exporter, later)  # a restarted exporter counts from zero (a counter reset)

    everything = first + later
    rows = list(read_ledger(ledger_path))
    assert sorted(r.id for r in rows) == sorted(r.id for r in everything)
    assert rows == sorted(everything, key=lambda r: r.completed_s)
    window = list(read_ledger(ledger_path, since_s=5.0, until_s=10.0))
    assert [r.id for r in window] == [f"req-{n}" for n in range(5, 10)]


@pytest.mark.anyio
async def test_ledger_ignores_a_redelivered_record(tmp_path: Path) -> None:
    ctx = ConsumerContext(plugin="ledger", durable="ledger",
                          options={"path": str(tmp_path / "l.sqlite")})
    ledger = EnergyLedgerConsumer(ctx)
    await ledger.open()
    try:
        assert await ledger.on_energy(record(1)) is True
        assert await ledger.on_energy(record(1)) is False
    finally:
        await ledger.close()
    assert [r.id for r in read_ledger(tmp_path / "l.sqlite")] == ["req-1"]
    with pytest.raises(ConfigError, match="no energy ledger"):
        list(read_ledger(tmp_path / "missing.sqlite"))
    with pytest.raises(ConfigError, match="remember"):
        TenantEnergyExporter(ConsumerContext(plugin="p", durable="p",
                                             options={"remember": "many"}))

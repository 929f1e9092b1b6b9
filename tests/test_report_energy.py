"""`throttllem report energy` against a real nats-server holding records published through
the real Bus (one of them twice), and against a ledger file of the same records."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._cli import main
from throttllem._consumers import ConsumerContext
from throttllem._consumers.ledger import EnergyLedgerConsumer
from throttllem._energy_report import parse_instant
from throttllem._events import RequestEnergy
from throttllem._subjects import ENERGY_REQUEST

pytestmark = pytest.mark.slow

TENANTS = ("acme", "globex")
RECORDS = [RequestEnergy(id=f"r{n}", tenant=TENANTS[n % 2], instance=f"i{n % 3}",
                         energy_mj=5000.0 + 250.0 * n, prompt_tokens=50 + 5 * n,
                         generated_tokens=20 + n, completed_s=100.0 + n)
           for n in range(15)]


async def publish(url: str) -> None:
    bus = await Bus.connect(url, name="telemetry-stand-in")
    try:
        await bus.ensure_request_stream()
        for r in RECORDS:
            await bus.publish_durable(ENERGY_REQUEST, r, msg_id=f"energy-{r.id}")
        # Stored again (no message id): the report must count r3 once.
        await bus.publish_durable(ENERGY_REQUEST, RECORDS[3])
    finally:
        await bus.close()


def expected(records: list[RequestEnergy], key: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in records:
        row = out.setdefault(getattr(r, key), {"requests": 0, "energy_j": 0.0,
                                                "prompt_tokens": 0, "generated_tokens": 0})
        row["requests"] += 1
        row["energy_j"] += r.energy_mj / 1e3
        row["prompt_tokens"] += r.prompt_tokens
        row["generated_tokens"] += r.generated_tokens
    for row in out.values():
        row["j_per_token"] = row["energy_j"] / row["generated_tokens"]
    return out


def check(report: dict[str, object], records: list[RequestEnergy]) -> None:
    for key, section in (("tenant", "tenants"), ("instance", "instances")):
        got = report[section]
        want = expected(records, key)
        assert isinstance(got, dict)
        assert set(got) == set(want)
        for name, row in want.items():
            assert got[name] == pytest.approx(row, rel=1e-12)
    total = report["total"]
    assert isinstance(total, dict)
    assert total["requests"] == len(records)
    assert total["energy_j"] == pytest.approx(sum(r.energy_mj for r in records) / 1e3)


def test_report_from_the_stream_matches_the_records_each_id_once(
        nats: EmbeddedNatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    anyio.run(publish, nats.url)

    assert main(["report", "energy", "--nats", nats.url, "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    check(report, RECORDS)
    assert report["duplicates"] == 1
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()  # what the set-up logged
    assert main(["report", "energy", "--nats", nats.url, "--since", "105",
                 "--until", "110", "--json"]) == 0
    window = json.loads(capsys.readouterr().out)
    check(window, [r for r in RECORDS if 105 <= r.completed_s < 110])

    assert main(["report", "energy", "--nats", nats.url]) == 0
    table = capsys.readouterr().out
    assert "by tenant" in table
    assert "by instance" in table
    assert all(t in table for t in TENANTS)


def test_report_from_a_ledger_equals_the_streams(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    async def fill() -> None:
        ledger = EnergyLedgerConsumer(ConsumerContext(
            plugin="ledger", durable="ledger", options={"path": str(tmp_path / "l.sqlite")}))
        await ledger.open()
        for r in [*RECORDS, RECORDS[3]]:
            await ledger.on_energy(r)
        await ledger.close()

    anyio.run(fill)
    capsys.readouterr()
    assert main(["report", "energy", "--ledger", str(tmp_path / "l.sqlite"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    check(report, RECORDS)
    assert report["duplicates"] == 0, "the ledger never stored the duplicate"


def test_report_errors_are_clear(nats: EmbeddedNatsServer, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "energy", "--nats", nats.url]) == 2
    assert "no stream TLLM_REQUESTS" in capsys.readouterr().err
    assert main(["report", "energy", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    assert "no energy ledger" in capsys.readouterr().err
    assert main(["report", "energy", "--nats", nats.url, "--since", "yesterday"]) == 2
    assert "not a time" in capsys.readouterr().err
    assert parse_instant("1970-01-01T00:01:40") == 100.0
    assert parse_instant("1970-01-01T01:01:40+01:00") == 100.0

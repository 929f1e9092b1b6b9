"""A service killed (SIGKILL, no goodbye) and restarted loses no request and admits none twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._errors import BusError
from throttllem._events import REQUEST_CODEC, RequestAdmitted, RequestArrived, RequestEvent
from throttllem._subjects import REQUEST_ADMITTED_ALL, REQUEST_ARRIVED

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def start_forecaster(url: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "throttllem", "run", "forecaster", "--instances", "i0,i1",
             "--nats", url], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def log_events(log_path: Path, event: str) -> list[dict[str, object]]:
    """The JSON log lines of one event (services log JSON lines on stderr)."""
    out = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


def pid_of(record: dict[str, object]) -> int:
    """The process id inside an instance id (`host-pid-random`)."""
    return int(str(record["instance_id"]).rsplit("-", 2)[1])


async def publish(bus: Bus, ids: range) -> None:
    for n in ids:
        await bus.publish_durable(
            REQUEST_ARRIVED, RequestArrived(id=f"r{n}", arrival_s=n, prompt_tokens=5),
            msg_id=f"arrived-r{n}")


async def test_killed_forecaster_resumes_without_loss_or_duplicates(
        nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    bus = await Bus.connect(nats.url, name="test")
    await bus.ensure_request_stream()
    seen_live: list[str] = []

    async def on_admitted(event: RequestEvent) -> None:
        assert isinstance(event, RequestAdmitted)
        seen_live.append(event.request.id)

    await bus.subscribe(REQUEST_ADMITTED_ALL, REQUEST_CODEC, on_admitted)
    log_path = tmp_path / "forecaster.log"
    proc = start_forecaster(nats.url, log_path)
    first_pid = proc.pid
    try:
        # A new durable starts at new messages: publish once the service is ready.
        with anyio.fail_after(30):
            while "service.ready" not in log_path.read_text():
                await anyio.sleep(0.05)
        await publish(bus, range(150))
        with anyio.fail_after(30):
            while len(seen_live) < 50:
                await anyio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # Requests keep arriving while the forecaster is dead.
        await publish(bus, range(150, 300))
        proc = start_forecaster(nats.url, log_path)
        second_pid = proc.pid
        with anyio.fail_after(60):
            while len(set(seen_live)) < 300:
                await anyio.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    # The durable record (what an engine consumes): every request admitted exactly once.
    stored: list[str] = []
    async with anyio.create_task_group() as tg:
        async def collect(event: RequestEvent) -> None:
            assert isinstance(event, RequestAdmitted)
            stored.append(event.request.id)
            if len(stored) >= 300:
                tg.cancel_scope.cancel()

        await tg.start(partial(bus.consume, durable="audit", subject=REQUEST_ADMITTED_ALL,
                               codec=REQUEST_CODEC, handler=collect))
        with anyio.fail_after(10):
            await anyio.sleep_forever()
    await anyio.sleep(0.2)
    info = await bus.js.consumer_info("TLLM_REQUESTS", "audit")
    await bus.close()
    assert sorted(stored) == sorted(f"r{n}" for n in range(300))
    assert info.num_pending == 0, "more admissions stored than requests: a duplicate"
    # Both runs started, the killed one said no goodbye, and the restarted one (which must have
    # admitted r150-r299, published while nothing ran) stopped cleanly with no handler failing.
    assert [pid_of(r) for r in log_events(log_path, "service.ready")] == [first_pid, second_pid]
    assert [pid_of(r) for r in log_events(log_path, "service.stopped")] == [second_pid]
    assert not log_events(log_path, "handler.failed")


async def test_sigterm_stops_a_service_gracefully(nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    log_path = tmp_path / "forecaster.log"
    proc = start_forecaster(nats.url, log_path)
    try:
        with anyio.fail_after(30):
            while "service.ready" not in log_path.read_text():
                await anyio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert '"signal": "SIGTERM"' in text
    assert "service.stopped" in text


def test_a_service_run_against_an_unreachable_nats_says_what_is_true() -> None:
    """`throttllem run` has no embedded server: the hint must not offer one."""
    result = subprocess.run(
        [sys.executable, "-m", "throttllem", "run", "length-predictor", "--oracle", "0",
         "--nats", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 2
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.stderr
    assert "nats-server -js" in result.stderr
    assert "pass --nats the URL of a running server" in result.stderr
    assert "run without --nats to use the embedded server" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_caller_can_give_its_own_unreachable_hint() -> None:
    with pytest.raises(BusError, match=r"nats://127\.0\.0\.1:1 .*; run the demo without --nats$"):
        await Bus.connect("nats://127.0.0.1:1", name="t", connect_timeout_s=0.5,
                          hint="run the demo without --nats")

"""`throttllem health`, the containers' health check: it reads the service's own /metrics and
judges the heartbeat's age (the event loop runs) and, when asked, the NATS connection. Judged
on pages that prometheus_client itself renders, and end to end against a real service process
over a real nats-server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from throttllem import _metrics as m
from throttllem._bus import EmbeddedNatsServer
from throttllem._cli import main
from throttllem.testing import ServiceProcess, wait_for_metrics_url


def page(*, beat: bool = True, connected: bool | None = True) -> tuple[str, float]:
    """A service's metrics page as its runtime serves it, and the time of its heartbeat."""
    metrics = m.ServiceMetrics("forecaster")
    metrics.watch_bus({}, connected=None if connected is None else lambda: connected)
    if beat:
        metrics.heartbeat()
    stamp = metrics.value("throttllem_heartbeat_timestamp_seconds") or 0.0
    return generate_latest(metrics.registry).decode(), stamp


def test_a_fresh_heartbeat_is_healthy_and_says_who_it_is() -> None:
    text, stamp = page()
    verdict = m.judge_health(text, now_s=stamp + 1.0, max_age_s=15.0)
    assert verdict.healthy
    assert verdict.reason.startswith("forecaster 0.1.0: heartbeat 1.0 s ago, NATS connected")


def test_a_stale_heartbeat_means_a_stuck_event_loop() -> None:
    text, stamp = page()
    verdict = m.judge_health(text, now_s=stamp + 60.0, max_age_s=15.0)
    assert not verdict.healthy
    assert "last heartbeat 60.0 s ago (> 15 s): its event loop is stuck" in verdict.reason


def test_no_heartbeat_yet_is_unhealthy() -> None:
    text, _ = page(beat=False)
    verdict = m.judge_health(text, now_s=time.time(), max_age_s=15.0)
    assert not verdict.healthy
    assert "no heartbeat yet" in verdict.reason


def test_a_lost_bus_is_unhealthy_only_when_required() -> None:
    text, stamp = page(connected=False)
    alive = m.judge_health(text, now_s=stamp, max_age_s=15.0)
    assert alive.healthy
    assert alive.reason.endswith("NATS reconnecting")
    required = m.judge_health(text, now_s=stamp, max_age_s=15.0, require_bus=True)
    assert not required.healthy
    assert required.reason == "forecaster 0.1.0: not connected to NATS"


def test_a_page_that_is_not_metrics_is_unhealthy() -> None:
    verdict = m.judge_health("<html>{not metrics}</html>\n", now_s=0.0, max_age_s=15.0)
    assert not verdict.healthy
    assert verdict.reason.startswith("not a Prometheus metrics page")


def test_bad_probe_options_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--url", "file:///etc/passwd"]) == 2
    assert "--url must be an http(s) URL" in capsys.readouterr().err
    assert main(["health", "--max-age", "0"]) == 2
    assert "--max-age and --timeout must be > 0" in capsys.readouterr().err


def probe(url: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["health", "--url", url, "--timeout", "5", *extra])
    return code, capsys.readouterr().out.strip()


def probe_until(url: str, capsys: pytest.CaptureFixture[str], want: int,
                *extra: str) -> str:
    deadline = time.monotonic() + 30
    code, out = probe(url, capsys, *extra)
    while code != want and time.monotonic() < deadline:
        time.sleep(0.2)
        code, out = probe(url, capsys, *extra)
    assert code == want, out
    return out


@pytest.mark.slow
def test_the_probe_follows_a_real_service_through_a_bus_outage_and_its_death(
        nats: EmbeddedNatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ServiceProcess("scaler", ["scaler", "--instances", "i0,i1", "--capacity", "10",
                                   "--metrics-port", "0"], nats.url, tmp_path) as scaler:
        scaler.start()
        url = wait_for_metrics_url(scaler.log_path)

        out = probe_until(url, capsys, 0, "--require-bus")
        assert out.startswith("healthy: scaler 0.1.0: heartbeat")
        assert out.endswith("NATS connected")

        nats.stop()  # the service stays up and reconnects: alive, but not on the bus
        out = probe_until(url, capsys, 1, "--require-bus")
        assert out == "unhealthy: scaler 0.1.0: not connected to NATS"
        code, out = probe(url, capsys)
        assert code == 0, out
        assert out.endswith("NATS reconnecting")
    code, out = probe(url, capsys)
    assert code == 1
    assert out.startswith(f"unhealthy: cannot read {url}:")

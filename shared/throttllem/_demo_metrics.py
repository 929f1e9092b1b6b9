"""`throttllem demo --metrics-port`: one Prometheus scrape target for the whole demo.

The demo starts a dozen short-lived processes per policy, each on a free port of its own and
each gone when its run ends, so no scrape configuration written beforehand could name them.
The demo therefore serves one `/metrics` itself: at every scrape it reads the `/metrics` of
each service it started (`throttllem run <service> --metrics-port 0`, the port read from the
service's `metrics.serving` log line) and re-exposes every sample with two labels more,
`policy` and `process` (`engine-i0`, `forecaster`, `telemetry`, ...). When a policy's run
ends, the demo scrapes its services one last time, after the telemetry has counted every
completion, and keeps serving that final scrape: the figures of a finished run stay readable
until the demo exits (`--keep-serving` holds it open after the last run).
`throttllem_demo_target_up` says, per process, whether its latest scrape worked (Prometheus'
own `up`, one level down).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from throttllem import __version__
from throttllem import _metrics as m
from throttllem._metrics import MetricsServer, serve_registry

log = structlog.get_logger("throttllem.demo")

SCRAPE_TIMEOUT_S = 2.0


def metrics_url_from_log(log_path: Path, offset: int) -> str | None:
    """The URL a service logged as `metrics.serving` after byte `offset` of its log (a
    re-run appends to the same file), or None before it has."""
    try:
        with log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if '"metrics.serving"' not in line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "metrics.serving" and isinstance(entry.get("url"), str):
            return str(entry["url"])
    return None


def scrape(url: str) -> list[Metric]:
    """Every metric family on one `/metrics` page (raises OSError or ValueError)."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    return list(text_string_to_metric_families(text))


class DemoMetrics(Collector):
    """The demo's registry: its own build info and target health, plus every service's
    samples (live while the service runs, its final scrape after)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._live: dict[tuple[str, str], str] = {}  # (policy, process) -> /metrics URL
        self._final: dict[tuple[str, str], list[Metric]] = {}
        self._up: dict[tuple[str, str], float] = {}
        self.registry.register(self)

    def add_target(self, policy: str, process: str, url: str) -> None:
        with self._lock:
            self._live[(policy, process)] = url
            self._final.pop((policy, process), None)

    def targets(self, policy: str) -> dict[str, str]:
        with self._lock:
            return {process: url for (p, process), url in self._live.items() if p == policy}

    def finish(self, policy: str) -> None:
        """Scrape `policy`'s services one last time and serve that scrape from now on (call
        it before stopping them)."""
        for process, url in self.targets(policy).items():
            families = self._scrape_target(policy, process, url)
            with self._lock:
                self._live.pop((policy, process), None)
                if families is not None:
                    self._final[(policy, process)] = families

    def wait_for_completions(self, policy: str, count: int, timeout_s: float = 10.0) -> int:
        """Poll the telemetry of `policy` until it has counted `count` completions (its
        request counters then hold every request); returns the count it reached."""
        url = self.targets(policy).get("telemetry")
        counted = 0
        deadline = time.monotonic() + timeout_s
        while url is not None:
            try:
                families = scrape(url)
            except (OSError, ValueError):
                families = []
            counted = int(sum(s.value for f in families for s in f.samples
                              if s.name == m.REQUESTS_COMPLETED.name))
            if counted >= count or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return counted

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        return serve_registry(self.registry, port, host, service="demo")

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names vary with what the services export: nothing to reserve

    def _scrape_target(self, policy: str, process: str, url: str) -> list[Metric] | None:
        try:
            families = scrape(url)
        except (OSError, ValueError) as e:  # not serving yet, or already gone
            log.debug("demo.scrape_failed", policy=policy, process=process, url=url, error=str(e))
            with self._lock:
                self._up[(policy, process)] = 0.0
            return None
        with self._lock:
            self._up[(policy, process)] = 1.0
        return families

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            live = dict(self._live)
            sources = dict(self._final)
        for (policy, process), url in live.items():
            families = self._scrape_target(policy, process, url)
            if families is not None:
                sources[(policy, process)] = families
        # One family per name (Prometheus rejects a name described twice): the demo's own
        # build info joins its services'.
        build = Metric(m.BUILD_INFO.name, m.BUILD_INFO.help, "gauge")
        build.add_sample(m.BUILD_INFO.name, {"service": "demo", "version": __version__}, 1.0)
        merged: dict[str, Metric] = {m.BUILD_INFO.name: build}
        for (policy, process), families in sorted(sources.items()):
            for family in families:
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation,
                                                       family.type, family.unit)
                for sample in family.samples:
                    out.add_sample(sample.name,
                                   {**sample.labels, "policy": policy, "process": process},
                                   sample.value, sample.timestamp, sample.exemplar)
        yield from merged.values()
        up = GaugeMetricFamily(m.DEMO_TARGET_UP.name, m.DEMO_TARGET_UP.help,
                               labels=list(m.DEMO_TARGET_UP.labels))
        with self._lock:
            for (policy, process), value in sorted(self._up.items()):
                up.add_metric([policy, process], value)
        yield up

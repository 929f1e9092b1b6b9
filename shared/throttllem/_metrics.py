"""Prometheus metrics: every name, type, help text and label set in one place.

Conventions (Prometheus and OpenMetrics): the `throttllem_` prefix, base units in the name
(`_seconds`, `_joules`, `_watts`, `_mhz`, `_tokens`, `_ratio`), counters end in `_total`,
labels are low-cardinality (instance, node, gpu, tenant, SLO class, reason words; never a
request id). The README's metrics table is generated from `METRICS` (`metrics_table()`), and
a test keeps the two equal, as it does for the Grafana dashboard's queries.

Each service owns one `ServiceMetrics` (its own `CollectorRegistry`, so two services in one
process, as in tests, never collide) and creates the instruments it updates from the specs
below. `ServiceMetrics.serve()` exposes the registry on `/metrics`; `throttllem run
<service> --metrics-port N` does that for the service it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Literal
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from throttllem import __version__
from throttllem._errors import ConfigError

log = structlog.get_logger("throttllem.metrics")

Kind = Literal["counter", "gauge", "histogram"]

# Latency buckets from 5 ms (a fast TBT) to 2 min (a long E2E), roughly x2.5 apart.
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                            25.0, 60.0, 120.0)
DECISION_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                             0.05, 0.1, 0.25)
JOULES_PER_TOKEN_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as it appears on `/metrics` (a counter's name includes `_total`)."""

    kind: ClassVar[Kind]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    service: str = ""  # who exports it (README table); "any" for every service
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith("throttllem_"):
            raise ConfigError(f"metric {self.name!r} lacks the throttllem_ prefix")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ConfigError(f"metric {self.name!r}: counters, and only they, end in _total")


@dataclass(frozen=True)
class CounterSpec(MetricSpec):
    kind: ClassVar[Kind] = "counter"

    def create(self, registry: CollectorRegistry) -> Counter:
        # prometheus_client appends `_total` itself; it strips one given with the name.
        return Counter(self.name, self.help, self.labels, registry=registry)


@dataclass(frozen=True)
class GaugeSpec(MetricSpec):
    kind: ClassVar[Kind] = "gauge"

    def create(self, registry: CollectorRegistry) -> Gauge:
        return Gauge(self.name, self.help, self.labels, registry=registry)


@dataclass(frozen=True)
class HistogramSpec(MetricSpec):
    kind: ClassVar[Kind] = "histogram"

    def create(self, registry: CollectorRegistry) -> Histogram:
        return Histogram(self.name, self.help, self.labels, registry=registry,
                         buckets=self.buckets or LATENCY_BUCKETS_S)


# --------------------------------------------------------------------------- every service

BUILD_INFO: Final = GaugeSpec(
    "throttllem_build_info",
    help="Always 1; the labels say which service and version run.",
    labels=("service", "version"), service="any")
BUS_REJECTED: Final = CounterSpec(
    "throttllem_bus_rejected_events_total",
    help="Bus messages that did not decode as their subject's event (dropped, never retried).",
    labels=("family",), service="any")
BUS_HANDLER_ERRORS: Final = CounterSpec(
    "throttllem_bus_handler_errors_total",
    help="Events whose handler raised (JetStream: nak'ed and redelivered).",
    labels=("family",), service="any")
SERVICE_EVENTS: Final = CounterSpec(
    "throttllem_service_events_total",
    help="The service's own counted events, as on its heartbeat (errors, refusals, ...).",
    labels=("event",), service="any")
HEARTBEAT_TIME: Final = GaugeSpec(
    "throttllem_heartbeat_timestamp_seconds",
    help="Unix time of the service's latest heartbeat: its event loop runs (`throttllem "
         "health` checks its age).",
    service="any")
BUS_CONNECTED: Final = GaugeSpec(
    "throttllem_bus_connected",
    help="1 while the service's NATS connection is up, 0 while it reconnects.",
    service="any")

# --------------------------------------------------------------------------- forecaster

ADMISSIONS: Final = CounterSpec(
    "throttllem_admissions_total", help="Requests admitted, by engine instance.",
    labels=("instance",), service="forecaster")
DEFERRALS: Final = CounterSpec(
    "throttllem_deferrals_total",
    help="Requests deferred (kept queued, retried), by reason word.",
    labels=("reason",), service="forecaster")
REFUSALS: Final = CounterSpec(
    "throttllem_refusals_total",
    help="Requests refused for good (final deferral), by reason word.",
    labels=("reason",), service="forecaster")
DECISION_LATENCY: Final = HistogramSpec(
    "throttllem_decision_latency_seconds",
    help="Wall time of one admission/clock decision (forecast, SLO check, clock search).",
    service="forecaster", buckets=DECISION_BUCKETS_S)
CLOCK_TARGET: Final = GaugeSpec(
    "throttllem_clock_target_mhz",
    help="Latest SM clock target per instance (0: the GPU's default, unlocked).",
    labels=("instance",), service="forecaster, actuator")

# --------------------------------------------------------------------------- engine

QUEUE_LENGTH: Final = GaugeSpec(
    "throttllem_engine_queue_requests", help="Requests waiting in the engine's queue.",
    labels=("instance",), service="engine")
BATCH_SIZE: Final = GaugeSpec(
    "throttllem_engine_batch_requests", help="Requests in the engine's latest iteration.",
    labels=("instance",), service="engine")
KV_USAGE: Final = GaugeSpec(
    "throttllem_engine_kv_usage_ratio", help="Share of the KV-cache blocks in use.",
    labels=("instance",), service="engine")

# --------------------------------------------------------------------------- actuator

CLOCK_APPLIED: Final = GaugeSpec(
    "throttllem_clock_applied_mhz",
    help="SM clock the actuator last locked per instance (0: reset to the GPU's default).",
    labels=("instance",), service="actuator")
CLOCK_CHANGES: Final = CounterSpec(
    "throttllem_clock_changes_total",
    help="Clock changes applied (lock or reset), by outcome (ok, error, refused).",
    labels=("instance", "outcome"), service="actuator")
CLOCK_DRY_RUN: Final = GaugeSpec(
    "throttllem_clock_dry_run", help="1 when the actuator only logs NVML calls (dry run).",
    labels=("instance",), service="actuator")

# --------------------------------------------------------------------------- telemetry

GPU_POWER: Final = GaugeSpec(
    "throttllem_gpu_power_watts", help="GPU board power at the latest sample.",
    labels=("node", "gpu", "source"), service="telemetry")
GPU_ENERGY: Final = CounterSpec(
    "throttllem_gpu_energy_joules_total",
    help="GPU energy since the collector started (from the driver's energy counter).",
    labels=("node", "gpu", "source"), service="telemetry")
GPU_SM_CLOCK: Final = GaugeSpec(
    "throttllem_gpu_sm_clock_mhz", help="SM clock at the latest sample.",
    labels=("node", "gpu"), service="telemetry")
GPU_UTILIZATION: Final = GaugeSpec(
    "throttllem_gpu_utilization_ratio", help="GPU utilization (0-1) at the latest sample.",
    labels=("node", "gpu"), service="telemetry")
REQUEST_ENERGY: Final = CounterSpec(
    "throttllem_request_energy_joules_total",
    help="Energy attributed to finished requests (the durable energy.request records).",
    labels=("instance", "tenant"), service="telemetry")
PROMPT_TOKENS: Final = CounterSpec(
    "throttllem_prompt_tokens_total", help="Prompt tokens of finished requests.",
    labels=("instance", "tenant"), service="telemetry")
GENERATED_TOKENS: Final = CounterSpec(
    "throttllem_generated_tokens_total", help="Generated tokens of finished requests.",
    labels=("instance", "tenant"), service="telemetry")
JOULES_PER_TOKEN: Final = HistogramSpec(
    "throttllem_request_joules_per_token",
    help="Energy per generated token of each finished request.",
    labels=("instance",), service="telemetry", buckets=JOULES_PER_TOKEN_BUCKETS)
REQUESTS_COMPLETED: Final = CounterSpec(
    "throttllem_requests_completed_total",
    help="Finished requests by SLO class and whether they met every SLO bound "
         "(slo_met: true, false, or unknown for a class the collector does not know).",
    labels=("slo_class", "slo_met"), service="telemetry")
TTFT: Final = HistogramSpec(
    "throttllem_request_ttft_seconds", help="Time to first token of finished requests.",
    labels=("slo_class",), service="telemetry")
TBT: Final = HistogramSpec(
    "throttllem_request_tbt_seconds", help="Mean time between tokens of finished requests.",
    labels=("slo_class",), service="telemetry")
E2E: Final = HistogramSpec(
    "throttllem_request_e2e_seconds", help="End-to-end latency of finished requests.",
    labels=("slo_class",), service="telemetry")
ATTRIBUTION_MISMATCH: Final = CounterSpec(
    "throttllem_energy_attribution_mismatch_total",
    help="Requests where the engine's and the collector's energy attribution differ by >1%.",
    service="telemetry")

# --------------------------------------------------------------------------- scaler

SCALE_TARGET: Final = GaugeSpec(
    "throttllem_scale_target_instances",
    help="Instances the scaler wants to exist (what an HPA or KEDA scales the engines to).",
    labels=("setup",), service="scaler")
SCALE_PHASE: Final = GaugeSpec(
    "throttllem_scale_instances", help="Instances by phase (warming, active, draining).",
    labels=("setup", "phase"), service="scaler")
SCALE_LOAD: Final = GaugeSpec(
    "throttllem_scale_load_per_second",
    help="Load estimate in the scaler's unit (requests or prompt tokens) per second; "
         "-1 while not known yet.",
    labels=("setup", "unit"), service="scaler")
SCALE_DECISIONS: Final = CounterSpec(
    "throttllem_scale_decisions_total", help="Scaling changes, by action.",
    labels=("setup", "action"), service="scaler")

# --------------------------------------------------------------------------- length predictor

LENGTH_PREDICTIONS: Final = CounterSpec(
    "throttllem_length_predictions_total", help="Length predictions made, by model version.",
    labels=("model_version",), service="length-predictor")
LENGTH_REJECTED: Final = CounterSpec(
    "throttllem_length_rejected_total",
    help="Requests the predictor could not serve (final deferral or RPC error).",
    service="length-predictor")
LENGTH_PREDICTED_TOKENS: Final = HistogramSpec(
    "throttllem_length_predicted_tokens", help="Predicted generated tokens (median).",
    service="length-predictor",
    buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))
LENGTH_MAE: Final = GaugeSpec(
    "throttllem_length_error_tokens",
    help="Mean absolute length-prediction error over the recent completions "
         "(NaN until one completes).",
    service="length-predictor")
LENGTH_COVERAGE: Final = GaugeSpec(
    "throttllem_length_upper_coverage_ratio",
    help="Share of recent completions at or under the predicted upper quantile.",
    service="length-predictor")
LENGTH_FEEDBACK: Final = CounterSpec(
    "throttllem_length_feedback_total",
    help="Completions compared with their prediction.", service="length-predictor")

# --------------------------------------------------------------------------- replayer

REPLAYED: Final = CounterSpec(
    "throttllem_replayer_requests_total", help="Trace requests published.",
    labels=("tenant", "slo_class"), service="replayer")
REPLAY_LAG: Final = GaugeSpec(
    "throttllem_replayer_lag_seconds",
    help="How late (event time) the latest request was published after its arrival time.",
    service="replayer")

# --------------------------------------------------------------------------- consumers

TENANT_ENERGY: Final = CounterSpec(
    "throttllem_tenant_energy_joules_total",
    help="Energy attributed to a tenant's requests, each record counted once per id.",
    labels=("tenant",), service="consumer prometheus")
TENANT_TOKENS: Final = CounterSpec(
    "throttllem_tenant_generated_tokens_total",
    help="Generated tokens of a tenant's requests, each record counted once per id.",
    labels=("tenant",), service="consumer prometheus")
CONSUMER_RECORDS: Final = CounterSpec(
    "throttllem_consumer_records_total",
    help="Records a plug-in consumer received, by plug-in and outcome (new, duplicate).",
    labels=("plugin", "outcome"), service="consumer")

# --------------------------------------------------------------------------- demo

DEMO_TARGET_UP: Final = GaugeSpec(
    "throttllem_demo_target_up",
    help="1 when the demo's latest scrape of a service's /metrics worked, else 0 "
         "(`throttllem demo --metrics-port`: its samples carry policy and process labels).",
    labels=("policy", "process"), service="demo")


METRICS: Final[tuple[MetricSpec, ...]] = tuple(
    v for v in list(globals().values()) if isinstance(v, MetricSpec))


def metrics_table() -> str:
    """The README's metrics table (Markdown), one row per spec in definition order."""
    rows = ["| metric | type | labels | exported by | meaning |",
            "| --- | --- | --- | --- | --- |"]
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "–"
        rows.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.service} | {spec.help} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- registries


class _CountersCollector(Collector):
    """Exposes a live `Counter[str]` (a Bus's counters) at scrape time: `rejected.<family>`
    and `handler_errors.<family>` as bus metrics, every other key as a service event."""

    def __init__(self, counters: Mapping[str, int]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        rejected = CounterMetricFamily(BUS_REJECTED.name, BUS_REJECTED.help,
                                       labels=list(BUS_REJECTED.labels))
        errors = CounterMetricFamily(BUS_HANDLER_ERRORS.name, BUS_HANDLER_ERRORS.help,
                                     labels=list(BUS_HANDLER_ERRORS.labels))
        events = CounterMetricFamily(SERVICE_EVENTS.name, SERVICE_EVENTS.help,
                                     labels=list(SERVICE_EVENTS.labels))
        for key, value in sorted(dict(self._counters).items()):
            kind, _, family = key.partition(".")
            if kind == "rejected" and family:
                rejected.add_metric([family], float(value))
            elif kind == "handler_errors" and family:
                errors.add_metric([family], float(value))
            else:
                events.add_metric([key], float(value))
        yield from (rejected, errors, events)


class _FunctionGauges(Collector):
    """Unlabelled gauges read at scrape time (values a service already keeps)."""

    def __init__(self, gauges: Iterable[tuple[GaugeSpec, Callable[[], float]]]) -> None:
        self._gauges = list(gauges)

    def collect(self) -> Iterator[Metric]:
        for spec, fn in self._gauges:
            family = GaugeMetricFamily(spec.name, spec.help)
            family.add_metric([], fn())
            yield family


class MetricsServer:
    """`/metrics` over HTTP in a daemon thread (prometheus_client's WSGI server)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class ServiceMetrics:
    """One service's registry and the instruments it creates from the specs above.

    The runtime calls `watch_bus(bus.counters)` for every service that has a `metrics`
    attribute of this type, so bus rejections and the service's own counters are exported
    without the service doing anything.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        BUILD_INFO.create(self.registry).labels(service=service, version=__version__).set(1)
        self._watched = False
        self._heartbeat: Gauge | None = None

    def counter(self, spec: CounterSpec) -> Counter:
        return spec.create(self.registry)

    def gauge(self, spec: GaugeSpec) -> Gauge:
        return spec.create(self.registry)

    def histogram(self, spec: HistogramSpec) -> Histogram:
        return spec.create(self.registry)

    def gauge_functions(self, gauges: Iterable[tuple[GaugeSpec, Callable[[], float]]]) -> None:
        """Gauges whose value is read at scrape time (NaN stays NaN: Prometheus allows it)."""
        self.registry.register(_FunctionGauges(gauges))

    def watch_bus(self, counters: Mapping[str, int],
                  connected: Callable[[], bool] | None = None) -> None:
        """Export a bus's counters and, given `connected`, whether it is connected."""
        if not self._watched:
            self.registry.register(_CountersCollector(counters))
            if connected is not None:
                self.gauge_functions([(BUS_CONNECTED, lambda: float(connected()))])
            self._watched = True

    def heartbeat(self) -> None:
        """Stamp a heartbeat (wall time): the liveness that `throttllem health` reads."""
        if self._heartbeat is None:
            self._heartbeat = self.gauge(HEARTBEAT_TIME)
        self._heartbeat.set(time.time())

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample's current value (tests, reports); None when absent."""
        return self.registry.get_sample_value(name, dict(labels or {}))

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve `/metrics` on host:port (port 0 picks a free one; see `.port`)."""
        return serve_registry(self.registry, port, host, service=self.service)


def serve_registry(registry: CollectorRegistry, port: int, host: str = "127.0.0.1", *,
                   service: str) -> MetricsServer:
    """Serve a registry on `/metrics` at host:port (0 picks a free port), logged as
    `metrics.serving` with its URL."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be 0-65535, not {port}")
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
    served = MetricsServer(server, thread)
    log.info("metrics.serving", service=service, url=served.url)
    return served


# --------------------------------------------------------------------------- health


@dataclass(frozen=True)
class Health:
    """A container health check's verdict on one service, from its own `/metrics` page."""

    healthy: bool
    reason: str


def judge_health(exposition: str, *, now_s: float, max_age_s: float,
                 require_bus: bool = False) -> Health:
    """Healthy when the service's latest heartbeat is at most `max_age_s` old (its event loop
    runs: the metrics thread alone would answer even with the loop stuck) and, with
    `require_bus`, its NATS connection is up. A service waiting for NATS is alive and
    reconnects by itself, so the bus is not required by default."""
    try:
        families = list(text_string_to_metric_families(exposition))
    except ValueError as e:
        return Health(False, f"not a Prometheus metrics page ({e})")
    values = {s.name: s for family in families for s in family.samples}
    info = values.get(BUILD_INFO.name)
    who = (f"{info.labels.get('service', '?')} {info.labels.get('version', '?')}"
           if info is not None else "not a throttllem service")
    beat = values.get(HEARTBEAT_TIME.name)
    if beat is None:
        return Health(False, f"{who}: no heartbeat yet (starting, or never got ready)")
    age_s = now_s - beat.value
    if age_s > max_age_s:
        return Health(False, f"{who}: last heartbeat {age_s:.1f} s ago (> {max_age_s:g} s): "
                             "its event loop is stuck")
    bus = values.get(BUS_CONNECTED.name)
    connected = bus is not None and bus.value == 1.0
    if require_bus and not connected:
        return Health(False, f"{who}: not connected to NATS")
    return Health(True, f"{who}: heartbeat {max(age_s, 0.0):.1f} s ago, NATS "
                        f"{'connected' if connected else 'reconnecting'}")

"""The telemetry collector: samples GPUs (NVML or twin) onto `gpu.sample.<node>.<gpu>`, and
publishes one durable `energy.request` record per finished request for billing and reports.

Per-request energy: an engine that attributes energy itself (the twin does, exactly) puts it
in `request.completed`; for engines that cannot, the collector attributes each iteration's
energy by token share from `engine.iteration` events (the same core function).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import anyio
import anyio.abc
import structlog

from throttllem import _metrics as m
from throttllem._bus import Bus
from throttllem._core.energy import EnergyLedger
from throttllem._core.slo import DEFAULT_SLO_CLASSES, SloClass, check_slo
from throttllem._errors import ConfigError, GpuError
from throttllem._events import (
    ENGINE_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    GpuSample,
    RequestCompleted,
    RequestEnergy,
    RequestEvent,
)
from throttllem._gpu.remote import AsyncGpu, RemoteGpu, ThreadedGpu
from throttllem._runtime import Clock
from throttllem._subjects import (
    ENERGY_REQUEST,
    ENGINE_ITERATION_ALL,
    REQUEST_COMPLETED,
    TELEMETRY_DURABLE,
    gpu_sample,
    token,
    twin_gpu,
)

log = structlog.get_logger("throttllem.telemetry")

# An iteration event may reach us just after its request's completion (different
# subscriptions); wait this long before closing a request's ledger entry.
_LEDGER_GRACE_WALL_S = 0.5


class TelemetryService:
    name = "telemetry"

    def __init__(self, *, gpu: str = "twin", instances: list[str] | None = None,
                 node: str = "node0", interval_s: float = 0.5,
                 slo_classes: Mapping[str, SloClass] = DEFAULT_SLO_CLASSES) -> None:
        """`slo_classes` only label the completions metric (met or not); they decide nothing
        here."""
        if gpu not in ("twin", "nvml"):
            raise ConfigError(f"--gpu must be 'twin' or 'nvml', not {gpu!r}")
        if gpu == "twin" and not instances:
            raise ConfigError("the twin backend samples engine twins: pass --instances")
        if interval_s <= 0:
            raise ConfigError("--interval must be positive")
        self.backend = gpu
        self.instances = [token(i) for i in instances or []]
        self.node = token(node)
        self.interval_s = interval_s
        self.ledger = EnergyLedger()
        self.samples_published = 0
        # Event time up to which each instance's iterations have reached the ledger.
        self._ledger_until_s: dict[str, float] = {}
        self.slo_classes = slo_classes
        self.metrics = m.ServiceMetrics(self.name)
        self._power = self.metrics.gauge(m.GPU_POWER)
        self._gpu_energy = self.metrics.counter(m.GPU_ENERGY)
        self._sm_clock = self.metrics.gauge(m.GPU_SM_CLOCK)
        self._util = self.metrics.gauge(m.GPU_UTILIZATION)
        self._request_energy = self.metrics.counter(m.REQUEST_ENERGY)
        self._prompt_tokens = self.metrics.counter(m.PROMPT_TOKENS)
        self._generated_tokens = self.metrics.counter(m.GENERATED_TOKENS)
        self._j_per_token = self.metrics.histogram(m.JOULES_PER_TOKEN)
        self._completed = self.metrics.counter(m.REQUESTS_COMPLETED)
        self._ttft = self.metrics.histogram(m.TTFT)
        self._tbt = self.metrics.histogram(m.TBT)
        self._e2e = self.metrics.histogram(m.E2E)
        self._mismatch = self.metrics.counter(m.ATTRIBUTION_MISMATCH)
        # Last energy counter reading (mJ) per GPU: the metric adds the differences.
        self._last_energy_mj: dict[tuple[str, int], float] = {}

    def _observe_sample(self, sample: GpuSample) -> None:
        gpu = str(sample.gpu_index)
        self._power.labels(sample.node, gpu, sample.source).set(sample.power_w)
        self._sm_clock.labels(sample.node, gpu).set(sample.sm_clock_mhz)
        self._util.labels(sample.node, gpu).set(sample.gpu_util_pct / 100.0)
        key = (sample.node, sample.gpu_index)
        last = self._last_energy_mj.get(key)
        counter = self._gpu_energy.labels(sample.node, gpu, sample.source)
        if last is not None and sample.energy_mj >= last:  # a lower reading: driver reloaded
            counter.inc((sample.energy_mj - last) / 1e3)
        self._last_energy_mj[key] = sample.energy_mj

    def _observe_completion(self, event: RequestCompleted, energy_mj: float) -> None:
        self._request_energy.labels(event.instance, event.tenant).inc(energy_mj / 1e3)
        self._prompt_tokens.labels(event.instance, event.tenant).inc(event.prompt_tokens)
        self._generated_tokens.labels(event.instance, event.tenant).inc(event.generated_tokens)
        if event.generated_tokens > 0:
            self._j_per_token.labels(event.instance).observe(
                energy_mj / 1e3 / event.generated_tokens)
        if event.slo_class in self.slo_classes:
            met = "true" if check_slo(event, self.slo_classes).all_ok else "false"
        else:
            met = "unknown"
        self._completed.labels(event.slo_class, met).inc()
        self._ttft.labels(event.slo_class).observe(event.ttft_ms / 1e3)
        self._tbt.labels(event.slo_class).observe(event.tbt_mean_ms / 1e3)
        self._e2e.labels(event.slo_class).observe(event.e2e_ms / 1e3)

    def _gpus(self, bus: Bus) -> list[tuple[str, AsyncGpu]]:
        if self.backend == "twin":
            return [(inst, RemoteGpu(bus, twin_gpu(inst))) for inst in self.instances]
        from throttllem._gpu.nvml import NvmlBackend  # noqa: PLC0415 - pynvml only when asked

        return [(self.node, ThreadedGpu(NvmlBackend()))]

    async def _sample_forever(self, bus: Bus, clock: Clock,
                              gpus: list[tuple[str, AsyncGpu]]) -> None:
        counts: dict[str, int] = {}
        source = "twin" if self.backend == "twin" else "nvml"
        while True:
            for node, gpu in gpus:
                try:
                    if node not in counts:
                        counts[node] = await gpu.gpu_count()
                    for index in range(counts[node]):
                        r = await gpu.read(index)
                        sample = GpuSample(
                            node=node, gpu_index=index, uuid=r.uuid, now_s=clock.now_s(),
                            power_w=r.power_w, energy_mj=r.energy_mj,
                            sm_clock_mhz=r.sm_clock_mhz, mem_clock_mhz=r.mem_clock_mhz,
                            gpu_util_pct=r.gpu_util_pct, mem_util_pct=r.mem_util_pct,
                            temperature_c=r.temperature_c, source=source)
                        await bus.publish(gpu_sample(node, index), sample)
                        self.samples_published += 1
                        self._observe_sample(sample)
                except GpuError as e:
                    bus.counters["gpu_read_errors"] += 1
                    log.warning("gpu.read_failed", node=node, error=str(e))
            await anyio.sleep(self.interval_s)

    async def _on_iteration(self, it: EngineIteration) -> None:
        self.ledger.add_iteration(it.request_ids, it.request_tokens, it.energy_mj)
        end_s = it.start_s + it.duration_ms / 1e3
        self._ledger_until_s[it.instance] = max(self._ledger_until_s.get(it.instance, end_s), end_s)

    async def _on_completed(self, bus: Bus, event: RequestEvent) -> None:
        if not isinstance(event, RequestCompleted):
            return
        # Wait (briefly) until the request's last iteration has reached the ledger.
        with anyio.move_on_after(_LEDGER_GRACE_WALL_S):
            # A short bounded poll: an Event per request would cost more than it saves.
            while self._ledger_until_s.get(  # noqa: ASYNC110
                    event.instance, -1.0) < event.completed_s - 1e-9:
                await anyio.sleep(0.01)
        ledger_mj = self.ledger.pop(event.id)
        if event.energy_mj is not None:
            energy_mj, source = event.energy_mj, "engine"
            # Two attributions of the same iterations must agree; a gap means lost
            # iteration events or an engine that attributes differently.
            if abs(ledger_mj - energy_mj) > 0.01 * max(energy_mj, 1.0):
                bus.counters["attribution_mismatch"] += 1
                self._mismatch.inc()
                log.warning("energy.attribution_mismatch", id=event.id, engine_mj=energy_mj,
                            collector_mj=ledger_mj)
        else:
            energy_mj, source = ledger_mj, "collector"
        record = RequestEnergy(
            id=event.id, tenant=event.tenant, instance=event.instance, energy_mj=energy_mj,
            prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens,
            completed_s=event.completed_s, source=source)
        await bus.publish_durable(ENERGY_REQUEST, record, msg_id=f"energy-{event.id}")
        # Counted once the record is durable (a failed publish is nak'ed and comes back).
        self._observe_completion(event, energy_mj)

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        gpus = self._gpus(bus)  # at start: no driver / no permission fails here, clearly
        await bus.ensure_request_stream()
        await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, self._on_iteration)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(
                bus.consume, durable=TELEMETRY_DURABLE, subject=REQUEST_COMPLETED,
                deliver_new_only=True, codec=REQUEST_CODEC,
                handler=partial(self._on_completed, bus)))
            tg.start_soon(self._sample_forever, bus, clock, gpus)
            log.info("telemetry.started", backend=self.backend, instances=self.instances)
            task_status.started()

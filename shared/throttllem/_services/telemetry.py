"""The telemetry collector: samples GPUs (NVML or twin) onto `gpu.sample.<node>.<gpu>`, and
publishes one durable `energy.request` record per finished request for billing and reports.

Per-request energy: an engine that attributes energy itself (the twin does, exactly) puts it
in `request.completed`; for engines that cannot, the collector attributes each iteration's
energy by token share from `engine.iteration` events (the same core function).
"""

from __future__ import annotations

from functools import partial

import anyio
import anyio.abc
import structlog

from throttllem._bus import Bus
from throttllem._core.energy import EnergyLedger
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
                 node: str = "node0", interval_s: float = 0.5) -> None:
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
                        await bus.publish(gpu_sample(node, index), GpuSample(
                            node=node, gpu_index=index, uuid=r.uuid, now_s=clock.now_s(),
                            power_w=r.power_w, energy_mj=r.energy_mj,
                            sm_clock_mhz=r.sm_clock_mhz, mem_clock_mhz=r.mem_clock_mhz,
                            gpu_util_pct=r.gpu_util_pct, mem_util_pct=r.mem_util_pct,
                            temperature_c=r.temperature_c, source=source))
                        self.samples_published += 1
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
                log.warning("energy.attribution_mismatch", id=event.id, engine_mj=energy_mj,
                            collector_mj=ledger_mj)
        else:
            energy_mj, source = ledger_mj, "collector"
        record = RequestEnergy(
            id=event.id, tenant=event.tenant, instance=event.instance, energy_mj=energy_mj,
            prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens,
            completed_s=event.completed_s, source=source)
        await bus.publish_durable(ENERGY_REQUEST, record, msg_id=f"energy-{event.id}")

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        gpus = self._gpus(bus)  # at start: no driver / no permission fails here, clearly
        await bus.ensure_request_stream()
        await bus.subscribe(ENGINE_ITERATION_ALL, ENGINE_CODEC, self._on_iteration)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(
                bus.consume, durable="telemetry", subject=REQUEST_COMPLETED, deliver_new_only=True,
                codec=REQUEST_CODEC, handler=partial(self._on_completed, bus)))
            tg.start_soon(self._sample_forever, bus, clock, gpus)
            log.info("telemetry.started", backend=self.backend, instances=self.instances)
            task_status.started()

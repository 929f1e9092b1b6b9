"""The frequency actuator: applies `freq.target.<instance>` to the instance's GPUs and
publishes `freq.applied.<instance>`.

All GPUs of a tensor-parallel instance are locked together (and rolled back together when one
fails). Backends: NVML (real; `--dry-run` reads the real supported clocks and validates, but
only logs the exact NVML calls), or the twin over NATS. Fail-safe: a lease that runs out, or
a shutdown, resets the GPUs to their default clocks; so does a start (a lock left by an
actuator that died is not ours to keep). A dead actuator cannot reset anything, so a lock
also holds only while this actuator renews it: the twin's GPU server drops a lock not renewed
within `lock_hold_s`, and on NVML nodes `throttllem gpu-watchdog` does so from `hold_file`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import anyio.abc
import structlog

from throttllem import _metrics as m
from throttllem._bus import Bus
from throttllem._core.actuation import (
    RESET_RETRY_S,
    Action,
    Decision,
    LeaseState,
    after_failure,
    on_target,
    on_tick,
)
from throttllem._errors import ClockOutOfRangeError, ConfigError, GpuError, GpuNotFoundError
from throttllem._events import (
    DEFAULT_LOCK_HOLD_S,
    FREQ_CODEC,
    FreqApplied,
    FreqEvent,
    FreqTarget,
)
from throttllem._gpu.leases import Hold, check_hold, write_hold
from throttllem._gpu.remote import AsyncGpu, RemoteGpu, ThreadedGpu
from throttllem._runtime import Clock
from throttllem._subjects import freq_applied, freq_target, token, twin_gpu

log = structlog.get_logger("throttllem.actuator")


class ActuatorService:
    name = "actuator"

    def __init__(self, *, instance: str, backend: str = "twin", gpus: list[int] | None = None,
                 dry_run: bool = False, tick_s: float = 0.5,
                 gpu: AsyncGpu | None = None, startup_wait_s: float = 30.0,
                 reset_retry_s: float = RESET_RETRY_S,
                 lock_hold_s: float = DEFAULT_LOCK_HOLD_S, hold_file: Path | None = None) -> None:
        """`gpu` injects a ready backend (tests, embedding); otherwise `backend` picks one.
        `lock_hold_s`: wall seconds a lock outlives this actuator at most (renewed every
        tick while held); `hold_file`: where a node's gpu-watchdog reads that hold."""
        if backend not in ("twin", "nvml"):
            raise ConfigError(f"--gpu must be 'twin' or 'nvml', not {backend!r}")
        self.lock_hold_s = check_hold(lock_hold_s)
        if not 0 < tick_s <= self.lock_hold_s / 3:
            raise ConfigError(f"the actuator's tick ({tick_s} s) must be positive and at most "
                              f"a third of the lock hold ({self.lock_hold_s} s) to renew it")
        self.hold_file = hold_file
        self._renewed_at = 0.0  # monotonic instant of the last lock or renewal
        self.instance = token(instance)
        self.backend_name = backend
        self.gpu_indices = list(gpus) if gpus else [0]
        self.dry_run = dry_run
        self.tick_s = tick_s
        self.startup_wait_s = startup_wait_s
        self.reset_retry_s = reset_retry_s
        self._gpu = gpu
        self.state = LeaseState()
        self.supported_mhz: tuple[int, ...] = ()
        self.applied: list[FreqApplied] = []
        self.metrics = m.ServiceMetrics(self.name)
        self._target = self.metrics.gauge(m.CLOCK_TARGET).labels(self.instance)
        self._applied = self.metrics.gauge(m.CLOCK_APPLIED).labels(self.instance)
        self._changes = self.metrics.counter(m.CLOCK_CHANGES)
        self.metrics.gauge(m.CLOCK_DRY_RUN).labels(self.instance).set(float(dry_run))

    def _open(self, bus: Bus) -> AsyncGpu:
        if self._gpu is not None:
            return self._gpu
        if self.backend_name == "twin":
            return RemoteGpu(bus, twin_gpu(self.instance), lock_hold_s=self.lock_hold_s)
        from throttllem._gpu.nvml import NvmlBackend  # noqa: PLC0415 - pynvml only when asked

        return ThreadedGpu(NvmlBackend(dry_run=self.dry_run))

    async def _supported_clocks(self, gpu: AsyncGpu) -> tuple[int, ...]:
        """A twin GPU lives in its engine process, which may start after us: wait for it a
        while (a missing NVML driver fails at once, no waiting helps there)."""
        deadline = anyio.current_time() + (self.startup_wait_s if gpu.name == "twin" else 0.0)
        while True:
            try:
                return await gpu.supported_clocks_mhz(self.gpu_indices[0])
            except GpuNotFoundError:
                if anyio.current_time() >= deadline:
                    raise
                await anyio.sleep(0.2)

    async def _apply(self, bus: Bus, gpu: AsyncGpu, decision: Decision, now_s: float) -> None:
        if decision.action is Action.NONE:
            return
        error: str | None = None
        try:
            if decision.action is Action.LOCK:
                assert decision.clock_mhz is not None
                locked: list[int] = []
                try:
                    for index in self.gpu_indices:
                        await gpu.set_locked_clocks(index, decision.clock_mhz, decision.clock_mhz)
                        locked.append(index)
                    self._renewed_at = anyio.current_time()
                except GpuError:
                    for index in locked:  # never leave a TP group at mixed clocks
                        await gpu.reset_locked_clocks(index)
                    raise
            else:
                for index in self.gpu_indices:
                    await gpu.reset_locked_clocks(index)
        except (GpuError, ClockOutOfRangeError) as e:
            error = str(e)
            bus.counters["apply_errors"] += 1
            log.error("actuator.apply_failed", instance=self.instance, error=error,
                      action=decision.action.value, clock_mhz=decision.clock_mhz)
            # Clocks unknown now: retry a reset until one holds.
            self.state = after_failure(now_s, self.reset_retry_s)
        self._changes.labels(self.instance, "ok" if error is None else "error").inc()
        if error is None:  # 0 stands for the GPU's default clocks (reset)
            self._applied.set(decision.clock_mhz or 0.0)
        applied = FreqApplied(instance=self.instance, clock_mhz=decision.clock_mhz,
                              applied_s=now_s, backend=gpu.name, dry_run=self.dry_run,
                              error=error)
        self.applied.append(applied)
        await bus.publish(freq_applied(self.instance), applied)
        log.info("actuator.applied", instance=self.instance, clock_mhz=decision.clock_mhz,
                 reason=decision.reason, error=error)

    async def _reset_on_start(self, gpu: AsyncGpu, now_s: float) -> None:
        """Default clocks before the first target: whatever an earlier actuator left locked
        (it died without its shutdown reset) must not hold a GPU slow under us."""
        try:
            for index in self.gpu_indices:
                await gpu.reset_locked_clocks(index)
        except GpuError as e:
            self.state = after_failure(now_s, self.reset_retry_s)  # retried by the ticks
            log.error("actuator.startup_reset_failed", instance=self.instance, error=str(e))
            return
        self._applied.set(0.0)
        log.info("actuator.startup_reset", instance=self.instance, gpus=self.gpu_indices)

    async def _renew(self, bus: Bus, gpu: AsyncGpu, now_s: float) -> None:
        """Set the held lock again before its hold runs out where it lives."""
        clock_mhz = self.state.clock_mhz
        if (clock_mhz is None or gpu.lock_hold_s is None
                or anyio.current_time() - self._renewed_at < gpu.lock_hold_s / 3):
            return
        try:
            for index in self.gpu_indices:
                await gpu.set_locked_clocks(index, clock_mhz, clock_mhz)
            self._renewed_at = anyio.current_time()
        except (GpuError, ClockOutOfRangeError) as e:
            bus.counters["renew_errors"] += 1
            log.error("actuator.renew_failed", instance=self.instance, error=str(e))
            self.state = after_failure(now_s, self.reset_retry_s)

    def _write_hold(self) -> None:
        """Tell the node's watchdog until when our lock holds (nothing locked: no hold)."""
        if self.hold_file is None or self.dry_run:
            return
        write_hold(self.hold_file, Hold(gpus=tuple(self.gpu_indices),
                                        locked=self.state.clock_mhz is not None
                                        or self.state.reset_pending,
                                        until_unix_s=time.time() + self.lock_hold_s,
                                        pid=os.getpid()))

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        gpu = self._open(bus)
        self.supported_mhz = await self._supported_clocks(gpu)
        if not self.dry_run:
            await self._reset_on_start(gpu, clock.now_s())
        self._write_hold()
        lock = anyio.Lock()  # targets and lease ticks change the GPU one at a time

        async def on_freq(event: FreqEvent) -> None:
            if not isinstance(event, FreqTarget) or event.instance != self.instance:
                return
            self._target.set(event.clock_mhz or 0.0)
            async with lock:
                now_s = clock.now_s()
                try:
                    self.state, decision = on_target(self.state, event, now_s, self.supported_mhz)
                except ClockOutOfRangeError as e:
                    bus.counters["targets_refused"] += 1
                    self._changes.labels(self.instance, "refused").inc()
                    log.warning("actuator.target_refused", instance=self.instance, error=str(e))
                    refused = FreqApplied(instance=self.instance, clock_mhz=event.clock_mhz,
                                          applied_s=now_s, backend=gpu.name,
                                          dry_run=self.dry_run, error=f"refused: {e}")
                    self.applied.append(refused)
                    await bus.publish(freq_applied(self.instance), refused)
                    return
                await self._apply(bus, gpu, decision, now_s)
                self._write_hold()

        try:
            await bus.subscribe(freq_target(self.instance), FREQ_CODEC, on_freq)
            log.info("actuator.started", instance=self.instance, backend=gpu.name,
                     gpus=self.gpu_indices, dry_run=self.dry_run,
                     clocks=f"{self.supported_mhz[0]}–{self.supported_mhz[-1]} MHz")
            task_status.started()
            while True:
                await anyio.sleep(self.tick_s)
                async with lock:
                    now_s = clock.now_s()
                    self.state, decision = on_tick(self.state, now_s)
                    await self._apply(bus, gpu, decision, now_s)
                    if decision.action is Action.NONE:
                        await self._renew(bus, gpu, now_s)
                    self._write_hold()
        finally:
            with anyio.CancelScope(shield=True):
                if self.state.clock_mhz is not None or self.state.reset_pending:
                    self.state = LeaseState()
                    await self._apply(bus, gpu, Decision(
                        action=Action.RESET, clock_mhz=None, reason="shutdown"), clock.now_s())
                if not self.state.reset_pending:
                    self._write_hold()

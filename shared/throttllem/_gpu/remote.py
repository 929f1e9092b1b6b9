"""Async access to GPUs for services: local NVML through a thread, or a twin GPU over NATS.

The twin GPU lives inside its engine-twin process (that is where iterations draw power);
the telemetry collector and the actuator reach it through the same NVML-shaped calls,
sent as request/reply on `tllm.v1.twin.gpu.<instance>.read` (reads, supported clocks) and
`.control` (lock and reset), so that subject permissions let a collector read a GPU that only
the actuator may lock.
"""

from __future__ import annotations

from typing import Protocol

import anyio.to_thread

from throttllem._bus import Bus
from throttllem._errors import (
    BusError,
    GpuError,
    GpuNotFoundError,
    GpuPermissionError,
    MalformedEventError,
)
from throttllem._events import (
    DEFAULT_LOCK_HOLD_S,
    TWIN_GPU_ANSWER_CODEC,
    TWIN_GPU_CALL_CODEC,
    GpuReading,
    TwinGpuAnswer,
    TwinGpuCall,
)
from throttllem._gpu.backend import GpuBackend
from throttllem._gpu.leases import LockLeases, check_hold


class AsyncGpu(Protocol):
    """What services use: the GpuBackend calls, awaitable. `lock_hold_s` is how long a lock
    holds where the GPU lives unless it is set again (None: until reset, as NVML does)."""

    name: str
    lock_hold_s: float | None

    async def gpu_count(self) -> int: ...
    async def read(self, index: int) -> GpuReading: ...
    async def supported_clocks_mhz(self, index: int) -> tuple[int, ...]: ...
    async def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None: ...
    async def reset_locked_clocks(self, index: int) -> None: ...


class ThreadedGpu:
    """A blocking backend (NVML) called from a worker thread so the event loop never stalls."""

    lock_hold_s: float | None = None  # NVML keeps a lock until reset (see gpu-watchdog)

    def __init__(self, backend: GpuBackend) -> None:
        self.backend = backend
        self.name = backend.name

    async def gpu_count(self) -> int:
        return await anyio.to_thread.run_sync(self.backend.gpu_count)

    async def read(self, index: int) -> GpuReading:
        return await anyio.to_thread.run_sync(self.backend.read, index)

    async def supported_clocks_mhz(self, index: int) -> tuple[int, ...]:
        return await anyio.to_thread.run_sync(self.backend.supported_clocks_mhz, index)

    async def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        await anyio.to_thread.run_sync(self.backend.set_locked_clocks, index, min_mhz, max_mhz)

    async def reset_locked_clocks(self, index: int) -> None:
        await anyio.to_thread.run_sync(self.backend.reset_locked_clocks, index)


# --------------------------------------------------------------------------- twin over NATS

# Calls that change the GPU go to `<subject>.control`, reads to `<subject>.read`.
CONTROL_OPS: frozenset[str] = frozenset({"set_locked", "reset"})


def answer_gpu_call(backend: GpuBackend, call: TwinGpuCall,
                    leases: LockLeases | None = None) -> TwinGpuAnswer:
    """Run one call against a local backend; its errors (GpuError, ClockOutOfRangeError)
    propagate, and `Bus.serve` answers them as `rpc.error` replies naming their class. With
    `leases`, a lock holds for the call's `hold_s` unless set again."""
    if leases is not None and call.op == "set_locked":
        leases.lock(call.index, call.min_mhz, call.max_mhz, call.hold_s)
        return TwinGpuAnswer()
    if leases is not None and call.op == "reset":
        leases.reset(call.index)
        return TwinGpuAnswer()
    match call.op:
        case "count":
            return TwinGpuAnswer(count=backend.gpu_count())
        case "read":
            return TwinGpuAnswer(reading=backend.read(call.index))
        case "supported":
            return TwinGpuAnswer(clocks_mhz=list(backend.supported_clocks_mhz(call.index)))
        case "set_locked":
            backend.set_locked_clocks(call.index, call.min_mhz, call.max_mhz)
        case "reset":
            backend.reset_locked_clocks(call.index)
    return TwinGpuAnswer()


async def serve_gpu(bus: Bus, subject: str, backend: GpuBackend,
                    leases: LockLeases | None = None) -> object:
    """Answer NVML-shaped calls for `backend` on `<subject>.read` and `<subject>.control`
    (used by the engine twin); returns once the server knows we answer, before anyone is
    told we are ready. With `leases` (on `backend`), locks hold only for their `hold_s`; the
    caller runs `leases.enforce()`."""

    async def read(call: TwinGpuCall) -> TwinGpuAnswer:
        if call.op in CONTROL_OPS:
            raise GpuPermissionError(f"{call.op} is a control call: send it to "
                                     f"{subject}.control")
        return answer_gpu_call(backend, call)

    async def control(call: TwinGpuCall) -> TwinGpuAnswer:
        return answer_gpu_call(backend, call, leases)

    return (await bus.serve(f"{subject}.read", TWIN_GPU_CALL_CODEC, read, what="twin GPU read"),
            await bus.serve(f"{subject}.control", TWIN_GPU_CALL_CODEC, control,
                            what="twin GPU control"))


class RemoteGpu:
    """Client side of `serve_gpu`: the AsyncGpu surface of a GPU in another process. The
    twin's own errors arrive as the same classes (ClockOutOfRangeError, GpuError, ...)."""

    name = "twin"

    def __init__(self, bus: Bus, subject: str, *, timeout_s: float = 2.0,
                 lock_hold_s: float = DEFAULT_LOCK_HOLD_S) -> None:
        self._bus = bus
        self.subject = subject
        self._timeout_s = timeout_s
        self.lock_hold_s: float | None = check_hold(lock_hold_s)

    async def _call(self, call: TwinGpuCall) -> TwinGpuAnswer:
        subject = f"{self.subject}.{'control' if call.op in CONTROL_OPS else 'read'}"
        try:
            return await self._bus.request(subject, call, TWIN_GPU_ANSWER_CODEC,
                                           timeout_s=self._timeout_s)
        except BusError as e:
            raise GpuNotFoundError(f"no twin GPU answers on {subject}: {e}") from e
        except MalformedEventError as e:  # a bad answer is a failed read, never a crash
            raise GpuError(f"twin GPU on {subject} answered badly: {e}") from e

    async def gpu_count(self) -> int:
        return (await self._call(TwinGpuCall(op="count"))).count

    async def read(self, index: int) -> GpuReading:
        reading = (await self._call(TwinGpuCall(op="read", index=index))).reading
        if reading is None:
            raise GpuError(f"twin on {self.subject} returned no reading")
        return reading

    async def supported_clocks_mhz(self, index: int) -> tuple[int, ...]:
        return tuple((await self._call(TwinGpuCall(op="supported", index=index))).clocks_mhz)

    async def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        await self._call(TwinGpuCall(op="set_locked", index=index, min_mhz=min_mhz,
                                     max_mhz=max_mhz,
                                     hold_s=self.lock_hold_s or DEFAULT_LOCK_HOLD_S))

    async def reset_locked_clocks(self, index: int) -> None:
        await self._call(TwinGpuCall(op="reset", index=index))

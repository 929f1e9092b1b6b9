"""Async access to GPUs for services: local NVML through a thread, or a twin GPU over NATS.

The twin GPU lives inside its engine-twin process (that is where iterations draw power);
the telemetry collector and the actuator reach it through the same NVML-shaped calls,
sent as request/reply on `tllm.v1.twin.gpu.<instance>`.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Annotated, Literal, Protocol

import anyio.to_thread
import msgspec
import nats.errors
from nats.aio.msg import Msg

from throttllem._bus import Bus
from throttllem._errors import (
    ClockOutOfRangeError,
    GpuError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
)
from throttllem._gpu.backend import GpuBackend, GpuReading


class AsyncGpu(Protocol):
    """What services use: the GpuBackend calls, awaitable."""

    name: str

    async def gpu_count(self) -> int: ...
    async def read(self, index: int) -> GpuReading: ...
    async def supported_clocks_mhz(self, index: int) -> tuple[int, ...]: ...
    async def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None: ...
    async def reset_locked_clocks(self, index: int) -> None: ...


class ThreadedGpu:
    """A blocking backend (NVML) called from a worker thread so the event loop never stalls."""

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

Op = Literal["count", "read", "supported", "set_locked", "reset"]
# Calls that change the GPU go to `<subject>.control`, reads to `<subject>.read`: subject
# permissions then let a collector read a GPU that only the actuator may lock.
CONTROL_OPS: frozenset[str] = frozenset({"set_locked", "reset"})


GpuIndex = Annotated[int, msgspec.Meta(ge=0, le=65_535)]
Mhz = Annotated[int, msgspec.Meta(ge=0, le=100_000)]


class GpuCall(msgspec.Struct, frozen=True, kw_only=True):
    op: Op
    index: GpuIndex = 0
    min_mhz: Mhz = 0
    max_mhz: Mhz = 0


class GpuReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error: str | None = None
    error_kind: str | None = None
    reading: GpuReading | None = None
    clocks_mhz: list[int] = []
    count: int = 0


_ERROR_KINDS: dict[str, type[GpuError] | type[ClockOutOfRangeError]] = {
    "clock_out_of_range": ClockOutOfRangeError,
    "permission": GpuPermissionError,
    "not_found": GpuNotFoundError,
    "not_supported": GpuNotSupportedError,
    "gpu": GpuError,
}
_KIND_OF = {cls: kind for kind, cls in _ERROR_KINDS.items()}
_call_decoder = msgspec.json.Decoder(GpuCall)
_reply_decoder = msgspec.json.Decoder(GpuReply)


def answer_gpu_call(backend: GpuBackend, data: bytes, *,  # noqa: PLR0911 - one per op
                    control: bool = True) -> GpuReply:
    """Run one encoded call against a local backend; errors become replies, never raise.
    `control=False` (a call that came on the read subject) refuses calls that change clocks."""
    try:
        call = _call_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return GpuReply(ok=False, error=f"bad gpu call: {e}", error_kind="gpu")
    if call.op in CONTROL_OPS and not control:
        return GpuReply(ok=False, error=f"{call.op} is a control call: send it to the "
                        "GPU's .control subject", error_kind="permission")
    try:
        match call.op:
            case "count":
                return GpuReply(ok=True, count=backend.gpu_count())
            case "read":
                return GpuReply(ok=True, reading=backend.read(call.index))
            case "supported":
                return GpuReply(ok=True, clocks_mhz=list(backend.supported_clocks_mhz(call.index)))
            case "set_locked":
                backend.set_locked_clocks(call.index, call.min_mhz, call.max_mhz)
                return GpuReply(ok=True)
            case "reset":
                backend.reset_locked_clocks(call.index)
                return GpuReply(ok=True)
    except (GpuError, ClockOutOfRangeError) as e:
        kind = next((k for cls, k in _KIND_OF.items() if isinstance(e, cls)), "gpu")
        return GpuReply(ok=False, error=str(e), error_kind=kind)


async def serve_gpu(bus: Bus, subject: str, backend: GpuBackend) -> object:
    """Answer NVML-shaped calls for `backend` on `<subject>.read` and `<subject>.control`
    (used by the engine twin). Returns the two subscriptions."""

    async def answer(msg: Msg, *, control: bool) -> None:
        reply = answer_gpu_call(backend, msg.data, control=control)
        with contextlib.suppress(nats.errors.Error, OSError):  # the asker is gone or offline
            await msg.respond(msgspec.json.encode(reply))

    subs = (await bus.nc.subscribe(f"{subject}.read", cb=partial(answer, control=False)),
            await bus.nc.subscribe(f"{subject}.control", cb=partial(answer, control=True)))
    await bus.sync()  # the server knows we answer before anyone is told we are ready
    return subs


class RemoteGpu:
    """Client side of `serve_gpu`: the AsyncGpu surface of a GPU in another process."""

    name = "twin"

    def __init__(self, bus: Bus, subject: str, *, timeout_s: float = 2.0) -> None:
        self._bus = bus
        self.subject = subject
        self._timeout_s = timeout_s

    async def _call(self, call: GpuCall) -> GpuReply:
        subject = f"{self.subject}.{'control' if call.op in CONTROL_OPS else 'read'}"
        try:
            msg = await self._bus.nc.request(subject, msgspec.json.encode(call),
                                             timeout=self._timeout_s)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError) as e:
            raise GpuNotFoundError(f"no twin GPU answers on {subject}: {e!r}") from e
        except nats.errors.Error as e:  # the bus is away (an outage): a failed GPU call
            raise GpuError(f"twin GPU call on {subject} failed: {e!r}") from e
        try:
            reply = _reply_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise GpuError(f"bad reply from the twin GPU on {subject}: {e}") from e
        if not reply.ok:
            raise _ERROR_KINDS.get(reply.error_kind or "gpu", GpuError)(reply.error or "")
        return reply

    async def gpu_count(self) -> int:
        return (await self._call(GpuCall(op="count"))).count

    async def read(self, index: int) -> GpuReading:
        reading = (await self._call(GpuCall(op="read", index=index))).reading
        if reading is None:
            raise GpuError(f"twin on {self.subject} returned no reading")
        return reading

    async def supported_clocks_mhz(self, index: int) -> tuple[int, ...]:
        return tuple((await self._call(GpuCall(op="supported", index=index))).clocks_mhz)

    async def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        await self._call(GpuCall(op="set_locked", index=index, min_mhz=min_mhz, max_mhz=max_mhz))

    async def reset_locked_clocks(self, index: int) -> None:
        await self._call(GpuCall(op="reset", index=index))

"""The real-GPU backend: NVML through nvidia-ml-py (`pynvml`).

Reads power, the total-energy counter, clocks, utilisation and temperature; writes locked
SM clocks. Every NVML error goes through one table (`_NVML_ERRORS`) to a throttLL'eM error
that says what to do, raised `from` the NVML error.

Testing seam: the backend calls NVML only through `lib`, an object with exactly the
functions listed in `NvmlLib` (by default the real `pynvml` module). Tests pass a small
fake that raises the real `pynvml.NVMLError` codes; there is no whole-module mock.

Dry-run (`dry_run=True`): reads are real, clock targets are validated against the GPU's
real supported clocks, but instead of calling an NVML setter the backend logs the exact
call (event "nvml.dry_run") and appends it to `dry_run_calls`. That is how the system runs
on GPUs where it must not, or cannot, change clocks.

Indices are NVML indices (PCI bus order, as `nvidia-smi` numbers GPUs), which ignore
CUDA_VISIBLE_DEVICES (`index_of_uuid` finds the NVML index of a CUDA device by its UUID).
Calls block (NVML is synchronous); services go through a thread.

Single-counter reads (`energy_mj`, `sm_clock_mhz`) are for callers that sample often (the GPU
lab reads both every 20 ms while passes run): one NVML call each instead of a whole `read`.
"""

# ruff: noqa: N802 -- NvmlLib mirrors NVML's camelCase function names on purpose

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from types import TracebackType
from typing import Final, Protocol, TypeVar

import pynvml
import structlog

from throttllem._errors import (
    ClockOutOfRangeError,
    GpuError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
)
from throttllem._gpu.backend import GpuReading

__all__ = ["NvmlBackend", "NvmlLib", "NvmlUtilization", "probe"]

_log = structlog.get_logger("throttllem.nvml")

T = TypeVar("T")


class NvmlUtilization(Protocol):
    """What nvmlDeviceGetUtilizationRates returns: percentages over the last sample period."""

    gpu: int
    memory: int


class NvmlLib(Protocol):
    """The NVML functions NvmlBackend calls, no more; the `pynvml` module satisfies it."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> object: ...
    def nvmlDeviceGetName(self, handle: object, /) -> str | bytes: ...
    def nvmlDeviceGetUUID(self, handle: object, /) -> str | bytes: ...
    def nvmlDeviceGetPowerUsage(self, handle: object, /) -> int: ...
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object, /) -> int: ...
    def nvmlDeviceGetClockInfo(self, handle: object, clock_type: int, /) -> int: ...
    def nvmlDeviceGetUtilizationRates(self, handle: object, /) -> NvmlUtilization: ...
    def nvmlDeviceGetTemperature(self, handle: object, sensor: int, /) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: object, /) -> int: ...
    def nvmlDeviceGetSupportedMemoryClocks(self, handle: object, /) -> list[int]: ...
    def nvmlDeviceGetSupportedGraphicsClocks(
        self, handle: object, memory_clock_mhz: int, /
    ) -> list[int]: ...
    def nvmlDeviceSetGpuLockedClocks(
        self, handle: object, min_gpu_clock_mhz: int, max_gpu_clock_mhz: int, /
    ) -> None: ...
    def nvmlDeviceResetGpuLockedClocks(self, handle: object, /) -> None: ...


_CLOCK_SM: Final[int] = pynvml.NVML_CLOCK_SM
_CLOCK_MEM: Final[int] = pynvml.NVML_CLOCK_MEM
_TEMPERATURE_GPU: Final[int] = pynvml.NVML_TEMPERATURE_GPU

_NO_DRIVER: Final = "no NVIDIA driver: use the twin backend with --gpu twin"
_NEEDS_PRIVILEGE: Final = (
    "setting locked clocks needs root or CAP_SYS_ADMIN on the host; in a container run it "
    "privileged or grant the capability (docker run --cap-add SYS_ADMIN, or Kubernetes "
    "securityContext.capabilities.add: [SYS_ADMIN]); or use --dry-run to log the NVML "
    "calls instead of making them"
)

# One table from NVML error codes to our errors and what to do about them. Codes absent
# here become a plain GpuError carrying NVML's own text.
_NVML_ERRORS: Final[dict[int, tuple[type[GpuError], str]]] = {
    pynvml.NVML_ERROR_NO_PERMISSION: (GpuPermissionError, _NEEDS_PRIVILEGE),
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        GpuNotFoundError,
        f"libnvidia-ml.so.1 could not be loaded; {_NO_DRIVER}",
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (
        GpuNotFoundError,
        f"the NVIDIA kernel driver is not running; {_NO_DRIVER}",
    ),
    pynvml.NVML_ERROR_GPU_NOT_FOUND: (GpuNotFoundError, "NVML found no such GPU"),
    pynvml.NVML_ERROR_NOT_FOUND: (GpuNotFoundError, "NVML found no such GPU or object"),
    pynvml.NVML_ERROR_NOT_SUPPORTED: (
        GpuNotSupportedError,
        "this GPU or driver does not support it (MIG instances, virtual GPUs and older "
        "GPUs lack some counters and clock controls)",
    ),
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: (
        GpuNotSupportedError,
        "the installed driver's NVML lacks this function; update the NVIDIA driver",
    ),
    pynvml.NVML_ERROR_INVALID_ARGUMENT: (
        GpuError,
        "NVML rejected the arguments (clocks are validated first, so the GPU's supported "
        "clocks may have changed, e.g. under MIG)",
    ),
    pynvml.NVML_ERROR_GPU_IS_LOST: (
        GpuError,
        "the GPU fell off the bus or stopped responding; check nvidia-smi and the kernel "
        "log (dmesg); the node needs a GPU reset or a reboot",
    ),
    pynvml.NVML_ERROR_RESET_REQUIRED: (
        GpuError,
        "the GPU needs a reset (nvidia-smi -r) or a reboot",
    ),
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        GpuError,
        "the NVML library and the kernel driver differ in version (driver upgraded without "
        "a reboot?); reboot or reload the driver",
    ),
    pynvml.NVML_ERROR_UNINITIALIZED: (GpuError, "NVML is not initialised"),
    pynvml.NVML_ERROR_INSUFFICIENT_POWER: (GpuError, "check the GPU's power cables"),
}
_NVML_CODE_NAMES: Final[dict[int, str]] = {
    getattr(pynvml, name): name for name in dir(pynvml) if name.startswith("NVML_ERROR_")
}


def _translate(e: pynvml.NVMLError, call: str, index: int | None) -> GpuError:
    code: int = e.value
    error_class, hint = _NVML_ERRORS.get(code, (GpuError, ""))
    where = "" if index is None else f" on GPU {index}"
    name = _NVML_CODE_NAMES.get(code, f"NVML error {code}")
    message = f"{call} failed{where}: {e} ({name})"
    return error_class(f"{message}; {hint}" if hint else message)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe_clocks(clocks_mhz: tuple[int, ...]) -> str:
    steps = {b - a for a, b in pairwise(clocks_mhz)}
    if len(steps) == 1:
        return f"{clocks_mhz[0]}–{clocks_mhz[-1]} MHz in {steps.pop()} MHz steps"
    if not steps:
        return f"only {clocks_mhz[0]} MHz"
    return f"{len(clocks_mhz)} clocks from {clocks_mhz[0]} to {clocks_mhz[-1]} MHz (uneven steps)"


class NvmlBackend:
    """GpuBackend over NVML. Initialises NVML on construction; `close()` shuts it down.

    Closing never resets locked clocks: whoever set them (the actuator, on lease expiry or
    shutdown) decides when to reset, so a restart does not flip a GPU's clock mid-run.
    """

    name: str = "nvml"

    def __init__(self, *, dry_run: bool = False, lib: NvmlLib | None = None) -> None:
        self.dry_run = dry_run
        self.dry_run_calls: list[str] = []
        self._lib: NvmlLib = pynvml if lib is None else lib
        self._handles: dict[int, object] = {}
        self._clocks_mhz: dict[int, tuple[int, ...]] = {}
        self._identity: dict[int, tuple[str, str]] = {}
        self._open = False
        self._call("nvmlInit", None, self._lib.nvmlInit)
        self._open = True

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Shut NVML down (once); locked clocks stay as they are."""
        if not self._open:
            return
        self._open = False
        self._handles.clear()
        self._call("nvmlShutdown", None, self._lib.nvmlShutdown)

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ reads

    def gpu_count(self) -> int:
        self._check_open()
        return int(self._call("nvmlDeviceGetCount", None, self._lib.nvmlDeviceGetCount))

    def driver_version(self) -> str:
        self._check_open()
        lib = self._lib
        return _text(self._call("nvmlSystemGetDriverVersion", None, lib.nvmlSystemGetDriverVersion))

    def read(self, index: int) -> GpuReading:
        """One reading; utilisation and temperature read 0 where the GPU does not report them."""
        handle = self._handle(index)
        lib = self._lib
        power_mw = self._call(
            "nvmlDeviceGetPowerUsage", index, lambda: lib.nvmlDeviceGetPowerUsage(handle)
        )
        energy_mj = self._call(
            "nvmlDeviceGetTotalEnergyConsumption",
            index,
            lambda: lib.nvmlDeviceGetTotalEnergyConsumption(handle),
        )
        sm_clock_mhz = self._call(
            "nvmlDeviceGetClockInfo", index, lambda: lib.nvmlDeviceGetClockInfo(handle, _CLOCK_SM)
        )
        mem_clock_mhz = self._call(
            "nvmlDeviceGetClockInfo", index, lambda: lib.nvmlDeviceGetClockInfo(handle, _CLOCK_MEM)
        )
        utilization = self._optional(
            "nvmlDeviceGetUtilizationRates",
            index,
            lambda: lib.nvmlDeviceGetUtilizationRates(handle),
        )
        temperature_c = self._optional(
            "nvmlDeviceGetTemperature",
            index,
            lambda: lib.nvmlDeviceGetTemperature(handle, _TEMPERATURE_GPU),
        )
        uuid, name = self._device_identity(index, handle)
        return GpuReading(
            power_w=int(power_mw) / 1000.0,
            energy_mj=float(energy_mj),
            sm_clock_mhz=float(sm_clock_mhz),
            mem_clock_mhz=float(mem_clock_mhz),
            gpu_util_pct=0.0 if utilization is None else float(utilization.gpu),
            mem_util_pct=0.0 if utilization is None else float(utilization.memory),
            temperature_c=0.0 if temperature_c is None else float(temperature_c),
            uuid=uuid,
            name=name,
        )

    def energy_mj(self, index: int) -> float:
        """The total-energy counter (mJ since the driver loaded), alone."""
        handle = self._handle(index)
        lib = self._lib
        return float(self._call("nvmlDeviceGetTotalEnergyConsumption", index,
                                lambda: lib.nvmlDeviceGetTotalEnergyConsumption(handle)))

    def sm_clock_mhz(self, index: int) -> float:
        """The SM clock the GPU runs at now, alone."""
        handle = self._handle(index)
        lib = self._lib
        return float(self._call("nvmlDeviceGetClockInfo", index,
                                lambda: lib.nvmlDeviceGetClockInfo(handle, _CLOCK_SM)))

    def power_limit_w(self, index: int) -> float | None:
        """The power limit the driver enforces, or None where the GPU does not report it."""
        handle = self._handle(index)
        lib = self._lib
        limit_mw = self._optional("nvmlDeviceGetEnforcedPowerLimit", index,
                                  lambda: lib.nvmlDeviceGetEnforcedPowerLimit(handle))
        return None if limit_mw is None else int(limit_mw) / 1000.0

    def index_of_uuid(self, uuid: str) -> int:
        """The NVML index of the GPU with this UUID (``GPU-`` prefix and case ignored), e.g.
        a CUDA device's, whose CUDA index may differ under CUDA_VISIBLE_DEVICES."""
        wanted = uuid.strip().lower().removeprefix("gpu-")
        for index in range(self.gpu_count()):
            found, _ = self._device_identity(index, self._handle(index))
            if found.strip().lower().removeprefix("gpu-") == wanted:
                return index
        raise GpuNotFoundError(f"no GPU with UUID {uuid!r}: NVML sees {self.gpu_count()}")

    def supported_clocks_mhz(self, index: int) -> tuple[int, ...]:
        """Supported graphics (SM) clocks at the top memory clock, ascending; cached."""
        cached = self._clocks_mhz.get(index)
        if cached is not None:
            self._check_open()
            return cached
        handle = self._handle(index)
        lib = self._lib
        mem_clocks_mhz = self._call(
            "nvmlDeviceGetSupportedMemoryClocks",
            index,
            lambda: lib.nvmlDeviceGetSupportedMemoryClocks(handle),
        )
        if not mem_clocks_mhz:
            raise GpuNotSupportedError(f"GPU {index} reports no supported memory clocks")
        top_mem_mhz = max(int(c) for c in mem_clocks_mhz)
        sm_clocks_mhz = self._call(
            "nvmlDeviceGetSupportedGraphicsClocks",
            index,
            lambda: lib.nvmlDeviceGetSupportedGraphicsClocks(handle, top_mem_mhz),
        )
        clocks = tuple(sorted({int(c) for c in sm_clocks_mhz}))
        if not clocks:
            raise GpuNotSupportedError(
                f"GPU {index} reports no supported graphics clocks at {top_mem_mhz} MHz memory"
            )
        self._clocks_mhz[index] = clocks
        return clocks

    # ------------------------------------------------------------------ writes

    def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        """Lock the SM clock to [min_mhz, max_mhz]; both must be supported clocks."""
        min_mhz, max_mhz = self._check_clocks(index, min_mhz, max_mhz)
        handle = self._handle(index)
        call = "nvmlDeviceSetGpuLockedClocks"
        if self.dry_run:
            self._record_dry_run(
                index,
                f"{call}(handle=<index {index}>, minGpuClockMHz={min_mhz}, "
                f"maxGpuClockMHz={max_mhz})",
            )
            return
        lib = self._lib
        self._call(call, index, lambda: lib.nvmlDeviceSetGpuLockedClocks(handle, min_mhz, max_mhz))
        _log.debug("nvml.locked_clocks", gpu_index=index, min_mhz=min_mhz, max_mhz=max_mhz)

    def reset_locked_clocks(self, index: int) -> None:
        """Give the SM clock back to the driver's own DVFS."""
        handle = self._handle(index)
        call = "nvmlDeviceResetGpuLockedClocks"
        if self.dry_run:
            self._record_dry_run(index, f"{call}(handle=<index {index}>)")
            return
        lib = self._lib
        self._call(call, index, lambda: lib.nvmlDeviceResetGpuLockedClocks(handle))
        _log.debug("nvml.locked_clocks_reset", gpu_index=index)

    # ------------------------------------------------------------------ internals

    def _call(self, call: str, index: int | None, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except pynvml.NVMLError as e:
            raise _translate(e, call, index) from e

    def _optional(self, call: str, index: int, fn: Callable[[], T]) -> T | None:
        """A read some GPUs do not offer (utilisation on MIG, for one): None if unsupported."""
        try:
            return self._call(call, index, fn)
        except GpuNotSupportedError:
            return None

    def _check_open(self) -> None:
        if not self._open:
            raise GpuError("the NVML backend is closed")

    def _handle(self, index: int) -> object:
        self._check_open()
        handle = self._handles.get(index)
        if handle is not None:
            return handle
        count = self.gpu_count()
        if not 0 <= index < count:
            raise GpuNotFoundError(
                f"no GPU at NVML index {index}: NVML sees {count} GPU(s)"
                + (f", indices 0–{count - 1}" if count else "")
                + " (NVML indices ignore CUDA_VISIBLE_DEVICES)"
            )
        lib = self._lib
        handle = self._call(
            "nvmlDeviceGetHandleByIndex", index, lambda: lib.nvmlDeviceGetHandleByIndex(index)
        )
        self._handles[index] = handle
        return handle

    def _device_identity(self, index: int, handle: object) -> tuple[str, str]:
        identity = self._identity.get(index)
        if identity is None:
            lib = self._lib
            uuid = self._call("nvmlDeviceGetUUID", index, lambda: lib.nvmlDeviceGetUUID(handle))
            name = self._call("nvmlDeviceGetName", index, lambda: lib.nvmlDeviceGetName(handle))
            identity = self._identity[index] = (_text(uuid), _text(name))
        return identity

    def _check_clocks(self, index: int, min_mhz: float, max_mhz: float) -> tuple[int, int]:
        if int(min_mhz) != min_mhz or int(max_mhz) != max_mhz:
            raise ClockOutOfRangeError(
                f"SM clocks are whole MHz, got min_mhz={min_mhz!r}, max_mhz={max_mhz!r}"
            )
        low, high = int(min_mhz), int(max_mhz)
        if low > high:
            raise ClockOutOfRangeError(f"min_mhz {low} is above max_mhz {high}")
        supported = self.supported_clocks_mhz(index)
        for clock_mhz in (low, high):
            if clock_mhz not in supported:
                below = max((c for c in supported if c < clock_mhz), default=None)
                above = min((c for c in supported if c > clock_mhz), default=None)
                nearest = " or ".join(str(c) for c in (below, above) if c is not None)
                raise ClockOutOfRangeError(
                    f"{clock_mhz} MHz is not a supported SM clock of GPU {index}: valid are "
                    f"{_describe_clocks(supported)}; nearest: {nearest} MHz"
                )
        return low, high

    def _record_dry_run(self, index: int, call: str) -> None:
        self.dry_run_calls.append(call)
        _log.info("nvml.dry_run", call=call, gpu_index=index)


def probe(
    index: int = 0, *, dry_run_clock_mhz: int | None = None, lib: NvmlLib | None = None
) -> dict[str, object]:
    """Read everything once from one GPU, to compare with

        nvidia-smi --id=<index> --format=csv \\
            --query-gpu=power.draw,clocks.sm,clocks.mem,utilization.gpu,temperature.gpu

    With `dry_run_clock_mhz`, also validate that clock and record (never make) the calls
    that would lock and reset it. Never changes the GPU.
    """
    with NvmlBackend(dry_run=True, lib=lib) as gpu:
        reading = gpu.read(index)
        clocks_mhz = gpu.supported_clocks_mhz(index)
        result: dict[str, object] = {
            "index": index,
            "gpu_count": gpu.gpu_count(),
            "name": reading.name,
            "uuid": reading.uuid,
            "driver_version": gpu.driver_version(),
            "power_w": reading.power_w,
            "energy_mj": reading.energy_mj,
            "sm_clock_mhz": reading.sm_clock_mhz,
            "mem_clock_mhz": reading.mem_clock_mhz,
            "gpu_util_pct": reading.gpu_util_pct,
            "mem_util_pct": reading.mem_util_pct,
            "temperature_c": reading.temperature_c,
            "supported_clocks_mhz": {
                "count": len(clocks_mhz),
                "min": clocks_mhz[0],
                "max": clocks_mhz[-1],
                "described": _describe_clocks(clocks_mhz),
            },
            "power_limit_w": gpu.power_limit_w(index),
            "nvidia_smi_query": (
                f"nvidia-smi --id={index} --format=csv --query-gpu=power.draw,clocks.sm,"
                "clocks.mem,utilization.gpu,temperature.gpu"
            ),
        }
        if dry_run_clock_mhz is not None:
            gpu.set_locked_clocks(index, dry_run_clock_mhz, dry_run_clock_mhz)
            gpu.reset_locked_clocks(index)
            result["dry_run_calls"] = list(gpu.dry_run_calls)
    return result

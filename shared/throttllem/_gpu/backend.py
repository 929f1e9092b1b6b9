"""The narrow NVML-shaped surface that the telemetry collector and the actuator use.

Both the real NVML backend and the GPU twin implement `GpuBackend` (synchronous, like
NVML itself; services call it through `anyio.to_thread.run_sync`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from throttllem._events import GpuReading

__all__ = ["GpuBackend", "GpuReading"]


@runtime_checkable
class GpuBackend(Protocol):
    """What a GPU must offer throttLL'eM. Indices are NVML device indices."""

    name: str

    def gpu_count(self) -> int: ...

    def read(self, index: int) -> GpuReading: ...

    def supported_clocks_mhz(self, index: int) -> tuple[int, ...]:
        """Supported graphics (SM) clocks, ascending."""
        ...

    def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None: ...

    def reset_locked_clocks(self, index: int) -> None: ...

"""throttLL'eM: predictive SM-clock control that cuts the energy of LLM inference serving
without breaking latency SLOs. The public surface is re-exported here; implementation lives
in private modules."""

from throttllem._errors import (
    BusError,
    ClockOutOfRangeError,
    ConfigError,
    GpuError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
    MalformedEventError,
    ModelError,
    NatsServerNotFoundError,
    RemoteCallError,
    RequestRejectedError,
    ThrottllemError,
    TraceError,
)

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "ClockOutOfRangeError",
    "ConfigError",
    "GpuError",
    "GpuNotFoundError",
    "GpuNotSupportedError",
    "GpuPermissionError",
    "MalformedEventError",
    "ModelError",
    "NatsServerNotFoundError",
    "RemoteCallError",
    "RequestRejectedError",
    "ThrottllemError",
    "TraceError",
    "__version__",
]

"""One errors module: every error throttLL'eM raises derives from ThrottllemError and from
the builtin a caller would naturally catch, so `except ValueError` keeps working."""

from __future__ import annotations


class ThrottllemError(Exception):
    """Base of every throttLL'eM error."""


class ConfigError(ThrottllemError, ValueError):
    """A setting, profile file or command-line option is invalid."""


class MalformedEventError(ThrottllemError, ValueError):
    """A message on the bus could not be decoded as the event its subject promises."""


class ClockOutOfRangeError(ThrottllemError, ValueError):
    """An SM clock that the GPU does not support was requested."""


class BusError(ThrottllemError, ConnectionError):
    """The NATS bus is unreachable or refused an operation."""


class NatsServerNotFoundError(ThrottllemError, FileNotFoundError):
    """No nats-server binary to start an embedded bus with."""


class GpuError(ThrottllemError, RuntimeError):
    """A GPU backend (NVML or the twin) failed."""


class GpuNotFoundError(GpuError, LookupError):
    """No NVIDIA driver, or no GPU at the requested index."""


class GpuPermissionError(GpuError, PermissionError):
    """The GPU backend lacks the privilege for an operation (usually setting clocks)."""


class GpuNotSupportedError(GpuError, NotImplementedError):
    """The GPU or driver does not support an operation."""


class TraceError(ThrottllemError, ValueError):
    """A request trace file is missing, malformed or empty."""


class ModelError(ThrottllemError, RuntimeError):
    """A trained model (ONNX) is missing, corrupt or disagrees with its card."""


class RequestRejectedError(ThrottllemError, ValueError):
    """An engine cannot take a request (already in flight, or it can never fit)."""


class ApiRequestError(ThrottllemError, ValueError):
    """The gateway refuses an HTTP request: carries the HTTP status and OpenAI's error fields
    (`type`, `code`, `param`) so the answer has the shape OpenAI clients parse."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


class RemoteCallError(ThrottllemError, RuntimeError):
    """A request over the bus was answered with a failure of the responder's own (a bug or
    an outage there, not a fault of the request)."""


def error_named(name: str) -> type[ThrottllemError] | None:
    """The throttLL'eM error class called `name`, or None: how an error that crossed the bus
    (an `rpc.error` reply names its class) is raised again as the same kind. Only our own
    classes are ever looked up, never an arbitrary name."""
    pending: list[type[ThrottllemError]] = [ThrottllemError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None

"""The serving twin: a simulated GPU serving an LLM, faithful enough to develop and evaluate
the controller on any laptop. Its time is calibrated on measured H100 iterations; how time and
power change with the SM clock is a stated model (see `clockmodel` and the profile's sources).
Its energy is modelled, never measured."""

from throttllem._errors import RequestRejectedError
from throttllem._twin.engine import (
    EngineTwin,
    IterationOutcome,
    QueuedRequest,
    RunningRequest,
)
from throttllem._twin.gpu import GpuIterationResult, GpuTwin
from throttllem._twin.profile import SetupProfile, available_profiles, load_profile

__all__ = [
    "EngineTwin",
    "GpuIterationResult",
    "GpuTwin",
    "IterationOutcome",
    "QueuedRequest",
    "RequestRejectedError",
    "RunningRequest",
    "SetupProfile",
    "available_profiles",
    "load_profile",
]

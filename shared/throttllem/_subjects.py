"""NATS subjects: one place that names them all (the README's subjects table mirrors this).

Tokens that identify an instance, node or service must be single NATS tokens: no dots,
spaces or wildcards. `token()` checks that, so a bad name fails where it is configured
rather than as a silently unroutable subject.
"""

from __future__ import annotations

import re
from typing import Final

from throttllem._errors import ConfigError

PREFIX: Final = "tllm.v1"

REQUEST_ARRIVED: Final = f"{PREFIX}.request.arrived"
REQUEST_PREDICTED: Final = f"{PREFIX}.request.predicted"
REQUEST_ADMITTED_ALL: Final = f"{PREFIX}.request.admitted.*"
REQUEST_DEFERRED: Final = f"{PREFIX}.request.deferred"
REQUEST_COMPLETED: Final = f"{PREFIX}.request.completed"
REQUEST_ABORTED: Final = f"{PREFIX}.request.aborted"
REQUEST_ALL: Final = f"{PREFIX}.request.>"
PREDICT_RPC: Final = f"{PREFIX}.rpc.predict"

ENERGY_REQUEST: Final = f"{PREFIX}.energy.request"
ENERGY_ALL: Final = f"{PREFIX}.energy.>"
SCALE_TARGET: Final = f"{PREFIX}.scale.target"
SCALE_APPLIED: Final = f"{PREFIX}.scale.applied"

# Dead letters: a durable message whose handler failed `DEAD_LETTER_AFTER` deliveries is moved
# to `dead.<family>` (its family: `request`, `energy`), kept in the stream for an operator.
DEAD_ALL: Final = f"{PREFIX}.dead.>"
DEAD_REQUEST: Final = f"{PREFIX}.dead.request"

# JetStream: requests, completions and energy records are durable so that a restarted service
# (or a billing consumer) loses none.
REQUEST_STREAM: Final = "TLLM_REQUESTS"

_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9_\-]+$")


def token(name: str) -> str:
    """Validate one subject token (instance, node or service name)."""
    if not _TOKEN_RE.fullmatch(name):
        raise ConfigError(
            f"{name!r} cannot be a NATS subject token: use letters, digits, '_' or '-' only"
        )
    return name


def subject_family(subject: str) -> str:
    """The family of a `tllm.v1.<family>.…` subject (`other` outside the prefix)."""
    rest = subject.removeprefix(PREFIX + ".")
    return rest.split(".", 1)[0] if rest != subject else "other"


def dead_letter(subject: str) -> str:
    """Where messages of `subject`'s family go when they keep failing."""
    return f"{PREFIX}.dead.{token(subject_family(subject))}"


def request_admitted(instance: str) -> str:
    """Admissions carry the instance as a subject token so each engine consumes only its own."""
    return f"{PREFIX}.request.admitted.{token(instance)}"


def engine_iteration(instance: str) -> str:
    return f"{PREFIX}.engine.iteration.{token(instance)}"


def gpu_sample(node: str, gpu_index: int) -> str:
    return f"{PREFIX}.gpu.sample.{token(node)}.{int(gpu_index)}"


def freq_target(instance: str) -> str:
    return f"{PREFIX}.freq.target.{token(instance)}"


def freq_applied(instance: str) -> str:
    return f"{PREFIX}.freq.applied.{token(instance)}"


def health(service: str) -> str:
    return f"{PREFIX}.health.{token(service)}"


def twin_gpu(instance: str) -> str:
    """Request/reply surface of a twin GPU (the NVML calls the actuator and collector make):
    reads on `<this>.read`, clock locks and resets on `<this>.control`, so that permissions
    can let the collector read and only the actuator lock."""
    return f"{PREFIX}.twin.gpu.{token(instance)}"


# --------------------------------------------------------------------------- consumers
# Durable JetStream consumer names live here with the subjects they read, so that a service
# and the permissions that let it create its consumers (`throttllem._security`) name them
# alike.


def history_consumer(service: str) -> str:
    """The short-lived consumer with which a service reads the request stream back after a
    restart (`Bus.history`): one fixed name per service, so that permissions can name it."""
    return f"{token(service)}-history"


def engine_admissions_durable(instance: str) -> str:
    """The durable an engine instance reads its admissions through (one per instance, so a
    restarted engine resumes where it stopped)."""
    return f"engine-{token(instance)}"


def engine_aborts_durable(instance: str) -> str:
    """The durable an engine instance reads aborts through."""
    return f"engine-{token(instance)}-aborts"


def forecaster_durable(policy: str) -> str:
    """The durable a forecaster reads its requests through: one per policy (a policy that
    plans reads predictions, the others arrivals), shared by its replicas."""
    return f"forecaster-{token(policy)}"


# The forecaster's consumer of dead-lettered requests (each gets a final deferral).
FORECASTER_DEAD_LETTERS_DURABLE: Final = "forecaster-dead-letters"
# Shared by the length predictor's replicas (a work queue of arrivals).
LENGTH_PREDICTOR_DURABLE: Final = "length-predictor"
# The telemetry collector's consumer of completions (one energy record each).
TELEMETRY_DURABLE: Final = "telemetry"


ENGINE_ITERATION_ALL: Final = f"{PREFIX}.engine.iteration.*"
GPU_SAMPLE_ALL: Final = f"{PREFIX}.gpu.sample.>"
FREQ_TARGET_ALL: Final = f"{PREFIX}.freq.target.*"
FREQ_APPLIED_ALL: Final = f"{PREFIX}.freq.applied.*"
HEALTH_ALL: Final = f"{PREFIX}.health.*"

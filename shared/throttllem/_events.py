"""Events on the bus: msgspec Structs, JSON on the wire, one tagged union per subject family.

Every event is frozen, keyword-only and tagged (`"tag": "request.arrived"` on the wire) and
carries `v`, its schema version, so that `nats sub 'tllm.>'` shows readable, self-describing
JSON and a consumer can tell kinds apart without knowing the subject.

Schema evolution (msgspec's rules, which we follow so that old and new services interoperate
during a rolling upgrade):
- add new fields only at the end, always with a default; old readers ignore unknown fields;
- never rename, retype, reorder or remove a field, and never change a tag;
- a change that cannot follow these rules is a new event version: bump `v` *and* the
  subject prefix (`tllm.v2...`), and run both for a while.

Units are in the names: `_s` seconds (event time, which in simulated runs is trace time, not
wall time), `_ms` milliseconds, `_mhz`, `_w`, `_mj` (millijoules, the NVML energy unit).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Generic, Literal, TypeVar

import msgspec

from throttllem._errors import MalformedEventError

SCHEMA_VERSION: Final = 1


NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="tag"):
    v: int = SCHEMA_VERSION


# --------------------------------------------------------------------------- requests


class RequestArrived(_Event, frozen=True, kw_only=True, tag="request.arrived"):
    """A request reached the gateway (or the trace replayer)."""

    id: Id
    arrival_s: float
    prompt_tokens: PosInt
    max_tokens: PosInt = 4096
    tenant: str = "default"
    slo_class: str = "standard"
    prompt_text: str | None = None
    # Twin only: the trace's true generated length, so the simulated engine knows when the
    # request emits EOS. A real engine never sees this; the controller must never read it.
    true_output_tokens: PosInt | None = None
    # The client's own latency bounds for this request (llm-d's `x-slo-ttft-ms` and
    # `x-slo-tpot-ms` headers), which tighten its SLO class's; None: the class alone.
    ttft_slo_ms: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    tbt_slo_ms: Annotated[float, msgspec.Meta(gt=0.0)] | None = None


class RequestPredicted(_Event, frozen=True, kw_only=True, tag="request.predicted"):
    """The length predictor's view of how many tokens a request will generate."""

    id: Id
    predicted_tokens: NonNegFloat
    upper_tokens: NonNegFloat
    quantile: float = 0.9
    model_version: str
    # True when the prediction came from the oracle (true length plus injected error),
    # which only exists for trace replay.
    oracle: bool = False
    decided_s: float = 0.0
    # The request itself, so that a consumer (the controller) needs no join with arrivals.
    request: RequestArrived | None = None


class RequestAdmitted(_Event, frozen=True, kw_only=True, tag="request.admitted"):
    """The controller placed a request on an engine instance."""

    request: RequestArrived
    instance: str
    decided_s: float
    reason: str = ""
    predicted_tokens: float | None = None
    upper_tokens: float | None = None


class RequestDeferred(_Event, frozen=True, kw_only=True, tag="request.deferred"):
    """The controller could not place a request without breaking an SLO; it stays queued."""

    id: str
    decided_s: float
    reason: str
    retry_after_s: float = 0.0
    # True when no retry will ever succeed (e.g. a prompt longer than the context window).
    final: bool = False


class RequestCompleted(_Event, frozen=True, kw_only=True, tag="request.completed"):
    """An engine finished a request. Latencies are in event time."""

    id: str
    instance: str
    tenant: str = "default"
    slo_class: str = "standard"
    arrival_s: float
    admitted_s: float
    first_token_s: float
    completed_s: float
    prompt_tokens: int
    generated_tokens: int
    ttft_ms: float
    tbt_mean_ms: float
    tbt_max_ms: float
    e2e_ms: float
    preemptions: int = 0
    # Energy the engine attributed to this request (its token share of every iteration it
    # took part in); None where the engine cannot attribute (the collector then does).
    energy_mj: float | None = None


class RequestAborted(_Event, frozen=True, kw_only=True, tag="request.aborted"):
    """A request ended without completing: its client went away, its engine failed, or it
    waited past the gateway's queue timeout. Whoever placed or tracks it forgets it, so that
    nothing stays pinned in the controller's projections."""

    id: Id
    decided_s: float
    # Where it was admitted, if it was ("" while it was still waiting for admission).
    instance: str = ""
    # One of "client-disconnected", "engine-failed", "queue-timeout", "shed".
    cause: str
    reason: str = ""


RequestEvent = (
    RequestArrived | RequestPredicted | RequestAdmitted | RequestDeferred | RequestCompleted
    | RequestAborted
)


# --------------------------------------------------------------------------- engines


class EngineIteration(_Event, frozen=True, kw_only=True, tag="engine.iteration"):
    """One forward pass of an engine instance (prefill of new requests plus one decode step)."""

    instance: str
    seq: int
    start_s: float
    duration_ms: NonNegFloat
    batch_size: NonNegInt
    decode_tokens: NonNegInt
    prefill_tokens: NonNegInt
    kv_blocks_used: NonNegInt
    kv_blocks_total: NonNegInt
    queue_len: NonNegInt
    clock_mhz: NonNegFloat
    energy_mj: float = 0.0
    power_w: float = 0.0
    # Which requests took part and how many tokens each processed, for energy attribution.
    request_ids: list[str] = []
    request_tokens: list[int] = []


EngineEvent = EngineIteration


# --------------------------------------------------------------------------- GPUs


class GpuSample(_Event, frozen=True, kw_only=True, tag="gpu.sample"):
    """A telemetry reading of one GPU. `source` says whether it is measured or simulated."""

    node: str
    gpu_index: int
    uuid: str = ""
    now_s: float
    power_w: NonNegFloat
    energy_mj: NonNegFloat
    sm_clock_mhz: float
    mem_clock_mhz: float
    gpu_util_pct: float = 0.0
    mem_util_pct: float = 0.0
    temperature_c: float = 0.0
    source: str = "nvml"


GpuEvent = GpuSample


class GpuReading(msgspec.Struct, frozen=True, kw_only=True):
    """One read of a GPU's counters (`throttllem._gpu.backend.GpuBackend.read`), as it also
    travels inside `TwinGpuAnswer`. `energy_mj` is the total-energy counter since driver load."""

    power_w: float
    energy_mj: float
    sm_clock_mhz: float
    mem_clock_mhz: float
    gpu_util_pct: float = 0.0
    mem_util_pct: float = 0.0
    temperature_c: float = 0.0
    uuid: str = ""
    name: str = ""


# --------------------------------------------------------------------------- request/reply
# `Bus.request` sends an event and decodes the reply with the reply's codec; `Bus.serve`
# answers with the handler's reply event, or with `RpcError` when the request was malformed or
# the handler failed.


class RpcError(_Event, frozen=True, kw_only=True, tag="rpc.error"):
    """The reply to a request that failed. `kind` names the throttLL'eM error class when the
    failure is one of ours (a bad request, a clock out of range), so that the caller raises
    the same kind; empty for a failure of the responder itself."""

    error: str
    kind: str = ""


TwinGpuOp = Literal["count", "read", "supported", "set_locked", "reset"]


class TwinGpuCall(_Event, frozen=True, kw_only=True, tag="twin.gpu.call"):
    """An NVML-shaped call to the GPU twin inside an engine-twin process (`tllm.v1.twin.gpu.
    <instance>`), from the telemetry collector or the actuator."""

    op: TwinGpuOp
    index: NonNegInt = 0
    min_mhz: int = 0
    max_mhz: int = 0


class TwinGpuAnswer(_Event, frozen=True, kw_only=True, tag="twin.gpu.answer"):
    """The twin GPU's answer to a `TwinGpuCall`: the field its op asks for."""

    reading: GpuReading | None = None
    clocks_mhz: list[int] = []
    count: NonNegInt = 0


# --------------------------------------------------------------------------- energy


class RequestEnergy(_Event, frozen=True, kw_only=True, tag="energy.request"):
    """Energy attributed to one finished request, for billing and energy reports."""

    id: str
    tenant: str
    instance: str
    energy_mj: float
    prompt_tokens: int
    generated_tokens: int
    completed_s: float
    source: str = "twin"


EnergyEvent = RequestEnergy


# --------------------------------------------------------------------------- clocks


class FreqTarget(_Event, frozen=True, kw_only=True, tag="freq.target"):
    """The controller's clock for one instance; `clock_mhz=None` means the GPU's default."""

    instance: str
    clock_mhz: float | None
    lease_s: float = 10.0
    reason: str = ""
    decided_s: float


class FreqApplied(_Event, frozen=True, kw_only=True, tag="freq.applied"):
    """What the actuator actually did (or, in dry-run, would have done)."""

    instance: str
    clock_mhz: float | None
    applied_s: float
    backend: str
    dry_run: bool = False
    error: str | None = None


FreqEvent = FreqTarget | FreqApplied


# --------------------------------------------------------------------------- scaling


class ScaleTarget(_Event, frozen=True, kw_only=True, tag="scale.target"):
    """How many instances of a setup the scaler wants."""

    setup: str
    instances: int
    decided_s: float
    reason: str = ""
    # The instances by phase (their counts add up to `instances`): only `active` ones may
    # take new requests. Empty lists from a scaler that predates these fields.
    warming: list[str] = []
    active: list[str] = []
    draining: list[str] = []


class ScaleApplied(_Event, frozen=True, kw_only=True, tag="scale.applied"):
    setup: str
    instances: int
    applied_s: float
    backend: str


ScaleEvent = ScaleTarget | ScaleApplied


# --------------------------------------------------------------------------- health


class Heartbeat(_Event, frozen=True, kw_only=True, tag="health.heartbeat"):
    """Every service says it is alive, what it runs and what it has counted."""

    service: str
    instance_id: str
    version: str
    now_s: float
    uptime_s: float
    counters: dict[str, int] = {}
    status: str = "ok"
    metrics: dict[str, float] = {}


HealthEvent = Heartbeat

# --------------------------------------------------------------------------- codec

_encoder: Final = msgspec.json.Encoder()

E = TypeVar("E")



def encode(event: msgspec.Struct) -> bytes:
    """Encode any event as JSON bytes."""
    return _encoder.encode(event)


class Codec(Generic[E]):
    """A decoder for one subject family that turns bad payloads into MalformedEventError."""

    def __init__(self, family: str, union: Any) -> None:  # a type or a union of types
        self.family = family
        self._decoder: msgspec.json.Decoder[E] = msgspec.json.Decoder(union)

    def decode(self, data: bytes) -> E:
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise MalformedEventError(f"bad {self.family} event: {e}") from e


REQUEST_CODEC: Final[Codec[RequestEvent]] = Codec("request", RequestEvent)
ENGINE_CODEC: Final[Codec[EngineIteration]] = Codec("engine", EngineIteration)
GPU_CODEC: Final[Codec[GpuSample]] = Codec("gpu", GpuSample)
ENERGY_CODEC: Final[Codec[RequestEnergy]] = Codec("energy", RequestEnergy)
FREQ_CODEC: Final[Codec[FreqEvent]] = Codec("freq", FreqEvent)
SCALE_CODEC: Final[Codec[ScaleEvent]] = Codec("scale", ScaleEvent)
HEALTH_CODEC: Final[Codec[Heartbeat]] = Codec("health", Heartbeat)
# Request/reply: the length predictor's RPC (`tllm.v1.rpc.predict`), the twin GPU's calls.
ARRIVAL_CODEC: Final[Codec[RequestArrived]] = Codec("request", RequestArrived)
PREDICTION_CODEC: Final[Codec[RequestPredicted]] = Codec("request", RequestPredicted)
RPC_ERROR_CODEC: Final[Codec[RpcError]] = Codec("rpc", RpcError)
TWIN_GPU_CALL_CODEC: Final[Codec[TwinGpuCall]] = Codec("twin.gpu", TwinGpuCall)
TWIN_GPU_ANSWER_CODEC: Final[Codec[TwinGpuAnswer]] = Codec("twin.gpu", TwinGpuAnswer)

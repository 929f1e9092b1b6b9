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


# Bounds on every field. Decoding is the single point of rejection: a payload outside them
# is a MalformedEventError, counted and logged by the bus, and never reaches a handler. They
# sit far beyond real traffic and stop what one message could otherwise do: exhaust memory
# (a huge string or list), poison arithmetic (a time of 1e308, a negative energy), or pin a
# GPU's clock for ever (an unbounded lease).
MAX_ITEMS: Final = 65_536          # per list or map: batch members, counters
MAX_PROMPT_CHARS: Final = 4 << 20  # 4 Mi characters, above NATS's default 1 MiB max payload
MAX_TEXT: Final = 4096             # reasons, error messages
MAX_LEASE_S: Final = 60.0          # a clock target lives at most this long without renewal
# A GPU lock ends this long after its locker last renewed it (where the lock lives), so a
# dead actuator leaves no GPU slow for longer; DEFAULT when the locker names none.
MAX_LOCK_HOLD_S: Final = 60.0
DEFAULT_LOCK_HOLD_S: Final = 3.0

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
PosInt = Annotated[int, msgspec.Meta(ge=1, le=2**53)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
PosTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
TokenEstimate = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Name = Annotated[str, msgspec.Meta(max_length=256)]  # instance, tenant, class, node, version
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
PromptText = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
# Event time in seconds (Unix or trace time): finite, within ±31,700 years.
Time = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]
# Latencies are finite but not sign-checked: a small skew between two hosts' clocks must not
# turn a completion (a billing record) into a rejected message.
LatencyMs = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]
DurationMs = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
EnergyMj = Annotated[float, msgspec.Meta(ge=0.0, le=1e18)]
PowerW = Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]
ClockMhz = Annotated[float, msgspec.Meta(ge=0.0, le=100_000.0)]
TargetClockMhz = Annotated[float, msgspec.Meta(gt=0.0, le=100_000.0)]
LeaseS = Annotated[float, msgspec.Meta(gt=0.0, le=MAX_LEASE_S)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
Celsius = Annotated[float, msgspec.Meta(ge=-273.15, le=1000.0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Metric = Annotated[float, msgspec.Meta(ge=-1e18, le=1e18)]
Version = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="tag"):
    v: Version = SCHEMA_VERSION


# --------------------------------------------------------------------------- requests


class RequestArrived(_Event, frozen=True, kw_only=True, tag="request.arrived"):
    """A request reached the gateway (or the trace replayer)."""

    id: Id
    arrival_s: Time
    prompt_tokens: PosTokens
    max_tokens: PosTokens = 4096
    tenant: Name = "default"
    slo_class: Name = "standard"
    prompt_text: PromptText | None = None
    # Twin only: the trace's true generated length, so the simulated engine knows when the
    # request emits EOS. A real engine never sees this; the controller must never read it.
    true_output_tokens: PosTokens | None = None
    # The client's own latency bounds for this request (llm-d's `x-slo-ttft-ms` and
    # `x-slo-tpot-ms` headers), which tighten its SLO class's; None: the class alone.
    ttft_slo_ms: Annotated[float, msgspec.Meta(gt=0.0, le=1e9)] | None = None
    tbt_slo_ms: Annotated[float, msgspec.Meta(gt=0.0, le=1e9)] | None = None


class RequestPredicted(_Event, frozen=True, kw_only=True, tag="request.predicted"):
    """The length predictor's view of how many tokens a request will generate."""

    id: Id
    predicted_tokens: TokenEstimate
    upper_tokens: TokenEstimate
    quantile: Fraction = 0.9
    model_version: Name
    # True when the prediction came from the oracle (true length plus injected error),
    # which only exists for trace replay.
    oracle: bool = False
    decided_s: Time = 0.0
    # The request itself, so that a consumer (the controller) needs no join with arrivals.
    request: RequestArrived | None = None


class RequestAdmitted(_Event, frozen=True, kw_only=True, tag="request.admitted"):
    """The controller placed a request on an engine instance."""

    request: RequestArrived
    instance: Name
    decided_s: Time
    reason: Text = ""
    predicted_tokens: TokenEstimate | None = None
    upper_tokens: TokenEstimate | None = None


class RequestDeferred(_Event, frozen=True, kw_only=True, tag="request.deferred"):
    """The controller could not place a request without breaking an SLO; it stays queued."""

    id: Id
    decided_s: Time
    reason: Text
    retry_after_s: NonNegFloat = 0.0
    # True when no retry will ever succeed (e.g. a prompt longer than the context window).
    final: bool = False


class RequestCompleted(_Event, frozen=True, kw_only=True, tag="request.completed"):
    """An engine finished a request. Latencies are in event time."""

    id: Id
    instance: Name
    tenant: Name = "default"
    slo_class: Name = "standard"
    arrival_s: Time
    admitted_s: Time
    first_token_s: Time
    completed_s: Time
    prompt_tokens: Tokens
    generated_tokens: Tokens
    ttft_ms: LatencyMs
    tbt_mean_ms: LatencyMs
    tbt_max_ms: LatencyMs
    e2e_ms: LatencyMs
    preemptions: NonNegInt = 0
    # Energy the engine attributed to this request (its token share of every iteration it
    # took part in); None where the engine cannot attribute (the collector then does).
    energy_mj: EnergyMj | None = None


class RequestAborted(_Event, frozen=True, kw_only=True, tag="request.aborted"):
    """A request ended without completing: its client went away, its engine failed, or it
    waited past the gateway's queue timeout. Whoever placed or tracks it forgets it, so that
    nothing stays pinned in the controller's projections."""

    id: Id
    decided_s: Time
    # Where it was admitted, if it was ("" while it was still waiting for admission).
    instance: Name = ""
    # One of "client-disconnected", "engine-failed", "queue-timeout", "shed".
    cause: Name
    reason: Text = ""


RequestEvent = (
    RequestArrived | RequestPredicted | RequestAdmitted | RequestDeferred | RequestCompleted
    | RequestAborted
)


# --------------------------------------------------------------------------- engines


class EngineIteration(_Event, frozen=True, kw_only=True, tag="engine.iteration"):
    """One forward pass of an engine instance (prefill of new requests plus one decode step)."""

    instance: Name
    seq: NonNegInt
    start_s: Time
    duration_ms: DurationMs
    batch_size: NonNegInt
    decode_tokens: NonNegInt
    prefill_tokens: NonNegInt
    kv_blocks_used: NonNegInt
    kv_blocks_total: NonNegInt
    queue_len: NonNegInt
    clock_mhz: ClockMhz
    energy_mj: EnergyMj = 0.0
    power_w: PowerW = 0.0
    # Which requests took part and how many tokens each processed, for energy attribution.
    request_ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_ITEMS)] = []
    request_tokens: Annotated[list[Tokens], msgspec.Meta(max_length=MAX_ITEMS)] = []


EngineEvent = EngineIteration


# --------------------------------------------------------------------------- GPUs


class GpuSample(_Event, frozen=True, kw_only=True, tag="gpu.sample"):
    """A telemetry reading of one GPU. `source` says whether it is measured or simulated."""

    node: Name
    gpu_index: Annotated[int, msgspec.Meta(ge=0, le=65_535)]
    uuid: Name = ""
    now_s: Time
    power_w: PowerW
    energy_mj: EnergyMj
    sm_clock_mhz: ClockMhz
    mem_clock_mhz: ClockMhz
    gpu_util_pct: Percent = 0.0
    mem_util_pct: Percent = 0.0
    temperature_c: Celsius = 0.0
    source: Name = "nvml"


GpuEvent = GpuSample


class GpuReading(msgspec.Struct, frozen=True, kw_only=True):
    """One read of a GPU's counters (`throttllem._gpu.backend.GpuBackend.read`), as it also
    travels inside `TwinGpuAnswer`. `energy_mj` is the total-energy counter since driver load."""

    power_w: PowerW
    energy_mj: EnergyMj
    sm_clock_mhz: ClockMhz
    mem_clock_mhz: ClockMhz
    gpu_util_pct: Percent = 0.0
    mem_util_pct: Percent = 0.0
    temperature_c: Celsius = 0.0
    uuid: Name = ""
    name: Name = ""


# --------------------------------------------------------------------------- request/reply
# `Bus.request` sends an event and decodes the reply with the reply's codec; `Bus.serve`
# answers with the handler's reply event, or with `RpcError` when the request was malformed or
# the handler failed.


class RpcError(_Event, frozen=True, kw_only=True, tag="rpc.error"):
    """The reply to a request that failed. `kind` names the throttLL'eM error class when the
    failure is one of ours (a bad request, a clock out of range), so that the caller raises
    the same kind; empty for a failure of the responder itself."""

    error: Text
    kind: Name = ""


TwinGpuOp = Literal["count", "read", "supported", "set_locked", "reset"]


class TwinGpuCall(_Event, frozen=True, kw_only=True, tag="twin.gpu.call"):
    """An NVML-shaped call to the GPU twin inside an engine-twin process (`tllm.v1.twin.gpu.
    <instance>`), from the telemetry collector or the actuator."""

    op: TwinGpuOp
    index: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 0
    min_mhz: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    max_mhz: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    # set_locked: the lock ends unless renewed (sent again) within this many seconds.
    hold_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_LOCK_HOLD_S)] = DEFAULT_LOCK_HOLD_S


class TwinGpuAnswer(_Event, frozen=True, kw_only=True, tag="twin.gpu.answer"):
    """The twin GPU's answer to a `TwinGpuCall`: the field its op asks for."""

    reading: GpuReading | None = None
    clocks_mhz: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=100_000)]],
                          msgspec.Meta(max_length=MAX_ITEMS)] = []
    count: Annotated[int, msgspec.Meta(ge=0, le=65_536)] = 0


# --------------------------------------------------------------------------- energy


class RequestEnergy(_Event, frozen=True, kw_only=True, tag="energy.request"):
    """Energy attributed to one finished request, for billing and energy reports."""

    id: Id
    tenant: Name
    instance: Name
    energy_mj: EnergyMj
    prompt_tokens: Tokens
    generated_tokens: Tokens
    completed_s: Time
    source: Name = "twin"


EnergyEvent = RequestEnergy


# --------------------------------------------------------------------------- clocks


class FreqTarget(_Event, frozen=True, kw_only=True, tag="freq.target"):
    """The controller's clock for one instance; `clock_mhz=None` means the GPU's default.
    The lease is bounded: a target nobody renews within `MAX_LEASE_S` ends."""

    instance: Name
    clock_mhz: TargetClockMhz | None
    lease_s: LeaseS = 10.0
    reason: Text = ""
    decided_s: Time


class FreqApplied(_Event, frozen=True, kw_only=True, tag="freq.applied"):
    """What the actuator actually did (or, in dry-run, would have done)."""

    instance: Name
    clock_mhz: ClockMhz | None
    applied_s: Time
    backend: Name
    dry_run: bool = False
    error: Text | None = None


FreqEvent = FreqTarget | FreqApplied


# --------------------------------------------------------------------------- scaling


class ScaleTarget(_Event, frozen=True, kw_only=True, tag="scale.target"):
    """How many instances of a setup the scaler wants."""

    setup: Name
    instances: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    decided_s: Time
    reason: Text = ""
    # The instances by phase (their counts add up to `instances`): only `active` ones may
    # take new requests. Empty lists from a scaler that predates these fields.
    warming: Annotated[list[Name], msgspec.Meta(max_length=MAX_ITEMS)] = []
    active: Annotated[list[Name], msgspec.Meta(max_length=MAX_ITEMS)] = []
    draining: Annotated[list[Name], msgspec.Meta(max_length=MAX_ITEMS)] = []


class ScaleApplied(_Event, frozen=True, kw_only=True, tag="scale.applied"):
    setup: Name
    instances: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    applied_s: Time
    backend: Name


ScaleEvent = ScaleTarget | ScaleApplied


# --------------------------------------------------------------------------- health


class Heartbeat(_Event, frozen=True, kw_only=True, tag="health.heartbeat"):
    """Every service says it is alive, what it runs and what it has counted."""

    service: Name
    instance_id: Name
    version: Name
    now_s: Time
    uptime_s: NonNegFloat
    counters: Annotated[dict[Name, NonNegInt], msgspec.Meta(max_length=MAX_ITEMS)] = {}
    status: Name = "ok"
    metrics: Annotated[dict[Name, Metric], msgspec.Meta(max_length=MAX_ITEMS)] = {}


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

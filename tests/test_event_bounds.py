"""Every field of every event is bounded, and decoding is where out-of-bounds payloads stop:
each bound is accepted at its limit and rejected just past it (MalformedEventError), and
random bytes or random values in a valid structure never crash a decoder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttllem import MalformedEventError
from throttllem._errors import GpuError
from throttllem._events import (
    ENERGY_CODEC,
    ENGINE_CODEC,
    FREQ_CODEC,
    GPU_CODEC,
    HEALTH_CODEC,
    MAX_LEASE_S,
    REQUEST_CODEC,
    RPC_ERROR_CODEC,
    SCALE_CODEC,
    TWIN_GPU_ANSWER_CODEC,
    TWIN_GPU_CALL_CODEC,
    Codec,
    EngineIteration,
    FreqApplied,
    FreqTarget,
    GpuSample,
    Heartbeat,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEnergy,
    RequestPredicted,
    RpcError,
    ScaleApplied,
    ScaleTarget,
    TwinGpuAnswer,
    TwinGpuCall,
    encode,
)
from throttllem._gpu.backend import GpuReading
from throttllem._gpu.remote import CONTROL_OPS, answer_gpu_call

ARRIVED = RequestArrived(id="r1", arrival_s=1.0, prompt_tokens=10, prompt_text="hi",
                         true_output_tokens=5)
# One valid event of every kind, with its codec: the bases the bounds are probed from.
SAMPLES: list[tuple[Codec[Any], msgspec.Struct]] = [
    (REQUEST_CODEC, ARRIVED),
    (REQUEST_CODEC, RequestPredicted(id="r1", predicted_tokens=5.0, upper_tokens=9.0,
                                     model_version="m", decided_s=1.0, request=ARRIVED)),
    (REQUEST_CODEC, RequestAdmitted(request=ARRIVED, instance="i0", decided_s=1.0, reason="x",
                                    predicted_tokens=5.0, upper_tokens=9.0)),
    (REQUEST_CODEC, RequestDeferred(id="r1", decided_s=1.0, reason="busy", retry_after_s=1.0)),
    (REQUEST_CODEC, RequestCompleted(id="r1", instance="i0", arrival_s=1.0, admitted_s=1.1,
                                     first_token_s=1.2, completed_s=2.0, prompt_tokens=10,
                                     generated_tokens=5, ttft_ms=200.0, tbt_mean_ms=20.0,
                                     tbt_max_ms=30.0, e2e_ms=1000.0, preemptions=1,
                                     energy_mj=5.0)),
    (REQUEST_CODEC, RequestAborted(id="r1", decided_s=1.0, instance="i0", cause="shed",
                                   reason="x")),
    (ENGINE_CODEC, EngineIteration(instance="i0", seq=1, start_s=1.0, duration_ms=10.0,
                                   batch_size=2, decode_tokens=2, prefill_tokens=10,
                                   kv_blocks_used=3, kv_blocks_total=100, queue_len=0,
                                   clock_mhz=1980.0, energy_mj=1.0, power_w=300.0,
                                   request_ids=["r1", "r2"], request_tokens=[1, 1])),
    (GPU_CODEC, GpuSample(node="n", gpu_index=0, uuid="u", now_s=1.0, power_w=300.0,
                          energy_mj=1e6, sm_clock_mhz=1980.0, mem_clock_mhz=2619.0,
                          gpu_util_pct=50.0, mem_util_pct=20.0, temperature_c=50.0)),
    (ENERGY_CODEC, RequestEnergy(id="r1", tenant="t", instance="i0", energy_mj=5.0,
                                 prompt_tokens=10, generated_tokens=5, completed_s=2.0)),
    (FREQ_CODEC, FreqTarget(instance="i0", clock_mhz=1200.0, lease_s=3.0, reason="x",
                            decided_s=1.0)),
    (FREQ_CODEC, FreqApplied(instance="i0", clock_mhz=1200.0, applied_s=1.0, backend="twin",
                             error="x")),
    (SCALE_CODEC, ScaleTarget(setup="s", instances=2, decided_s=1.0, reason="x")),
    (SCALE_CODEC, ScaleApplied(setup="s", instances=2, applied_s=1.0, backend="podman")),
    (HEALTH_CODEC, Heartbeat(service="s", instance_id="i", version="1", now_s=1.0,
                             uptime_s=1.0, counters={"a": 1}, metrics={"m": 1.0})),
    (TWIN_GPU_CALL_CODEC, TwinGpuCall(op="set_locked", index=1, min_mhz=1200, max_mhz=1200)),
    (TWIN_GPU_ANSWER_CODEC, TwinGpuAnswer(clocks_mhz=[1980, 1965], count=1)),
    (RPC_ERROR_CODEC, RpcError(error="x", kind="ConfigError")),
]
CODECS = [REQUEST_CODEC, ENGINE_CODEC, GPU_CODEC, ENERGY_CODEC, FREQ_CODEC, SCALE_CODEC,
          HEALTH_CODEC, TWIN_GPU_CALL_CODEC, TWIN_GPU_ANSWER_CODEC, RPC_ERROR_CODEC]


def _constrained(t: msgspec.inspect.Type) -> msgspec.inspect.Type | None:
    """The constrained type inside a field's type (through `X | None`), if any."""
    if isinstance(t, msgspec.inspect.UnionType):
        for member in t.types:
            if not isinstance(member, msgspec.inspect.NoneType):
                return _constrained(member)
        return None
    return t


def _probes(t: msgspec.inspect.Type) -> Iterator[tuple[str, Any, bool]]:
    """(what, value, accepted) at and just past each bound of one field type."""
    if isinstance(t, msgspec.inspect.StrType):
        if t.max_length is not None:
            yield "max_length", "x" * t.max_length, True
            yield "max_length+1", "x" * (t.max_length + 1), False
        if t.min_length:
            yield "min_length-1", "x" * (t.min_length - 1), False
    elif isinstance(t, msgspec.inspect.FloatType | msgspec.inspect.IntType):
        is_int = isinstance(t, msgspec.inspect.IntType)
        step = 1 if is_int else 1e-3
        for bound, sign, inclusive in ((t.ge, -1, True), (t.gt, -1, False),
                                       (t.le, +1, True), (t.lt, +1, False)):
            if bound is None:
                continue
            if inclusive:
                yield f"at {bound}", bound, True
            beyond = bound + sign * max(step, abs(bound) * 1e-9 if not is_int else 0)
            yield f"beyond {bound}", int(beyond) if is_int else beyond, False
        if not is_int:
            yield "1.7e308", 1.7e308, False
            yield "-1.7e308", -1.7e308, False
    elif isinstance(t, msgspec.inspect.ListType):
        assert t.max_length is not None, "every list is bounded"
        item = _valid_item(t.item_type)
        yield "max_length", [item] * t.max_length, True
        yield "max_length+1", [item] * (t.max_length + 1), False
    elif isinstance(t, msgspec.inspect.DictType):
        assert t.max_length is not None, "every map is bounded"
        value = _valid_item(t.value_type)
        yield "max_length+1", {f"k{n}": value for n in range(t.max_length + 1)}, False


def _valid_item(t: msgspec.inspect.Type) -> Any:
    if isinstance(t, msgspec.inspect.StrType):
        return "x"
    if isinstance(t, msgspec.inspect.IntType):
        return 1
    return 1.0


def _bound_cases() -> Iterator[Any]:
    for codec, sample in SAMPLES:
        info = msgspec.inspect.type_info(type(sample))
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            t = _constrained(field.type)
            if t is None or isinstance(t, msgspec.inspect.StructType):
                continue
            for what, value, accepted in _probes(t):
                yield pytest.param(codec, sample, field.encode_name, value, accepted,
                                   id=f"{type(sample).__name__}.{field.name}:{what}")


def test_every_string_list_and_number_is_bounded() -> None:
    unbounded = []
    for _, sample in SAMPLES:
        info = msgspec.inspect.type_info(type(sample))
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            t = _constrained(field.type)
            if isinstance(t, msgspec.inspect.StrType) and t.max_length is None:
                unbounded.append(field.name)
            if isinstance(t, msgspec.inspect.FloatType | msgspec.inspect.IntType) and (
                    (t.le is None and t.lt is None) or (t.ge is None and t.gt is None)):
                unbounded.append(field.name)
            if isinstance(t, msgspec.inspect.ListType | msgspec.inspect.DictType) and \
                    t.max_length is None:
                unbounded.append(field.name)
    assert unbounded == []


@pytest.mark.parametrize(("codec", "sample", "field", "value", "accepted"), list(_bound_cases()))
def test_each_bound_is_accepted_at_its_limit_and_rejected_past_it(
        codec: Codec[Any], sample: msgspec.Struct, field: str, value: Any,
        accepted: bool) -> None:
    wire = msgspec.to_builtins(sample)
    wire[field] = value
    data = msgspec.json.encode(wire)
    if accepted:
        decoded = codec.decode(data)
        assert msgspec.to_builtins(decoded)[field] == value
    else:
        with pytest.raises(MalformedEventError):
            codec.decode(data)


def test_a_lease_longer_than_the_limit_is_refused() -> None:
    target = msgspec.to_builtins(FreqTarget(instance="i0", clock_mhz=345.0, decided_s=0.0))
    for lease in (1e308, 3600.0, MAX_LEASE_S * 2, 0.0, -1.0):
        target["lease_s"] = lease
        with pytest.raises(MalformedEventError, match="lease_s"):
            FREQ_CODEC.decode(msgspec.json.encode(target))


def test_negative_energies_are_refused() -> None:
    completed = msgspec.to_builtins(SAMPLES[4][1])
    completed["energy_mj"] = -5.0
    with pytest.raises(MalformedEventError, match="energy_mj"):
        REQUEST_CODEC.decode(msgspec.json.encode(completed))
    record = msgspec.to_builtins(SAMPLES[8][1])
    record["energy_mj"] = -1.0
    with pytest.raises(MalformedEventError, match="energy_mj"):
        ENERGY_CODEC.decode(msgspec.json.encode(record))


# --------------------------------------------------------------------------- fuzz

JSON_LEAF = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=300)
             | st.sampled_from(["", "x" * 257, "x" * 5000]))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                          max_leaves=20)


def _check_decoded(value: Any) -> None:
    """What decodes is within bounds: every float finite (checked recursively)."""
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for v in value.values():
            _check_decoded(v)
    elif isinstance(value, list):
        for v in value:
            _check_decoded(v)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_crash_a_decoder(data: bytes) -> None:
    for codec in CODECS:
        try:
            event = codec.decode(data)
        except MalformedEventError:
            continue
        _check_decoded(msgspec.to_builtins(event))


@settings(max_examples=400, deadline=None)
@given(which=st.integers(min_value=0, max_value=len(SAMPLES) - 1),
       changes=st.dictionaries(st.integers(min_value=0, max_value=40), JSON_VALUE, max_size=4))
def test_random_values_in_a_valid_structure_decode_in_bounds_or_are_rejected(
        which: int, changes: dict[int, Any]) -> None:
    codec, sample = SAMPLES[which]
    wire = msgspec.to_builtins(sample)
    keys = [k for k in wire if k != "tag"]
    for position, value in changes.items():
        wire[keys[position % len(keys)]] = value
    data = msgspec.json.encode(wire)
    try:
        event = codec.decode(data)
    except MalformedEventError:
        return
    _check_decoded(msgspec.to_builtins(event))
    assert codec.decode(encode(event)) == event  # what decodes also round-trips


@settings(max_examples=200, deadline=None)
@given(call=st.fixed_dictionaries({}, optional={
    "op": st.sampled_from(["count", "read", "supported", "set_locked", "reset", "rm -rf"]),
    "index": JSON_VALUE, "min_mhz": JSON_VALUE, "max_mhz": JSON_VALUE}))
def test_random_gpu_calls_are_rejected_or_answered_or_fail_as_gpu_errors(
        call: dict[str, Any]) -> None:
    """What reaches a twin GPU is a decoded, bounded call; the backend's own failures are
    GpuErrors, which `Bus.serve` answers as `rpc.error` naming their class."""
    try:
        decoded = TWIN_GPU_CALL_CODEC.decode(msgspec.json.encode({"tag": "twin.gpu.call",
                                                                   **call}))
    except MalformedEventError:
        return
    if decoded.op in CONTROL_OPS:  # the GPU without GPUs refuses them loudly (below)
        return
    try:
        answer = answer_gpu_call(_NoGpu(), decoded)
    except GpuError:
        return
    assert isinstance(answer, TwinGpuAnswer)


class _NoGpu:
    """A backend without GPUs: every call that reaches it is an error reply."""

    name = "none"

    def gpu_count(self) -> int:
        return 0

    def read(self, index: int) -> GpuReading:
        from throttllem import GpuNotFoundError  # noqa: PLC0415

        raise GpuNotFoundError(f"no GPU {index}")

    def supported_clocks_mhz(self, index: int) -> tuple[int, ...]:
        return ()

    def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        raise AssertionError("a clock lock arrived on the read subject")

    def reset_locked_clocks(self, index: int) -> None:
        raise AssertionError("a reset arrived on the read subject")


def test_a_gpu_call_out_of_bounds_is_refused() -> None:
    for call in ({"op": "read", "index": -1}, {"op": "read", "index": 2**40},
                 {"op": "set_locked", "min_mhz": 10**9}):
        with pytest.raises(MalformedEventError, match=r"bad twin\.gpu event"):
            TWIN_GPU_CALL_CODEC.decode(msgspec.json.encode({"tag": "twin.gpu.call", **call}))
    assert TWIN_GPU_CALL_CODEC.decode(msgspec.json.encode(
        {"tag": "twin.gpu.call", "op": "count"})) == TwinGpuCall(op="count")

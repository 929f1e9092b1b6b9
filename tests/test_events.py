"""Event schemas: round trips, tags on the wire, rejection of bad payloads."""

from __future__ import annotations

import msgspec
import pytest

from throttllem import MalformedEventError
from throttllem._events import (
    ENGINE_CODEC,
    FREQ_CODEC,
    REQUEST_CODEC,
    SCHEMA_VERSION,
    EngineIteration,
    FreqTarget,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    encode,
)

ARRIVED = RequestArrived(id="r1", arrival_s=1.5, prompt_tokens=100, max_tokens=256,
                         tenant="t", prompt_text="hello", true_output_tokens=42)


def test_request_family_round_trips_every_kind() -> None:
    events = [
        ARRIVED,
        RequestAdmitted(request=ARRIVED, instance="i0", decided_s=2.0, reason="x"),
        RequestCompleted(id="r1", instance="i0", arrival_s=1.5, admitted_s=2.0,
                         first_token_s=2.1, completed_s=3.0, prompt_tokens=100,
                         generated_tokens=42, ttft_ms=600, tbt_mean_ms=20, tbt_max_ms=30,
                         e2e_ms=1500, energy_mj=12.5),
    ]
    for event in events:
        assert REQUEST_CODEC.decode(encode(event)) == event


def test_wire_format_is_tagged_versioned_json() -> None:
    wire = msgspec.json.decode(encode(ARRIVED))
    assert wire["tag"] == "request.arrived"
    assert wire["v"] == SCHEMA_VERSION
    assert wire["prompt_tokens"] == 100


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    wire = msgspec.json.decode(encode(ARRIVED))
    wire["added_in_a_later_version"] = {"x": 1}
    assert REQUEST_CODEC.decode(msgspec.json.encode(wire)) == ARRIVED


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"{}",  # no tag
        b'{"tag": "request.exploded", "id": "x"}',  # unknown tag
        b'{"tag": "request.arrived", "id": "x", "arrival_s": 1}',  # missing prompt_tokens
        b'{"tag": "request.arrived", "id": "x", "arrival_s": 1, "prompt_tokens": 0}',
        b'{"tag": "request.arrived", "id": "", "arrival_s": 1, "prompt_tokens": 3}',
        b'{"tag": "request.arrived", "id": "x", "arrival_s": "soon", "prompt_tokens": 3}',
    ],
)
def test_bad_payloads_raise_malformed_event(payload: bytes) -> None:
    with pytest.raises(MalformedEventError, match="bad request event"):
        REQUEST_CODEC.decode(payload)


def test_malformed_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the builtin is the point
        ENGINE_CODEC.decode(b'{"tag": "engine.iteration"}')


def test_engine_iteration_rejects_negative_counts() -> None:
    it = EngineIteration(instance="i0", seq=1, start_s=0.0, duration_ms=10.0, batch_size=2,
                         decode_tokens=2, prefill_tokens=0, kv_blocks_used=3,
                         kv_blocks_total=10, queue_len=0, clock_mhz=1980.0,
                         request_ids=["a", "b"], request_tokens=[1, 1])
    assert ENGINE_CODEC.decode(encode(it)) == it
    bad = msgspec.json.decode(encode(it))
    bad["batch_size"] = -1
    with pytest.raises(MalformedEventError):
        ENGINE_CODEC.decode(msgspec.json.encode(bad))


def test_freq_target_none_means_default_clock() -> None:
    target = FreqTarget(instance="i0", clock_mhz=None, decided_s=1.0)
    decoded = FREQ_CODEC.decode(encode(target))
    assert isinstance(decoded, FreqTarget)
    assert decoded.clock_mhz is None

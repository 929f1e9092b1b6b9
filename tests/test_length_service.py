"""The length-predictor service over a real nats-server with the real ONNX model."""

from __future__ import annotations

from functools import partial

import anyio
import msgspec
import pytest

from throttllem import ConfigError
from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import (
    REQUEST_CODEC,
    RequestArrived,
    RequestCompleted,
    RequestEvent,
    RequestPredicted,
    encode,
)
from throttllem._runtime import REAL_TIME
from throttllem._services.length_predictor import LengthPredictorService, parse_oracle
from throttllem._subjects import PREDICT_RPC, REQUEST_ARRIVED, REQUEST_COMPLETED, REQUEST_PREDICTED

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PROMPTS = [
    "Write a detailed, multi-section essay on the history of the Roman Empire.",
    "What is 2+2?",
    "Give me a haiku about autumn.",
    "Explain step by step how a transformer language model generates text, with examples.",
]


def arrival(n: int, *, text: str | None = None, true_tokens: int | None = None) -> RequestArrived:
    return RequestArrived(id=f"r{n}", arrival_s=float(n), prompt_tokens=20 + n,
                          prompt_text=text, true_output_tokens=true_tokens)


async def collect_predictions(url: str, services: list[LengthPredictorService],
                              requests: list[RequestArrived]) -> list[RequestPredicted]:
    got: list[RequestPredicted] = []
    client = await Bus.connect(url, name="client")
    await client.ensure_request_stream()
    buses = []

    async def on_predicted(event: RequestEvent) -> None:
        assert isinstance(event, RequestPredicted)
        got.append(event)

    async with anyio.create_task_group() as tg:
        for service in services:
            bus = await Bus.connect(url, name="predictor")
            buses.append(bus)
            await tg.start(service.run, bus, REAL_TIME)
        await tg.start(partial(client.consume, durable="audit", subject=REQUEST_PREDICTED,
                               codec=REQUEST_CODEC, handler=on_predicted))
        for request in requests:
            await client.publish_durable(REQUEST_ARRIVED, request, msg_id=request.id)
        with anyio.fail_after(30):
            while len(got) < len(requests):
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # any duplicate would show up by now
        tg.cancel_scope.cancel()
    for bus in [*buses, client]:
        await bus.close()
    return got


async def test_predicts_every_arrival_with_the_onnx_model(nats: EmbeddedNatsServer) -> None:
    service = LengthPredictorService()
    requests = [arrival(n, text=PROMPTS[n % len(PROMPTS)]) for n in range(40)]
    got = await collect_predictions(nats.url, [service], requests)
    assert sorted(p.id for p in got) == sorted(r.id for r in requests)
    for p in got:
        assert 1.0 <= p.predicted_tokens <= p.upper_tokens
        assert p.model_version == service.model_version
        assert not p.oracle
        assert p.request is not None
        assert p.request.id == p.id
    by_id = {p.id: p for p in got}
    # The model reads the text: an essay request is predicted longer than "2+2".
    assert by_id["r0"].predicted_tokens > by_id["r1"].predicted_tokens


async def test_replicas_share_the_work_and_predict_each_request_once(
        nats: EmbeddedNatsServer) -> None:
    services = [LengthPredictorService(oracle=0.0), LengthPredictorService(oracle=0.0)]
    requests = [arrival(n, true_tokens=10 + n) for n in range(300)]
    got = await collect_predictions(nats.url, services, requests)
    assert len(got) == 300
    assert len({p.id for p in got}) == 300
    assert all(s.batcher.items > 0 for s in services), "both replicas took requests"


async def test_oracle_error_levels_are_labelled_and_bounded(nats: EmbeddedNatsServer) -> None:
    service = LengthPredictorService(oracle=0.15, seed=3)
    requests = [arrival(n, true_tokens=100 + n) for n in range(50)]
    got = await collect_predictions(nats.url, [service], requests)
    truth = {r.id: r.true_output_tokens or 0 for r in requests}
    assert {p.model_version for p in got} == {"oracle-15pct"}
    assert all(p.oracle for p in got)
    errors = [p.predicted_tokens / truth[p.id] - 1 for p in got]
    assert max(abs(e) for e in errors) <= 0.15 + 1e-9
    assert max(abs(e) for e in errors) > 0.05  # errors were actually injected


async def test_rpc_answers_inline_and_rejects_bad_payloads(nats: EmbeddedNatsServer) -> None:
    service = LengthPredictorService()
    bus = await Bus.connect(nats.url, name="predictor")
    client = await Bus.connect(nats.url, name="gateway")
    async with anyio.create_task_group() as tg:
        await tg.start(service.run, bus, REAL_TIME)
        replies = []
        for n in range(20):
            msg = await client.nc.request(PREDICT_RPC, encode(arrival(n, text=PROMPTS[n % 4])),
                                          timeout=5)
            replies.append(REQUEST_CODEC.decode(msg.data))
        bad = await client.nc.request(PREDICT_RPC, b'{"tag":"request.arrived","id":""}',
                                      timeout=5)
        tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    assert all(isinstance(r, RequestPredicted) for r in replies)
    error = msgspec.json.decode(bad.data)
    assert error["tag"] == "rpc.error"
    assert "bad request event" in error["error"]
    assert bus.counters["rpc_rejected"] == 1


async def test_feedback_tracks_error_and_coverage(nats: EmbeddedNatsServer) -> None:
    service = LengthPredictorService(oracle=0.3, seed=1)
    requests = [arrival(n, true_tokens=200) for n in range(60)]
    bus = await Bus.connect(nats.url, name="predictor")
    client = await Bus.connect(nats.url, name="engine")
    await client.ensure_request_stream()
    async with anyio.create_task_group() as tg:
        await tg.start(service.run, bus, REAL_TIME)
        for r in requests:
            await client.publish_durable(REQUEST_ARRIVED, r, msg_id=r.id)
        with anyio.fail_after(20):
            while service.batcher.items < len(requests):
                await anyio.sleep(0.02)
        for r in requests:
            await client.publish(REQUEST_COMPLETED, RequestCompleted(
                id=r.id, instance="i0", arrival_s=0, admitted_s=0, first_token_s=0.1,
                completed_s=1, prompt_tokens=r.prompt_tokens, generated_tokens=200, ttft_ms=100,
                tbt_mean_ms=5, tbt_max_ms=6, e2e_ms=1000))
        with anyio.fail_after(10):
            while service.feedback.stats().count < len(requests):
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    metrics = service.health_metrics()
    assert metrics["feedback_count"] == 60
    assert 0 < metrics["mae_tokens"] <= 0.3 * 200
    # The oracle's upper bound is its 90% quantile: coverage near 0.9 (60 samples).
    assert abs(metrics["upper_coverage"] - 0.9) < 0.15
    assert metrics["within25"] < 1.0


def test_oracle_option_parsing() -> None:
    assert parse_oracle("0.15") == pytest.approx(0.15)
    assert parse_oracle("30%") == pytest.approx(0.30)
    assert parse_oracle("measured") == "measured"
    with pytest.raises(ConfigError, match="relative error"):
        parse_oracle("lots")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        parse_oracle("1.5")

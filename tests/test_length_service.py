"""The length-predictor service over a real nats-server with the real ONNX model."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import anyio
import msgspec
import pytest

from throttllem import ConfigError
from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import (
    HEALTH_CODEC,
    REQUEST_CODEC,
    Heartbeat,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
    RequestPredicted,
    encode,
)
from throttllem._length.oracle import OraclePredictor
from throttllem._length.runtime import read_metrics
from throttllem._runtime import REAL_TIME, run_service
from throttllem._services.length_predictor import LengthPredictorService, parse_oracle
from throttllem._subjects import (
    PREDICT_RPC,
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    REQUEST_PREDICTED,
    health,
)
from throttllem.testing import capture_logs

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
            await client.publish(REQUEST_COMPLETED, completed(r, 200))
        with anyio.fail_after(10):
            while service.feedback.stats().count < len(requests):
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    metrics = service.health_metrics()
    expected = expected_feedback(OraclePredictor(0.3, seed=1), requests, truth=200)
    assert metrics["feedback_count"] == 60
    # The oracle's noise is a pure function of (seed, request id): the figures are exact.
    assert metrics["mae_tokens"] == pytest.approx(expected["mae_tokens"])
    assert metrics["within25"] == pytest.approx(expected["within25"])
    assert metrics["upper_coverage"] == pytest.approx(expected["upper_coverage"])
    # ... and they are the oracle's own figures: uniform ±30% error has mean |e| 15% (±3.6%
    # at 60 samples), 5/6 of it lies within ±25%, and the upper quantile covers 90%.
    assert metrics["mae_tokens"] == pytest.approx(0.15 * 200, abs=3 * 0.3 / math.sqrt(12 * 60)
                                                  * 200)
    assert 0.6 < metrics["within25"] < 1.0
    assert 0.75 < metrics["upper_coverage"] < 1.0
    assert metrics["drifting"] == 0.0  # oracle mode has no model card figure to drift from


def expected_feedback(oracle: OraclePredictor, requests: list[RequestArrived], *,
                      truth: int) -> dict[str, float]:
    """What the online feedback must report for these requests when each generated `truth`."""
    median, upper = oracle.predict([truth] * len(requests), keys=[r.id for r in requests])
    errors = abs(median - truth)
    return {"mae_tokens": float(errors.mean()),
            "within25": float((errors <= 0.25 * truth).mean()),
            "upper_coverage": float((upper >= truth).mean())}


def completed(request: RequestArrived, generated_tokens: int) -> RequestCompleted:
    return RequestCompleted(
        id=request.id, instance="i0", arrival_s=0, admitted_s=0, first_token_s=0.1,
        completed_s=1, prompt_tokens=request.prompt_tokens, generated_tokens=generated_tokens,
        ttft_ms=100, tbt_mean_ms=5, tbt_max_ms=6, e2e_ms=1000)


async def request_all(client: Bus, payloads: list[bytes]) -> list[Any]:
    """Send every RPC at once (each from its own task); the decoded replies, in order."""
    replies: list[Any] = [None] * len(payloads)

    async def one(n: int) -> None:
        msg = await client.nc.request(PREDICT_RPC, payloads[n], timeout=10)
        replies[n] = msgspec.json.decode(msg.data)

    async with anyio.create_task_group() as tg:
        for n in range(len(payloads)):
            tg.start_soon(one, n)
    return replies


async def serve_and_request(nats: EmbeddedNatsServer, service: LengthPredictorService,
                            payloads: list[bytes]) -> tuple[list[Any], dict[str, int]]:
    """Run the service, send every RPC at once; the replies in order, and the service bus's
    counters."""
    bus = await Bus.connect(nats.url, name="predictor")
    client = await Bus.connect(nats.url, name="gateway")
    async with anyio.create_task_group() as tg:
        await tg.start(service.run, bus, REAL_TIME)
        replies = await request_all(client, payloads)
        tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    return replies, dict(bus.counters)


class RecordingPredictor(LengthPredictorService):
    """Remembers the ids of every batch it predicted."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_ids: list[list[str]] = []

    def predict_batch(self, requests: list[RequestArrived]
                      ) -> list[RequestPredicted | Exception]:
        self.batch_ids.append([r.id for r in requests])
        return super().predict_batch(requests)


async def test_a_request_the_oracle_cannot_serve_is_rejected_alone(
        nats: EmbeddedNatsServer) -> None:
    """Oracle mode, one arrival without a true length in a backlog: it is rejected once (final
    deferral, logged, counted, never redelivered); the others of its batch are predicted."""
    requests = [arrival(n, true_tokens=None if n == 7 else 50 + n) for n in range(30)]
    client = await Bus.connect(nats.url, name="replayer")
    await client.ensure_request_stream()
    predicted: list[RequestPredicted] = []
    deferred: list[RequestDeferred] = []

    async def on_event(event: RequestEvent) -> None:
        if isinstance(event, RequestPredicted):
            predicted.append(event)
        elif isinstance(event, RequestDeferred):
            deferred.append(event)

    await client.subscribe(REQUEST_PREDICTED, REQUEST_CODEC, on_event)
    await client.subscribe(REQUEST_DEFERRED, REQUEST_CODEC, on_event)
    # A first run creates the durable consumer; the arrivals wait while no predictor runs, so
    # that the restarted one fetches them in one go and batches them together.
    first = await Bus.connect(nats.url, name="predictor-1")
    async with anyio.create_task_group() as tg:
        await tg.start(LengthPredictorService(oracle=0.0).run, first, REAL_TIME)
        tg.cancel_scope.cancel()
    await first.close()
    for r in requests:
        await client.publish_durable(REQUEST_ARRIVED, r, msg_id=r.id)
    service = RecordingPredictor(oracle=0.0)
    bus = await Bus.connect(nats.url, name="predictor-2")
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run, bus, REAL_TIME)
            with anyio.fail_after(20):
                while len(predicted) < 29 or not deferred:
                    await anyio.sleep(0.01)
            await anyio.sleep(1.5)  # a nak'ed message (1 s delay) would be back by now
            info = await client.js.consumer_info("TLLM_REQUESTS", "length-predictor")
            tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    assert any("r7" in ids and len(ids) > 1 for ids in service.batch_ids), service.batch_ids
    assert sorted(p.id for p in predicted) == sorted(r.id for r in requests if r.id != "r7")
    assert [(d.id, d.final) for d in deferred] == [("r7", True)]
    assert "true length" in deferred[0].reason
    assert sum(map(len, service.batch_ids)) == 30, "each arrival went through once"
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    assert bus.counters["requests_rejected"] == 1
    assert "handler_errors.request" not in bus.counters
    assert [e["id"] for e in logs if e["event"] == "length.request_rejected"] == ["r7"]


async def test_rpc_rejects_a_bad_request_alone_in_its_batch(nats: EmbeddedNatsServer) -> None:
    service = LengthPredictorService(oracle=0.0)
    payloads = [encode(arrival(n, true_tokens=None if n == 3 else 10 + n)) for n in range(12)]
    replies, counters = await serve_and_request(nats, service, payloads)
    assert replies[3]["tag"] == "rpc.error"
    assert "oracle mode needs the request's true length" in replies[3]["error"]
    others = [r for n, r in enumerate(replies) if n != 3]
    assert [r["tag"] for r in others] == ["request.predicted"] * 11
    assert [r["predicted_tokens"] for r in others] == [10 + n for n in range(12) if n != 3]
    assert counters["rpc_rejected"] == 1
    assert service.batcher.batches < 12, "requests sent together were batched together"


class FailingPredictor(LengthPredictorService):
    """The ONNX model, except that a prompt saying "explode" makes the batch raise."""

    def predict_batch(self, requests: list[RequestArrived]
                      ) -> list[RequestPredicted | Exception]:
        if any(r.prompt_text == "explode" for r in requests):
            raise RuntimeError("the model blew up")
        return super().predict_batch(requests)


async def test_an_rpc_that_fails_gets_an_error_reply_and_the_service_keeps_serving(
        nats: EmbeddedNatsServer) -> None:
    service = FailingPredictor()
    bus = await Bus.connect(nats.url, name="predictor")
    client = await Bus.connect(nats.url, name="gateway")
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run, bus, REAL_TIME)
            alone = await client.nc.request(PREDICT_RPC, encode(arrival(0, text="explode")),
                                            timeout=5)
            burst = await request_all(client, [
                encode(arrival(n, text="explode" if n == 2 else PROMPTS[n % 4]))
                for n in range(1, 9)])
            after = await client.nc.request(PREDICT_RPC, encode(arrival(9, text=PROMPTS[0])),
                                            timeout=5)
            tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    error = msgspec.json.decode(alone.data)
    assert (error["tag"], error["error"], error["kind"]) == (
        "rpc.error", "length prediction failed (RuntimeError: the model blew up)", "")
    assert burst[1]["tag"] == "rpc.error"  # arrival 2
    assert [r["tag"] for n, r in enumerate(burst) if n != 1] == ["request.predicted"] * 7
    assert isinstance(REQUEST_CODEC.decode(after.data), RequestPredicted)
    assert bus.counters["rpc_errors"] == 2
    assert "rpc_rejected" not in bus.counters
    failed = [e for e in logs if e["event"] == "rpc.failed"]
    assert len(failed) == 2
    assert failed[0]["log_level"] == "error"


async def test_micro_batching_forms_batches_under_load(nats: EmbeddedNatsServer) -> None:
    service = LengthPredictorService()
    payloads = [encode(arrival(n, text=PROMPTS[n % 4])) for n in range(200)]
    replies, _ = await serve_and_request(nats, service, payloads)
    assert [r["id"] for r in replies] == [f"r{n}" for n in range(200)]
    assert service.batcher.items == 200
    assert service.batcher.max_batch > 1
    assert service.batcher.batches < 100, "200 requests at once: at least 2 per batch on average"
    metrics = service.health_metrics()
    assert metrics["mean_batch"] == pytest.approx(200 / service.batcher.batches)
    assert metrics["max_batch"] == service.batcher.max_batch


async def test_drift_past_the_model_card_figure_logs_one_warning(
        nats: EmbeddedNatsServer) -> None:
    service = LengthPredictorService()
    card_mae = read_metrics()["test"]["mae"]
    assert service.feedback.expected_mae_tokens == pytest.approx(card_mae)
    bus = await Bus.connect(nats.url, name="predictor")
    client = await Bus.connect(nats.url, name="engine")
    requests = [arrival(n, text=PROMPTS[n % 4]) for n in range(150)]
    min_count = service.feedback.min_count  # no verdict before this many completions

    async def complete(batch: list[RequestArrived], tokens: int) -> None:
        for r in batch:
            await client.publish(REQUEST_COMPLETED, completed(r, tokens))
        target = service.feedback.stats().count + len(batch)
        with anyio.fail_after(10):
            while service.feedback.stats().count < target:
                await anyio.sleep(0.01)

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run, bus, REAL_TIME)
            replies = await request_all(client, [encode(r) for r in requests])
            # Every answer far longer than predicted (the model says hundreds of tokens).
            await complete(requests[:min_count - 1], 4000)
            assert not [e for e in logs if e["event"] == "length.drift"]
            assert service.health_metrics()["drifting"] == 0.0
            await complete(requests[min_count - 1:], 4000)
            tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    assert max(r["predicted_tokens"] for r in replies) < 1500
    drift = [e for e in logs if e["event"] == "length.drift"]
    assert len(drift) == 1, "warned once, not once per completion"
    assert drift[0]["log_level"] == "warning"
    assert drift[0]["expected_mae_tokens"] == pytest.approx(card_mae)
    assert drift[0]["mae_tokens"] > 1.5 * card_mae
    assert drift[0]["count"] == min_count
    assert drift[0]["model_version"] == service.model_version
    metrics = service.health_metrics()
    assert metrics["drifting"] == 1.0
    assert metrics["feedback_count"] == 150


async def test_feedback_is_published_on_the_health_heartbeat(nats: EmbeddedNatsServer) -> None:
    """The whole service as it runs in production (runtime, heartbeats) on a real server."""
    service = LengthPredictorService(oracle=0.3, seed=5)
    requests = [arrival(n, true_tokens=300) for n in range(40)]
    expected = expected_feedback(OraclePredictor(0.3, seed=5), requests, truth=300)
    client = await Bus.connect(nats.url, name="engine")
    beats: list[Heartbeat] = []

    async def on_beat(beat: Heartbeat) -> None:
        beats.append(beat)

    await client.subscribe(health("length-predictor"), HEALTH_CODEC, on_beat)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(run_service, service, nats_url=nats.url, heartbeat_s=0.1))
        with anyio.fail_after(10):
            while not beats:
                await anyio.sleep(0.02)
        assert "feedback_count" in beats[-1].metrics
        assert "mae_tokens" not in beats[-1].metrics  # no completion yet: NaN is left out
        replies = await request_all(client, [encode(r) for r in requests])
        for r in requests:
            await client.publish(REQUEST_COMPLETED, completed(r, 300))
        with anyio.fail_after(10):
            while not beats or beats[-1].metrics.get("feedback_count") != 40:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    await client.close()
    assert all(r["tag"] == "request.predicted" for r in replies)
    beat = beats[-1]
    assert beat.service == "length-predictor"
    assert beat.metrics["mae_tokens"] == pytest.approx(expected["mae_tokens"])
    assert beat.metrics["within25"] == pytest.approx(expected["within25"])
    assert beat.metrics["upper_coverage"] == pytest.approx(expected["upper_coverage"])
    assert beat.metrics["drifting"] == 0.0
    assert beat.metrics["mean_batch"] >= 1.0
    assert beat.metrics["max_batch"] >= 1.0


def test_oracle_option_parsing() -> None:
    assert parse_oracle("0.15") == pytest.approx(0.15)
    assert parse_oracle("30%") == pytest.approx(0.30)
    assert parse_oracle("measured") == "measured"
    with pytest.raises(ConfigError, match="relative error"):
        parse_oracle("lots")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        parse_oracle("1.5")

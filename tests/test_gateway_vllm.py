"""The gateway in front of a real vLLM (CPU build) serving the tiny local model, with the real
default-policy forecaster admitting over a real nats-server and the official `openai` client:
answers pass through unchanged, completions are timed from the stream, and a client that
leaves mid-stream aborts the engine's work."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
import openai
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import (
    REQUEST_CODEC,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
)
from throttllem._gateway.service import GatewayConfig, GatewayService, default_max_model_len
from throttllem._runtime import REAL_TIME
from throttllem._services.forecaster import ForecasterService
from throttllem._services.length_predictor import LengthPredictorService
from throttllem._subjects import REQUEST_ALL
from throttllem.testing import VllmServer, crowded_perf, forecaster_service

# The session's one vLLM (tests/conftest.py `vllm`) takes minutes to start on two cores.
pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Stack:
    gateway: GatewayService
    forecaster: ForecasterService
    client: openai.AsyncOpenAI
    bus: Bus

    async def events(self) -> list[RequestEvent]:
        return await self.bus.history(REQUEST_ALL, REQUEST_CODEC)

    async def nothing_pinned(self) -> None:
        controller = self.forecaster.controller
        with anyio.fail_after(10):
            while controller.placed or any(controller.outstanding.values()):
                await anyio.sleep(0.05)

    async def wait_for(self, kind: type, count: int = 1) -> list[RequestEvent]:
        with anyio.fail_after(15):
            while True:
                events = await self.events()
                if sum(isinstance(e, kind) for e in events) >= count:
                    return events
                await anyio.sleep(0.05)


@contextlib.asynccontextmanager
async def stack(nats: EmbeddedNatsServer, vllm: VllmServer,
                forecaster: ForecasterService | None = None) -> AsyncIterator[Stack]:
    """Gateway and forecaster (default policy unless given one) over `nats`; a forecaster
    that needs predictions gets the real length predictor (the shipped ONNX model)."""
    cfg = GatewayConfig(model_dir=vllm.model_dir, served_model_names=(vllm.model,),
                        max_model_len=default_max_model_len(vllm.model_dir),
                        instances={vllm.instance: vllm.url},
                        slo_classes=frozenset({"standard", "interactive", "batch"}), port=0)
    buses = [await Bus.connect(nats.url, name=n) for n in ("gateway", "forecaster", "test")]
    gateway = GatewayService(cfg)
    forecaster = forecaster or forecaster_service(instances=[vllm.instance], policy="default")
    try:
        async with anyio.create_task_group() as tg:
            if forecaster.controller.config.needs_predictions:
                predictor_bus = await Bus.connect(nats.url, name="length-predictor")
                buses.append(predictor_bus)
                await tg.start(LengthPredictorService().run, predictor_bus, REAL_TIME)
            await tg.start(forecaster.run, buses[1], REAL_TIME)
            await tg.start(gateway.run, buses[0], REAL_TIME)
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1",
                                        api_key="unused", max_retries=0, timeout=60.0)
            try:
                yield Stack(gateway, forecaster, client, buses[2])
            finally:
                await client.close()
                tg.cancel_scope.cancel()
    finally:
        for bus in buses:
            await bus.close()


def _by_id(events: list[RequestEvent], kind: type) -> dict[str, RequestEvent]:
    return {getattr(e, "id", ""): e for e in events if isinstance(e, kind)}


async def test_openai_client_through_the_gateway(nats: EmbeddedNatsServer,
                                                 vllm: VllmServer) -> None:
    async with stack(nats, vllm) as s:
        plain = await s.client.completions.create(
            model="tiny", prompt="the quick brown fox", max_tokens=6,
            extra_body={"ignore_eos": True}, extra_headers={"x-throttllem-tenant": "acme"})
        assert plain.usage is not None
        assert plain.usage.completion_tokens == 6
        assert plain.choices[0].text

        pieces: list[str] = []
        usage_seen = False
        stream = await s.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "tell me about dogs"}],
            max_tokens=12, stream=True, extra_body={"ignore_eos": True},
            extra_headers={"x-throttllem-slo-class": "interactive"})
        async for chunk in stream:
            usage_seen = usage_seen or chunk.usage is not None
            pieces += [c.delta.content or "" for c in chunk.choices]
        assert "".join(pieces)
        assert not usage_seen  # the gateway asked for usage; the client did not, so not sent

        events = await s.wait_for(RequestCompleted, 2)
        arrived = _by_id(events, RequestArrived)
        completed = _by_id(events, RequestCompleted)
        assert arrived.keys() == completed.keys()
        for rid, done in completed.items():
            assert isinstance(done, RequestCompleted)
            request = arrived[rid]
            assert isinstance(request, RequestArrived)
            assert done.instance == vllm.instance
            assert done.prompt_tokens == request.prompt_tokens  # our count is vLLM's
            assert 0 < done.ttft_ms <= done.e2e_ms
            assert done.arrival_s <= done.admitted_s <= done.first_token_s <= done.completed_s
        by_tokens = {d.generated_tokens: d for d in completed.values()
                     if isinstance(d, RequestCompleted)}
        assert sorted(by_tokens) == [6, 12]
        assert by_tokens[6].tenant == "acme"
        assert by_tokens[6].ttft_ms == pytest.approx(by_tokens[6].e2e_ms)  # not streamed
        streamed = by_tokens[12]
        assert streamed.slo_class == "interactive"
        assert streamed.ttft_ms < streamed.e2e_ms
        assert 0 < streamed.tbt_mean_ms <= streamed.tbt_max_ms
        await s.nothing_pinned()  # every admission released by its completion


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in vLLM's metrics"
    return float(match.group(1))


async def test_a_client_leaving_mid_stream_aborts_the_engine_request(
        nats: EmbeddedNatsServer, vllm: VllmServer) -> None:
    async with stack(nats, vllm) as s, httpx.AsyncClient() as raw:
        before = _metric((await raw.get(f"{vllm.url}/metrics")).text,
                         "vllm:generation_tokens_total")
        # Long enough that the engine is still generating when the gateway's abort lands (on
        # a fast CI machine 900 tokens were done before it did).
        asked = 4080
        stream = await s.client.completions.create(
            model="tiny", prompt="the lazy dog", max_tokens=asked, stream=True,
            extra_body={"ignore_eos": True})
        async for _ in stream:
            break  # one chunk, then the client goes away
        await stream.close()
        events = await s.wait_for(RequestAborted)
        aborted = next(e for e in events if isinstance(e, RequestAborted))
        assert (aborted.cause, aborted.instance) == ("client-disconnected", vllm.instance)
        assert not any(isinstance(e, RequestCompleted) for e in events)
        await s.nothing_pinned()  # the controller forgot it
        with anyio.fail_after(15):
            while True:
                metrics = (await raw.get(f"{vllm.url}/metrics")).text
                if _metric(metrics, "vllm:num_requests_running") == 0:
                    break
                await anyio.sleep(0.1)
        generated = _metric(metrics, "vllm:generation_tokens_total") - before
        assert generated < asked  # vLLM stopped generating when the gateway hung up


async def test_an_engine_refusal_passes_through_and_is_final(
        nats: EmbeddedNatsServer, vllm: VllmServer) -> None:
    async with stack(nats, vllm) as s:
        # Valid to the gateway, refused by vLLM's own checks: its 400 reaches the client.
        with pytest.raises(openai.BadRequestError) as info:
            await s.client.completions.create(model="tiny", prompt="the dog", max_tokens=4,
                                              temperature=-1.0)
        assert "temperature" in info.value.message
        # On the bus, the engine contract's final refusal (and no abort, no completion).
        events = await s.wait_for(RequestDeferred)
        refused = next(e for e in events if isinstance(e, RequestDeferred))
        assert refused.final
        assert refused.reason.startswith(f"{vllm.instance}: the engine refused it with HTTP 400")
        assert not any(isinstance(e, RequestAborted | RequestCompleted) for e in events)
        await s.nothing_pinned()


async def test_a_deferred_request_waits_and_is_admitted_when_room_frees(
        nats: EmbeddedNatsServer, vllm: VllmServer) -> None:
    # The throttLL'eM policy with a performance model under which an instance holds one
    # request within its SLOs: of two concurrent requests one must wait for the other.
    forecaster = forecaster_service(instances=[vllm.instance], policy="throttllem",
                                    perf=crowded_perf(1))
    async with stack(nats, vllm, forecaster) as s:
        async def ask(n: int) -> str:
            answer = await s.client.completions.create(
                model=vllm.model, prompt=f"the quick brown fox {n}", max_tokens=24,
                extra_body={"ignore_eos": True})
            assert answer.usage is not None
            assert answer.usage.completion_tokens == 24
            return answer.choices[0].text

        texts: list[str] = []

        async def collect(n: int) -> None:
            texts.append(await ask(n))

        async with anyio.create_task_group() as tg:
            for n in range(2):
                tg.start_soon(collect, n)
        assert len(texts) == 2

        events = await s.wait_for(RequestCompleted, 2)
        deferred = [e for e in events if isinstance(e, RequestDeferred)]
        assert deferred, "one of the two should have waited"
        assert not any(d.final for d in deferred)
        waited = deferred[0].id
        admitted = {e.request.id: e for e in events if isinstance(e, RequestAdmitted)}
        completed = {e.id: e for e in events if isinstance(e, RequestCompleted)}
        assert admitted.keys() == completed.keys()
        first = next(i for i in admitted if i != waited)
        # Admitted only once the first was done (its completion freed the instance).
        assert admitted[waited].decided_s >= completed[first].completed_s
        assert completed[waited].admitted_s > completed[waited].arrival_s
        await s.nothing_pinned()

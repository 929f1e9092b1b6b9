"""The gateway over a real nats-server with the official `openai` client: bad input is
refused in OpenAI's shape with nothing published; admission, refusal, queue timeout, an
unknown instance, a dead engine and a client that leaves each end with the right answer and
the right event, so nothing stays pinned in the controller."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

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
    RequestDeferred,
    RequestEvent,
)
from throttllem._gateway.service import GatewayConfig, GatewayService
from throttllem._gateway.tokenizer import PromptCounter
from throttllem._runtime import REAL_TIME
from throttllem._services.forecaster import ForecasterService
from throttllem._subjects import (
    REQUEST_ABORTED,
    REQUEST_ALL,
    REQUEST_ARRIVED,
    REQUEST_DEFERRED,
    request_admitted,
)
from throttllem.testing import forecaster_service, write_test_tokenizer

pytestmark = [pytest.mark.slow]

CLASSES = frozenset({"standard", "interactive", "batch"})


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Running:
    gateway: GatewayService
    client: openai.AsyncOpenAI
    bus: Bus  # the test's own connection (reads the stream, stands in where needed)
    forecaster: ForecasterService | None

    async def nothing_pinned(self) -> None:
        """Wait until the controller holds no request of this test (it forgot them all)."""
        assert self.forecaster is not None
        controller = self.forecaster.controller
        with anyio.fail_after(10):
            while controller.placed or any(controller.outstanding.values()):
                await anyio.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    async def events(self) -> list[RequestEvent]:
        return await self.bus.history(REQUEST_ALL, REQUEST_CODEC)

    async def stored(self) -> int:
        return int((await self.bus.js.stream_info("TLLM_REQUESTS")).state.messages)


def config(model_dir: Path, **overrides: object) -> GatewayConfig:
    base = GatewayConfig(model_dir=model_dir, served_model_names=("tiny",), max_model_len=64,
                         instances={"i0": closed_port_url()}, slo_classes=CLASSES, port=0,
                         queue_timeout_s=5.0, max_body_bytes=4096)
    return replace(base, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(nats: EmbeddedNatsServer, cfg: GatewayConfig, *,
                  forecaster_instances: list[str] | None = None) -> AsyncIterator[Running]:
    """The gateway (and, if asked, the real default-policy forecaster) over the server."""
    buses = [await Bus.connect(nats.url, name=n) for n in ("gateway", "forecaster", "test")]
    gateway = GatewayService(cfg, PromptCounter.load(cfg.model_dir))
    forecaster = (forecaster_service(instances=forecaster_instances, policy="default")
                  if forecaster_instances else None)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.run, buses[0], REAL_TIME)
            if forecaster is not None:
                await tg.start(forecaster.run, buses[1], REAL_TIME)
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1",
                                        api_key="unused", max_retries=0, timeout=20.0)
            try:
                yield Running(gateway, client, buses[2], forecaster)
            finally:
                await client.close()
                tg.cancel_scope.cancel()
    finally:
        for bus in buses:
            await bus.close()


async def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    with anyio.fail_after(timeout_s):
        while not await predicate():
            await anyio.sleep(0.05)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_test_tokenizer(tmp_path / "tiny")


@pytest.mark.anyio
async def test_bad_input_is_refused_in_openai_shape_and_nothing_published(
        nats: EmbeddedNatsServer, model_dir: Path) -> None:
    async with running(nats, config(model_dir), forecaster_instances=["i0"]) as run:
        c = run.client
        with pytest.raises(openai.NotFoundError) as nf:
            await c.completions.create(model="gpt-4", prompt="the dog")
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as zero:
            await c.completions.create(model="tiny", prompt="the dog", max_tokens=0)
        assert zero.value.param == "max_tokens"
        with pytest.raises(openai.BadRequestError) as long:
            await c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "the lazy dog " * 40}])
        assert long.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as slo:
            await c.completions.create(model="tiny", prompt="the dog",
                                       extra_headers={"x-throttllem-slo-class": "gold"})
        assert slo.value.code == "unknown_slo_class"
        with pytest.raises(openai.BadRequestError) as bound:
            await c.completions.create(model="tiny", prompt="the dog",
                                       extra_headers={"x-slo-ttft-ms": "-1"})
        assert bound.value.param == "x-slo-ttft-ms"
        async with httpx.AsyncClient(base_url=run.base_url) as raw:
            malformed = await raw.post("/v1/completions", content=b"{\"model\": ",
                                       headers={"content-type": "application/json"})
            oversized = await raw.post("/v1/completions",
                                       json={"model": "tiny", "prompt": "dog " * 2000})
            missing = await raw.get("/v1/nothing")
        assert malformed.status_code == 400
        assert malformed.json()["error"]["code"] == "invalid_json"
        assert oversized.status_code == 413
        assert oversized.json()["error"]["code"] == "request_too_large"
        assert missing.status_code == 404
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        assert await run.stored() == 0  # no event for any of them
        counters = run.gateway.bus.counters
        assert counters["gateway.refused.model_not_found"] == 1
        assert counters["gateway.refused.context_length_exceeded"] == 1
        models = await c.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        # Streams are small writes: without TCP_NODELAY each would wait on Nagle (~40 ms).
        sock = run.gateway.listening
        assert sock is not None
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.anyio
async def test_a_queue_timeout_answers_503_with_retry_after_and_aborts(
        nats: EmbeddedNatsServer, model_dir: Path) -> None:
    # No controller runs: nobody admits, the request times out in the queue.
    async with running(nats, config(model_dir, queue_timeout_s=0.5)) as run:
        async with httpx.AsyncClient(base_url=run.base_url) as raw:
            answer = await raw.post("/v1/completions", json={"model": "tiny", "prompt": "dog",
                                                             "max_tokens": 4})
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "queue_timeout"
        assert int(answer.headers["retry-after"]) >= 1
        request_id = answer.headers["x-request-id"]
        await wait_for(lambda: _has(run, RequestAborted))
        arrived, aborted = await run.events()
        assert isinstance(arrived, RequestArrived)
        assert arrived.id == request_id
        assert arrived.max_tokens == 4
        assert arrived.prompt_text == "dog"
        assert isinstance(aborted, RequestAborted)
        assert (aborted.id, aborted.cause, aborted.instance) == (request_id, "queue-timeout", "")


async def _has(run: Running, kind: type) -> bool:
    return any(isinstance(e, kind) for e in await run.events())


@pytest.mark.anyio
async def test_a_final_refusal_is_a_400_with_the_controllers_reason(
        nats: EmbeddedNatsServer, model_dir: Path) -> None:
    async with running(nats, config(model_dir)) as run:
        async def refuse(event: RequestEvent) -> None:  # a controller that refuses all
            assert isinstance(event, RequestArrived)
            await run.bus.publish_durable(REQUEST_DEFERRED, RequestDeferred(
                id=event.id, decided_s=event.arrival_s, reason="forecaster: never fits",
                final=True))
        await run.bus.subscribe(REQUEST_ARRIVED, REQUEST_CODEC, refuse)
        with pytest.raises(openai.BadRequestError) as info:
            await run.client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "the fox"}],
                extra_headers={"x-throttllem-slo-class": "batch", "x-slo-tpot-ms": "40"})
        assert info.value.code == "refused_by_controller"
        assert "never fits" in info.value.message
        arrived = (await run.events())[0]
        assert isinstance(arrived, RequestArrived)
        assert (arrived.slo_class, arrived.tbt_slo_ms, arrived.ttft_slo_ms) == (
            "batch", 40.0, None)
        assert arrived.prompt_text == "<s><|user|>the fox</s><|assistant|>"
        await anyio.sleep(0.3)
        assert not await _has(run, RequestAborted)  # the controller forgot it already


@pytest.mark.anyio
async def test_an_admission_to_an_unknown_instance_is_a_502_and_aborted(
        nats: EmbeddedNatsServer, model_dir: Path) -> None:
    async with running(nats, config(model_dir), forecaster_instances=["ghost"]) as run:
        with pytest.raises(openai.InternalServerError) as info:
            await run.client.completions.create(model="tiny", prompt="the dog", max_tokens=3)
        assert info.value.status_code == 502
        assert info.value.code == "unknown_instance"
        await wait_for(lambda: _has(run, RequestAborted))
        aborted = (await run.events())[-1]
        assert isinstance(aborted, RequestAborted)
        assert (aborted.instance, aborted.cause) == ("ghost", "engine-failed")
        await run.nothing_pinned()


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_dead_engine_is_a_502_and_aborted(nats: EmbeddedNatsServer, model_dir: Path,
                                                  stream: bool) -> None:
    async with running(nats, config(model_dir), forecaster_instances=["i0"]) as run:
        with pytest.raises(openai.InternalServerError) as info:
            await run.client.completions.create(model="tiny", prompt="the dog", max_tokens=3,
                                                stream=stream)
        assert info.value.status_code == 502
        assert info.value.code == "engine_failed"
        await wait_for(lambda: _has(run, RequestAborted))
        aborted = (await run.events())[-1]
        assert isinstance(aborted, RequestAborted)
        assert (aborted.instance, aborted.cause) == ("i0", "engine-failed")
        assert "ConnectError" in aborted.reason
        await run.nothing_pinned()


@pytest.mark.anyio
async def test_a_client_that_leaves_the_queue_is_aborted(nats: EmbeddedNatsServer,
                                                        model_dir: Path) -> None:
    async with running(nats, config(model_dir, queue_timeout_s=30.0)) as run:
        async with httpx.AsyncClient(base_url=run.base_url) as raw, \
                anyio.create_task_group() as tg:
            async def leaving_client() -> None:
                await raw.post("/v1/completions",
                               json={"model": "tiny", "prompt": "dog", "stream": True})

            tg.start_soon(leaving_client)
            await wait_for(lambda: _has(run, RequestArrived))
            tg.cancel_scope.cancel()  # the client goes away while queued
        await wait_for(lambda: _has(run, RequestAborted))
        arrived, aborted = await run.events()
        assert isinstance(aborted, RequestAborted)
        assert (aborted.id, aborted.cause) == (arrived.id if isinstance(
            arrived, RequestArrived) else "", "client-disconnected")
        assert run.gateway.health_metrics() == {"waiting": 0.0, "in_flight": 0.0}


@pytest.mark.anyio
async def test_an_abort_from_the_controller_ends_the_request(nats: EmbeddedNatsServer,
                                                            model_dir: Path) -> None:
    async with running(nats, config(model_dir, queue_timeout_s=30.0)) as run:
        async def shed(event: RequestEvent) -> None:  # a controller that sheds what arrives
            assert isinstance(event, RequestArrived)
            await run.bus.publish_durable(REQUEST_ABORTED, RequestAborted(
                id=event.id, decided_s=event.arrival_s, cause="shed", reason="overloaded"))
        await run.bus.subscribe(REQUEST_ARRIVED, REQUEST_CODEC, shed)
        with pytest.raises(openai.InternalServerError) as info:
            await run.client.completions.create(model="tiny", prompt="the dog", max_tokens=3)
        assert info.value.status_code == 503
        assert info.value.code == "aborted"
        assert "overloaded" in info.value.message
        await anyio.sleep(0.3)
        aborts = [e for e in await run.events() if isinstance(e, RequestAborted)]
        assert [a.cause for a in aborts] == ["shed"]  # the gateway adds none of its own
        assert run.gateway.health_metrics() == {"waiting": 0.0, "in_flight": 0.0}


@pytest.mark.anyio
@pytest.mark.parametrize(("named", "status", "code"), [("i0", 503, "aborted"),
                                                       ("i1", 502, "engine_failed")])
async def test_an_abort_counts_only_for_the_instance_it_names(
        nats: EmbeddedNatsServer, model_dir: Path, named: str, status: int, code: str) -> None:
    """A controller aborts a request at an instance, then admits it to i0 (the gateway may
    see the two in either order): an abort naming i0 ends it; one naming another instance
    is not its business, so the request goes on to i0 (a dead engine here: 502)."""
    async with running(nats, config(model_dir, queue_timeout_s=30.0)) as run:
        async def abort_then_admit(event: RequestEvent) -> None:
            assert isinstance(event, RequestArrived)
            await run.bus.publish_durable(REQUEST_ABORTED, RequestAborted(
                id=event.id, decided_s=event.arrival_s, instance=named, cause="shed",
                reason="moved"))
            await run.bus.publish_durable(request_admitted("i0"), RequestAdmitted(
                request=event, instance="i0", decided_s=event.arrival_s))
        await run.bus.subscribe(REQUEST_ARRIVED, REQUEST_CODEC, abort_then_admit)
        with pytest.raises(openai.APIStatusError) as info:
            await run.client.completions.create(model="tiny", prompt="the dog", max_tokens=3)
        assert (info.value.status_code, info.value.code) == (status, code)
        if named != "i0":
            assert run.gateway.bus.counters["gateway.abort_for_other_instance"] == 1


def test_throttllem_run_gateway_serves_and_stops_on_sigterm(nats: EmbeddedNatsServer,
                                                          model_dir: Path) -> None:
    """The service as its container runs it: listening, healthy, and stopped by SIGTERM."""

    exe = Path(sys.executable).parent / "throttllem"
    proc = subprocess.Popen(
        [str(exe), "run", "gateway", "--nats", nats.url, "--model", str(model_dir),
         "--served-model-name", "tiny", "--instance", f"i0={closed_port_url()}",
         "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "gateway.listening":
                    port = record["port"]
        assert port, "the gateway never said where it listens"
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.status_code == 200
        assert health.json()["instances"]["i0"]["phase"] == "active"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_throttllem_run_gateway_refuses_a_bad_instance(model_dir: Path) -> None:

    exe = Path(sys.executable).parent / "throttllem"
    done = subprocess.run(
        [str(exe), "run", "gateway", "--model", str(model_dir), "--instance", "i0"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "must be NAME=URL" in done.stderr

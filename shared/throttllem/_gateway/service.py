"""The gateway service: an OpenAI-compatible HTTP front door that asks the controller where
(and whether) each request runs, proxies it there and reports how it went.

Per request: validate (nothing is published for a request refused here), count the prompt's
tokens with the served model's tokenizer, publish a durable `request.arrived`, wait for the
controller's `request.admitted.<instance>` (or a final `request.deferred`, or the queue
timeout), proxy to the instance with our id as `X-Request-Id`, relay the answer while timing
every output event, and publish a durable `request.completed` — or a final `request.deferred`
when the engine refused it (its HTTP 4xx), or `request.aborted` when the client went away, the
engine failed or the queue timed out, so the controller forgets it. An abort published by
someone else (the controller shedding a request) cancels the request here, which closes its
upstream connection so the engine stops it too: for vLLM, the gateway keeps those duties of
the engine contract (services/README.md).

Stack: Starlette routes (anyio-native) on uvicorn's httptools protocol, inside the service's
anyio task group (uvicorn's own signal handling is off: the runtime owns SIGTERM); httpx
(anyio-native, through httpcore) to the engines, one client for all of them, over our own
connection pool (`upstream.UpstreamTransport`: httpx's costs grow with the square of the
open streams). The two
proxy endpoints are plain ASGI callables, so they can watch for a client disconnect while
they wait and stream without per-chunk framework overhead.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import msgspec
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from throttllem._bus import Bus
from throttllem._engines.contract import REMEMBERED_IDS, acts_on_abort
from throttllem._errors import ApiRequestError, BusError, ConfigError
from throttllem._events import (
    REQUEST_CODEC,
    SCALE_CODEC,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
    ScaleEvent,
    ScaleTarget,
)
from throttllem._gateway.instances import InstanceRegistry
from throttllem._gateway.protocol import (
    Kind,
    ParsedRequest,
    SseSplitter,
    Usage,
    check_length,
    error_body,
    header_map,
    latencies,
    parse_request,
    published_prompt_text,
    read_chunk,
    response_usage,
    slo_of,
    tenant_of,
    upstream_body,
)
from throttllem._gateway.tokenizer import PromptCounter
from throttllem._gateway.upstream import UpstreamTransport
from throttllem._runtime import Clock
from throttllem._subjects import (
    REQUEST_ABORTED,
    REQUEST_ADMITTED_ALL,
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    SCALE_TARGET,
)

log = structlog.get_logger("throttllem.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPSTREAM_PATHS: Final[dict[Kind, str]] = {"completions": "/v1/completions",
                                          "chat": "/v1/chat/completions"}
# Prompts longer than this are tokenized in a worker thread, so one long prompt does not
# stall every stream the event loop relays.
THREAD_TOKENIZE_CHARS: Final = 8192


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """What the gateway serves and where the engines listen."""

    model_dir: Path
    served_model_names: tuple[str, ...]
    max_model_len: int
    instances: dict[str, str]
    slo_classes: frozenset[str]
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: dict[str, str] = field(default_factory=dict)  # key → tenant
    default_slo_class: str = "standard"
    queue_timeout_s: float = 30.0
    max_body_bytes: int = 4 << 20
    upstream_api_key: str | None = None
    connect_timeout_s: float = 5.0
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ConfigError("the gateway needs the served model's name")
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len {self.max_model_len} is too small")
        if not self.instances:
            raise ConfigError("the gateway needs at least one engine instance "
                              "(--instance NAME=URL)")
        if self.default_slo_class not in self.slo_classes:
            raise ConfigError(f"default SLO class {self.default_slo_class!r} is not one of "
                              f"{sorted(self.slo_classes)}")
        if not (self.queue_timeout_s > 0 and math.isfinite(self.queue_timeout_s)):
            raise ConfigError("the queue timeout must be a positive number of seconds")


class _ClientGoneError(Exception):
    """The client disconnected before its request was read."""


class _Waiter:
    """Where the bus callback leaves the controller's decision for one request."""

    __slots__ = ("decision", "event", "retry_after_s")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.decision: RequestAdmitted | RequestDeferred | None = None
        self.retry_after_s = 0.0


@dataclass(slots=True)
class _Flight:
    """One announced request and how it ended (the event published for it follows this)."""

    request: RequestArrived
    instance: str = ""
    admitted_s: float = 0.0
    outcome: RequestCompleted | RequestAborted | RequestDeferred | None = None
    # The controller refused it for good, or someone else aborted it: it is settled on the
    # bus already, the gateway publishes nothing more for it.
    settled: bool = False
    aborted_by: RequestAborted | None = None
    # An abort naming an instance, seen before this gateway learnt where the request was
    # admitted: it applies once the admission names that instance.
    abort_if_admitted: RequestAborted | None = None
    client_gone: bool = False
    response_started: bool = False
    scope: anyio.CancelScope | None = None


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The service runtime owns SIGTERM/SIGINT and stops the whole task group.
        yield


class GatewayService:
    name = "gateway"

    def __init__(self, config: GatewayConfig, counter: PromptCounter | None = None) -> None:
        self.config = config
        self.counter = counter or PromptCounter.load(config.model_dir)
        self.registry = InstanceRegistry(urls=dict(config.instances))
        self.port = config.port
        self.listening: socket.socket | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._flights: dict[str, _Flight] = {}
        # Ids whose requests ended here, so that a late admission of one is counted as the
        # duplicate it is (the engine contract's `admissions_duplicate`).
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._in_flight = 0
        self._started_wall = int(time.time())
        self._bus: Bus | None = None
        self._clock: Clock | None = None
        self._http: httpx.AsyncClient | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------ bus

    async def _on_decision(self, event: RequestEvent) -> None:
        if isinstance(event, RequestAdmitted):
            waiter = self._waiters.get(event.request.id)
            if waiter is None or waiter.decision is not None:
                rid = event.request.id
                if rid in self._flights or rid in self._ended:  # never served twice
                    self.bus.counters["admissions_duplicate"] += 1
                return  # else another gateway's request
            waiter.decision = event
            waiter.event.set()
        elif isinstance(event, RequestDeferred):
            waiter = self._waiters.get(event.id)
            if waiter is None or waiter.decision is not None:
                return
            waiter.retry_after_s = max(waiter.retry_after_s, event.retry_after_s)
            if event.final:
                waiter.decision = event
                waiter.event.set()

    async def _on_aborted(self, event: RequestEvent) -> None:
        """An abort from elsewhere (the controller shedding a request) of one this gateway is
        serving: cancel it, which closes its upstream connection so the engine stops too.
        As the engine contract has it, an abort counts when it names the instance the
        request was admitted to, or none; one naming another instance is ignored (the
        controller may have placed the id elsewhere). The gateway's own aborts are published
        after their request has left `_flights`."""
        if not isinstance(event, RequestAborted):
            return
        flight = self._flights.get(event.id)
        if flight is None or flight.aborted_by is not None:
            return
        if not flight.instance and event.instance:
            flight.abort_if_admitted = event  # the admission will say whether it is ours
            return
        if not acts_on_abort(flight.instance, event):
            self.bus.counters["gateway.abort_for_other_instance"] += 1
            return
        flight.aborted_by = event
        if flight.scope is not None:  # else not serving yet: it never starts
            flight.scope.cancel()

    async def _on_scale(self, event: ScaleEvent) -> None:
        if isinstance(event, ScaleTarget):
            self.registry.on_scale_target(event.reason)

    def health_metrics(self) -> dict[str, float]:
        return {"waiting": float(len(self._waiters)), "in_flight": float(self._in_flight)}

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "the gateway is not running"
        return self._bus

    @property
    def clock(self) -> Clock:
        assert self._clock is not None, "the gateway is not running"
        return self._clock

    # ------------------------------------------------------------------ HTTP plumbing

    async def _send_json(self, send: Send, status: int, body: bytes,
                         extra: dict[str, str] | None = None) -> None:
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _send_error(self, send: Send, err: ApiRequestError,
                          request_id: str | None = None) -> None:
        extra = dict(err.headers)
        if request_id:
            extra["x-request-id"] = request_id
        await self._send_json(send, err.status, error_body(err), extra)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        too_large = ApiRequestError(413, f"request body is larger than {limit} bytes",
                                    code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGoneError
            body: bytes = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise too_large
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _count_prompt(self, parsed: ParsedRequest) -> tuple[int, str | None]:
        """(prompt tokens, prompt text) as the engine will see them."""
        prompt = parsed.prompt
        if prompt.token_ids is not None:
            return len(prompt.token_ids), None
        if prompt.messages is not None:
            text = self.counter.render_chat(prompt.messages)
            special = False  # the template wrote the special tokens
        else:
            text = prompt.text or ""
            special = True
        if len(text) > THREAD_TOKENIZE_CHARS:
            n = await anyio.to_thread.run_sync(
                lambda: self.counter.count_text(text, add_special_tokens=special))
        else:
            n = self.counter.count_text(text, add_special_tokens=special)
        if n < 1:
            raise ApiRequestError(400, "the prompt is empty", param="prompt")
        return n, text

    # ------------------------------------------------------------------ one request

    def _refused(self, err: ApiRequestError) -> None:
        self.bus.counters[f"gateway.refused.{err.code or err.status}"] += 1
        log.info("gateway.refused", status=err.status, code=err.code, error=err.message)

    async def _generate(self, kind: Kind, scope: Scope, receive: Receive, send: Send) -> None:
        arrival_s = self.clock.now_s()
        headers = header_map(scope["headers"])
        try:
            tenant = tenant_of(headers, self.config.api_keys)
            slo = slo_of(headers, self.config.slo_classes, self.config.default_slo_class)
            parsed = parse_request(kind, await self._read_body(headers, receive),
                                   self.config.served_model_names)
            prompt_tokens, prompt_text = await self._count_prompt(parsed)
            max_tokens = check_length(prompt_tokens, parsed.max_tokens,
                                      self.config.max_model_len)
        except ApiRequestError as e:
            self._refused(e)
            await self._send_error(send, e)
            return
        except _ClientGoneError:
            return
        request = RequestArrived(
            id=f"gw-{uuid.uuid4().hex}", arrival_s=arrival_s, prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, tenant=tenant, slo_class=slo.slo_class,
            prompt_text=published_prompt_text(prompt_text), ttft_slo_ms=slo.ttft_ms,
            tbt_slo_ms=slo.tpot_ms)
        flight = _Flight(request)
        waiter = _Waiter()
        # Registered before the arrival is published: no decision or abort can come first.
        self._waiters[request.id] = waiter
        self._flights[request.id] = flight
        self._in_flight += 1
        try:
            await self.bus.publish_durable(REQUEST_ARRIVED, request,
                                           msg_id=f"arrived-{request.id}")
        except BusError as e:
            self._waiters.pop(request.id, None)
            self._flights.pop(request.id, None)
            self._in_flight -= 1
            # It may have been stored all the same (an ack lost): tell the controller.
            flight.outcome = self._aborted(flight, "shed", f"arrival not acknowledged: {e}")
            self._finish_later(flight)
            err = ApiRequestError(503, "the controller's bus is unavailable; retry later",
                                  type_="server_error", code="bus_unavailable",
                                  headers={"retry-after": "1"})
            self._refused(err)
            await self._send_error(send, err)
            return
        try:
            async with anyio.create_task_group() as tg:
                flight.scope = tg.cancel_scope
                if flight.aborted_by is not None:  # while its arrival was being published
                    tg.cancel_scope.cancel()
                tg.start_soon(self._watch_disconnect, receive, flight, tg.cancel_scope)
                await self._serve(flight, waiter, parsed, send)
                tg.cancel_scope.cancel()
            if flight.aborted_by is not None and flight.outcome is None:
                flight.settled = True
                if not flight.client_gone:
                    await self._answer_aborted(flight, send)
        finally:
            self._waiters.pop(request.id, None)
            self._flights.pop(request.id, None)
            self._ended[request.id] = None
            if len(self._ended) > REMEMBERED_IDS:
                self._ended.popitem(last=False)
            self._in_flight -= 1
            self._finish_later(flight)

    async def _answer_aborted(self, flight: _Flight, send: Send) -> None:
        """Tell the client its request was aborted by the controller (before or during its
        answer)."""
        assert flight.aborted_by is not None
        self.bus.counters[f"gateway.aborted_elsewhere.{flight.aborted_by.cause}"] += 1
        err = ApiRequestError(503, f"the request was aborted ({flight.aborted_by.cause}): "
                                   f"{flight.aborted_by.reason}", type_="server_error",
                              code="aborted", headers={"retry-after": "1"})
        if not flight.response_started:
            await self._send_error(send, err, flight.request.id)
            return
        await send({"type": "http.response.body", "more_body": False,
                    "body": b"data: " + error_body(err) + b"\n\ndata: [DONE]\n\n"})

    async def _watch_disconnect(self, receive: Receive, flight: _Flight,
                                scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                flight.client_gone = True
                scope.cancel()
                return

    def _aborted(self, flight: _Flight, cause: str, reason: str) -> RequestAborted:
        return RequestAborted(id=flight.request.id, decided_s=self.clock.now_s(),
                              instance=flight.instance, cause=cause, reason=reason)

    async def _serve(self, flight: _Flight, waiter: _Waiter, parsed: ParsedRequest,
                     send: Send) -> None:
        async def tracked_send(message: Message) -> None:
            flight.response_started = True
            await send(message)

        try:
            admitted = await self._await_admission(flight, waiter)
            url = self._instance_url(flight, admitted)
            await self._proxy(flight, parsed, url, tracked_send)
        except ApiRequestError as e:
            self.bus.counters[f"gateway.failed.{e.code or e.status}"] += 1
            if not flight.response_started:
                await self._send_error(send, e, flight.request.id)

    async def _await_admission(self, flight: _Flight, waiter: _Waiter) -> RequestAdmitted:
        try:
            with anyio.move_on_after(self.config.queue_timeout_s):
                await waiter.event.wait()
        finally:
            self._waiters.pop(flight.request.id, None)  # no longer waiting, decided or not
        decision = waiter.decision
        if decision is None:
            retry_s = max(1, math.ceil(waiter.retry_after_s))
            flight.outcome = self._aborted(
                flight, "queue-timeout",
                f"not admitted within the gateway's {self.config.queue_timeout_s:g} s")
            raise ApiRequestError(
                503, f"the request was not admitted within {self.config.queue_timeout_s:g} s "
                     f"(every instance is busy within its SLOs); retry after {retry_s} s",
                type_="server_error", code="queue_timeout", headers={"retry-after": str(retry_s)})
        if isinstance(decision, RequestDeferred):
            flight.settled = True
            raise ApiRequestError(400, f"the controller refused the request: {decision.reason}",
                                  code="refused_by_controller")
        flight.instance = decision.instance
        flight.admitted_s = self.clock.now_s()
        pending = flight.abort_if_admitted
        if pending is not None and acts_on_abort(decision.instance, pending):
            flight.aborted_by = pending  # aborted at this instance before we knew it was here
            assert flight.scope is not None
            flight.scope.cancel()
            await anyio.lowlevel.checkpoint()
        elif pending is not None:
            self.bus.counters["gateway.abort_for_other_instance"] += 1
        return decision

    def _instance_url(self, flight: _Flight, admitted: RequestAdmitted) -> str:
        instance = admitted.instance
        url = self.registry.url(instance)
        if url is None:
            flight.outcome = self._aborted(flight, "engine-failed",
                                           f"gateway has no URL for instance {instance!r}")
            raise ApiRequestError(
                502, f"admitted to engine instance {instance!r}, which this gateway has no URL "
                     f"for (known: {sorted(self.registry.urls)}); give it --instance "
                     f"{instance}=URL", type_="server_error", code="unknown_instance")
        if not self.registry.admissible(instance):
            self.bus.counters["gateway.admitted_to_inadmissible"] += 1
            log.warning("gateway.admitted_to_inadmissible", id=flight.request.id,
                        instance=instance, phase=self.registry.phases.get(instance))
        return url

    def _upstream_failed(self, flight: _Flight, message: str) -> ApiRequestError:
        flight.outcome = self._aborted(flight, "engine-failed", message)
        log.warning("gateway.engine_failed", id=flight.request.id, instance=flight.instance,
                    error=message)
        return ApiRequestError(502, f"engine instance {flight.instance!r} failed: {message}",
                               type_="server_error", code="engine_failed")

    async def _proxy(self, flight: _Flight, parsed: ParsedRequest, url: str,
                     send: Send) -> None:
        assert self._http is not None
        headers = {"content-type": "application/json", "x-request-id": flight.request.id}
        if self.config.upstream_api_key:
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        upstream = self._http.build_request("POST", url + UPSTREAM_PATHS[parsed.kind],
                                            content=upstream_body(parsed), headers=headers)
        try:
            response = await self._http.send(upstream, stream=True)
        except httpx.HTTPError as e:
            raise self._upstream_failed(flight, f"{type(e).__name__}: {e}") from e
        try:
            if response.status_code != 200:
                await self._relay_refusal(flight, response, send)
            elif parsed.stream:
                await self._relay_stream(flight, parsed, response, send)
            else:
                await self._relay_body(flight, response, send)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await response.aclose()  # mid-stream, this closes the connection: vLLM aborts

    async def _relay_refusal(self, flight: _Flight, response: httpx.Response,
                             send: Send) -> None:
        try:
            content = await response.aread()
        except httpx.HTTPError as e:
            raise self._upstream_failed(flight, f"{type(e).__name__}: {e}") from e
        status = response.status_code
        if status >= 500:
            raise self._upstream_failed(
                flight, f"HTTP {status}: {content[:500].decode(errors='replace')}")
        # The engine's own 4xx (already OpenAI-shaped): the client's to read, as it is; on
        # the bus, the engine contract's final refusal.
        flight.outcome = RequestDeferred(
            id=flight.request.id, decided_s=self.clock.now_s(), final=True,
            reason=f"{flight.instance}: the engine refused it with HTTP {status}: "
                   f"{content[:300].decode(errors='replace')}")
        await self._send_json(send, status, content, {"x-request-id": flight.request.id})

    def _completed(self, flight: _Flight, output_times_s: list[float], completed_s: float,
                   usage: Usage | None, output_events: int) -> RequestCompleted:
        request = flight.request
        generated = usage.completion_tokens if usage is not None else output_events
        lat = latencies(request.arrival_s, output_times_s, completed_s, generated)
        return RequestCompleted(
            id=request.id, instance=flight.instance, tenant=request.tenant,
            slo_class=request.slo_class, arrival_s=request.arrival_s,
            admitted_s=flight.admitted_s, first_token_s=lat.first_token_s,
            completed_s=completed_s,
            prompt_tokens=usage.prompt_tokens if usage is not None and usage.prompt_tokens
            else request.prompt_tokens,
            generated_tokens=generated, ttft_ms=lat.ttft_ms, tbt_mean_ms=lat.tbt_mean_ms,
            tbt_max_ms=lat.tbt_max_ms, e2e_ms=lat.e2e_ms)

    async def _relay_body(self, flight: _Flight, response: httpx.Response,
                          send: Send) -> None:
        try:
            content = await response.aread()
        except httpx.HTTPError as e:
            raise self._upstream_failed(flight, f"{type(e).__name__}: {e}") from e
        flight.outcome = self._completed(flight, [], self.clock.now_s(),
                                         response_usage(content), 0)
        await self._send_json(send, 200, content, {"x-request-id": flight.request.id})

    async def _relay_stream(self, flight: _Flight, parsed: ParsedRequest,
                            response: httpx.Response, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", flight.request.id.encode())]})
        splitter = SseSplitter()
        output_times: list[float] = []
        usage: Usage | None = None
        error: str | None = None
        done = False
        try:
            async for chunk in response.aiter_raw():
                now_s = self.clock.now_s()
                out: list[bytes] = []
                for payload in splitter.feed(chunk):
                    info = read_chunk(payload)
                    done = done or info.done
                    if info.has_output:
                        output_times.append(now_s)
                    if info.usage is not None:
                        usage = info.usage
                    if info.error is not None:
                        error = info.error
                    if info.usage_only and not parsed.wants_usage:
                        continue  # asked for by the gateway, not by the client
                    out += (b"data: ", payload, b"\n\n")
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out),
                                "more_body": True})
        except httpx.HTTPError as e:
            error = f"the stream broke: {type(e).__name__}: {e}"
        if error is None and not done:
            error = "the stream ended without [DONE]"
        if error is not None:
            err = self._upstream_failed(flight, error)
            tail = b"data: " + error_body(err) + b"\n\n"
            if not done:
                tail += b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return
        # Completed when its last token arrived (the usage chunk and [DONE] that follow are
        # bookkeeping), so E2E and the mean gap between tokens agree, as the engine contract
        # has them.
        flight.outcome = self._completed(
            flight, output_times, output_times[-1] if output_times else self.clock.now_s(),
            usage, len(output_times))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # ------------------------------------------------------------------ outcomes

    def _finish_later(self, flight: _Flight) -> None:
        """Publish the outcome off the request's path (the client has its answer)."""
        if self._tg is None:
            log.error("gateway.outcome_lost", id=flight.request.id)
            return
        self._tg.start_soon(self._finish, flight)

    async def _finish(self, flight: _Flight) -> None:
        """Publish how the request ended: completed, refused by its engine (a final
        deferral, as the engine contract has it) or aborted, so the controller forgets it.
        Nothing for a request already settled on the bus (refused by the controller, or
        aborted by someone else)."""
        if flight.settled:
            return
        outcome = flight.outcome
        if outcome is None:
            cause, reason = (("client-disconnected", "the client went away") if
                             flight.client_gone else ("shed", "the gateway stopped"))
            outcome = self._aborted(flight, cause, reason)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                if isinstance(outcome, RequestCompleted):
                    await self.bus.publish_durable(REQUEST_COMPLETED, outcome,
                                                   msg_id=f"done-{outcome.id}")
                    self.bus.counters["gateway.completed"] += 1
                elif isinstance(outcome, RequestDeferred):
                    await self.bus.publish_durable(REQUEST_DEFERRED, outcome,
                                                   msg_id=f"rejected-{outcome.id}")
                    self.bus.counters["gateway.refused_by_engine"] += 1
                else:
                    await self.bus.publish_durable(REQUEST_ABORTED, outcome,
                                                   msg_id=f"aborted-{outcome.id}")
                    self.bus.counters[f"gateway.aborted.{outcome.cause}"] += 1
                    log.info("gateway.aborted", id=outcome.id, instance=outcome.instance,
                             cause=outcome.cause, reason=outcome.reason)
            except BusError as e:
                self.bus.counters["gateway.publish_failed"] += 1
                log.error("gateway.publish_failed", id=outcome.id, error=str(e))

    # ------------------------------------------------------------------ app

    def app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        def proxy(kind: Kind) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
            async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
                await self._generate(kind, scope, receive, send)
            return _AsgiEndpoint(endpoint)

        async def models(_: Request) -> Response:
            data = [{"id": name, "object": "model", "created": self._started_wall,
                     "owned_by": "throttllem", "max_model_len": self.config.max_model_len}
                    for name in self.config.served_model_names]
            return JSONResponse({"object": "list", "data": data})

        async def health(_: Request) -> Response:
            connected = self._bus is not None and self._bus.nc.is_connected
            return JSONResponse({"status": "ok" if connected else "bus-disconnected",
                                 "instances": self.registry.describe(),
                                 **self.health_metrics()}, status_code=200 if connected else 503)

        async def http_error(_: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            err = ApiRequestError(status, exc.detail if isinstance(exc, HTTPException)
                                  else "internal error", code=str(status))
            return Response(error_body(err), status_code=status, media_type="application/json")

        routes = [Route("/v1/completions", proxy("completions"), methods=["POST"]),
                  Route("/v1/chat/completions", proxy("chat"), methods=["POST"]),
                  Route("/v1/models", models, methods=["GET"]),
                  Route("/health", health, methods=["GET"])]
        starlette = Starlette(routes=routes,
                              exception_handlers={404: http_error, 405: http_error})
        direct: dict[str, Kind] = {"/v1/completions": "completions",
                                   "/v1/chat/completions": "chat"}

        async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
            # The proxy endpoints skip Starlette's middleware: it would wrap every relayed
            # event's send in three more layers. Everything else is Starlette's.
            kind = (direct.get(scope.get("path", "")) if scope["type"] == "http"
                    and scope.get("method") == "POST" else None)
            if kind is not None:
                await self._generate(kind, scope, receive, send)
            else:
                await starlette(scope, receive, send)

        return dispatch

    # ------------------------------------------------------------------ running

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets that say
        # so, and without it a stream's small events wait on Nagle's algorithm (~40 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited on accept
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"the gateway cannot listen on {self.config.host}:"
                              f"{self.config.port}: {e.strerror or e}") from e
        self.port = sock.getsockname()[1]
        self.listening = sock
        return sock

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._bus, self._clock = bus, clock
        await bus.ensure_request_stream()
        await bus.subscribe(REQUEST_ADMITTED_ALL, REQUEST_CODEC, self._on_decision)
        await bus.subscribe(REQUEST_DEFERRED, REQUEST_CODEC, self._on_decision)
        await bus.subscribe(REQUEST_ABORTED, REQUEST_CODEC, self._on_aborted)
        await bus.subscribe(SCALE_TARGET, SCALE_CODEC, self._on_scale)
        sock = self._bind()
        server = _Server(uvicorn.Config(
            self.app(), http="httptools", lifespan="off", log_config=None, access_log=False,
            proxy_headers=False,  # nothing reads the client's address
            timeout_graceful_shutdown=max(1, math.ceil(self.config.shutdown_grace_s)),
            # Clients' idle connections must expire before ours do (httpx's and the OpenAI
            # SDK's pools keep them 5 s, uvicorn's default too): a request sent on a connection
            # the server is closing at that instant fails with a connection error.
            timeout_keep_alive=75, backlog=4096))
        # Idle connections expire well before the engine's own keep-alive timeout (uvicorn's
        # and vLLM's default is 5 s): a request sent on a connection the engine is closing at
        # that instant would fail as if the engine had.
        transport = UpstreamTransport(keepalive_expiry_s=2.0)
        timeout = httpx.Timeout(None, connect=self.config.connect_timeout_s)
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as http, \
                anyio.create_task_group() as tg:
            self._http, self._tg = http, tg

            async def serve() -> None:
                # Shielded: a stop asks uvicorn to finish its connections, not to vanish.
                with anyio.CancelScope(shield=True):
                    await server.serve(sockets=[sock])

            tg.start_soon(serve)
            try:
                while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, no event
                    await anyio.sleep(0.01)
                log.info("gateway.listening", host=self.config.host, port=self.port,
                         models=list(self.config.served_model_names),
                         instances=self.registry.urls)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
        self._tg = None


class _AsgiEndpoint:
    """An ASGI app Starlette routes to as is (a plain function would be wrapped as a
    request/response endpoint)."""

    def __init__(self, fn: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._fn = fn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._fn(scope, receive, send)


def default_max_model_len(model_dir: Path) -> int:
    """The context window vLLM derives for a model folder: config.json's
    `max_position_embeddings` (pass --max-model-len where the engine runs with less)."""
    path = Path(model_dir) / "config.json"
    try:
        config = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError) as e:
        raise ConfigError(f"cannot read {path} for the context length ({e}); pass "
                          f"--max-model-len") from e
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if not isinstance(value, int) or value < 2:
        raise ConfigError(f"{path} has no max_position_embeddings; pass --max-model-len")
    return value


def read_api_keys(path: Path) -> dict[str, str]:
    """API keys from a file of `KEY=TENANT` lines (`#` comments, blank lines ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the API keys file {path}: {e.strerror or e}") from e
    keys: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, tenant = line.partition("=")
        if not sep or not key.strip() or not tenant.strip():
            raise ConfigError(f"{path}:{n}: expected KEY=TENANT")
        keys[key.strip()] = tenant.strip()
    if not keys:
        raise ConfigError(f"{path} holds no KEY=TENANT line")
    return keys

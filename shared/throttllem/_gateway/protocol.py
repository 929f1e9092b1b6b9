"""The gateway's pure logic: what a request asks for, whether it is valid, how errors look,
and what an upstream's server-sent events say about token timing.

Nothing here does I/O or reads a clock: the service passes bytes, headers and instants in
and gets typed values (or an `ApiRequestError` carrying OpenAI's error shape) out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from throttllem._errors import ApiRequestError

Kind = Literal["completions", "chat"]

SLO_CLASS_HEADER: Final = "x-throttllem-slo-class"
TENANT_HEADER: Final = "x-throttllem-tenant"
# llm-d's per-request latency bounds (milliseconds).
TTFT_HEADER: Final = "x-slo-ttft-ms"
TPOT_HEADER: Final = "x-slo-tpot-ms"


# --------------------------------------------------------------------------- errors


def error_body(err: ApiRequestError) -> bytes:
    """OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`."""
    return msgspec.json.encode({"error": {"message": err.message, "type": err.type,
                                          "param": err.param, "code": err.code}})


def bad_request(message: str, *, code: str | None = None,
                param: str | None = None) -> ApiRequestError:
    return ApiRequestError(400, message, code=code, param=param)


# --------------------------------------------------------------------------- headers


def header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers as a dict with lower-case names (the last of repeated headers wins)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def tenant_of(headers: Mapping[str, str], api_keys: Mapping[str, str]) -> str:
    """The tenant a request bills to.

    With API keys configured, the key decides (a client cannot name another tenant) and a
    missing or unknown key is refused; without, the `x-throttllem-tenant` header or
    "default".
    """
    if api_keys:
        auth = headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        tenant = api_keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise ApiRequestError(401, "missing or unknown API key (send "
                                       "`Authorization: Bearer <key>`)",
                                  code="invalid_api_key")
        return tenant
    return headers.get(TENANT_HEADER, "").strip() or "default"


def _positive_ms(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise bad_request(f"header {name} must be a positive number of milliseconds, "
                          f"not {raw!r}", code="invalid_slo_header", param=name)
    return value


@dataclass(frozen=True, slots=True)
class SloRequest:
    """The SLO a request asks for: a class, optionally tightened by per-request bounds."""

    slo_class: str
    ttft_ms: float | None = None
    tpot_ms: float | None = None


def slo_of(headers: Mapping[str, str], known_classes: frozenset[str],
           default_class: str = "standard") -> SloRequest:
    """The SLO class header (one the controller knows) and llm-d's bound headers."""
    slo_class = headers.get(SLO_CLASS_HEADER, "").strip() or default_class
    if slo_class not in known_classes:
        raise bad_request(f"unknown SLO class {slo_class!r} in {SLO_CLASS_HEADER}; known: "
                          f"{sorted(known_classes)}", code="unknown_slo_class",
                          param=SLO_CLASS_HEADER)
    return SloRequest(slo_class=slo_class, ttft_ms=_positive_ms(headers, TTFT_HEADER),
                      tpot_ms=_positive_ms(headers, TPOT_HEADER))


# --------------------------------------------------------------------------- bodies


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a request asks the model to continue: text, chat messages, or token ids."""

    text: str | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    kind: Kind
    body: dict[str, Any]
    model: str
    prompt: Prompt
    stream: bool
    max_tokens: int | None  # None: as many as the context leaves
    wants_usage: bool  # a streaming client asked for the final usage chunk itself


def _text_of_content(content: Any, where: str) -> str:
    """A chat message's content as text (a list of text parts is joined with newlines, as
    vLLM does for text-only models)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}: only text content parts are served "
                                  f"({{\"type\": \"text\", \"text\": ...}})", param="messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{where}: content must be a string or a list of text parts",
                      param="messages")


def _messages(value: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise bad_request("`messages` must be a non-empty list", param="messages")
    out: list[Mapping[str, Any]] = []
    for n, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{n}] must be an object with a string `role`",
                              param="messages")
        out.append({**message, "content": _text_of_content(message.get("content"),
                                                           f"messages[{n}]")})
    return tuple(out)


def _prompt(value: Any) -> Prompt:
    if isinstance(value, str):
        return Prompt(text=value)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        return _prompt(value[0])  # a batch of one
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        return Prompt(token_ids=tuple(value))
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str | list)
                                                          for v in value):
        raise bad_request("the gateway serves one prompt per request (send a batch as "
                          "separate requests, so that each is admitted on its own)",
                          param="prompt")
    raise bad_request("`prompt` must be a string, a list of token ids, or a list of one of "
                      "those", param="prompt")


def _max_tokens(body: Mapping[str, Any], kind: Kind) -> int | None:
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"`{name}` must be an integer", param=name)
        if value <= 0:
            raise bad_request(f"`{name}` must be at least 1, not {value}", param=name)
        return value
    return None


def parse_request(kind: Kind, raw: bytes, served_models: Sequence[str]) -> ParsedRequest:
    """Decode and check a completions or chat request body (malformed JSON, missing fields,
    unknown model, `max_tokens` ≤ 0 are refused with OpenAI-shaped errors)."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required", param="model")
    if model not in served_models:
        raise ApiRequestError(404, f"the model {model!r} does not exist; served: "
                                   f"{list(served_models)}", code="model_not_found",
                              param="model")
    prompt = _messages(body.get("messages")) if kind == "chat" else None
    parsed_prompt = Prompt(messages=prompt) if prompt is not None else _prompt(body.get("prompt"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("`stream` must be true or false", param="stream")
    options = body.get("stream_options")
    wants_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return ParsedRequest(kind=kind, body=body, model=model, prompt=parsed_prompt, stream=stream,
                         max_tokens=_max_tokens(body, kind), wants_usage=wants_usage)


def check_length(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The tokens the request may generate, or a 400 as vLLM words it: the prompt and the
    completion must fit the context window together."""
    if prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_tokens} tokens, which leaves no room for a completion.",
            code="context_length_exceeded", param="messages")
    if max_tokens is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion).", code="context_length_exceeded",
            param="max_tokens")
    return max_tokens


# NATS refuses messages over its max_payload (1 MiB by default); a prompt that fits a long
# context window can be larger, so `request.arrived` carries at most this much of its text.
PROMPT_TEXT_MAX_CHARS: Final = 100_000


def published_prompt_text(text: str | None) -> str | None:
    """The prompt text `request.arrived` carries: the whole prompt, or its first
    PROMPT_TEXT_MAX_CHARS characters (its token count is always the whole prompt's)."""
    return None if text is None else text[:PROMPT_TEXT_MAX_CHARS]


def upstream_body(parsed: ParsedRequest) -> bytes:
    """What goes to the engine: the client's body, asking a stream for its final usage chunk
    (the gateway counts generated tokens from it) when the client did not."""
    if not parsed.stream or parsed.wants_usage:
        return msgspec.json.encode(parsed.body)
    options = dict(parsed.body.get("stream_options") or {})
    options["include_usage"] = True
    return msgspec.json.encode({**parsed.body, "stream_options": options})


# --------------------------------------------------------------------------- server-sent events


class SseSplitter:
    """Splits a byte stream of server-sent events into each event's `data` payload."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk
        *events, self._buffer = self._buffer.split(b"\n\n")
        payloads = []
        for event in events:
            data = [line[5:].lstrip(b" ") for line in event.split(b"\n")
                    if line.startswith(b"data:")]
            if data:
                payloads.append(b"\n".join(data))
        return payloads

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet ended (an upstream that stops mid-event leaves some)."""
        return self._buffer


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: Usage | None = None
    error: Any = None


_chunk_decoder: Final = msgspec.json.Decoder(_Chunk)


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """What one streamed event says: whether it carries generated output, its usage, an
    error the engine reported in the stream, and whether it is the final `[DONE]`."""

    has_output: bool = False
    usage: Usage | None = None
    error: str | None = None
    done: bool = False
    usage_only: bool = False  # no choices, just the usage the gateway asked for


def read_chunk(payload: bytes) -> ChunkInfo:
    if payload.strip() == b"[DONE]":
        return ChunkInfo(done=True)
    try:
        chunk = _chunk_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return ChunkInfo(error=f"unreadable event from the engine: {e}")
    has_output = any(
        bool(c.text) or (c.delta is not None and bool(
            c.delta.content or c.delta.reasoning_content or c.delta.reasoning
            or c.delta.tool_calls))
        for c in chunk.choices)
    error = None if chunk.error is None else str(chunk.error)
    return ChunkInfo(has_output=has_output, usage=chunk.usage, error=error,
                     usage_only=not chunk.choices and chunk.usage is not None)


class _Response(msgspec.Struct):
    usage: Usage | None = None


_response_decoder: Final = msgspec.json.Decoder(_Response)


def response_usage(body: bytes) -> Usage | None:
    """The usage of a non-streamed response (None if it has none or does not decode)."""
    try:
        return _response_decoder.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# --------------------------------------------------------------------------- latencies


@dataclass(frozen=True, slots=True)
class Latencies:
    first_token_s: float
    ttft_ms: float
    tbt_mean_ms: float
    tbt_max_ms: float
    e2e_ms: float


def latencies(arrival_s: float, output_times_s: Sequence[float], completed_s: float,
              generated_tokens: int) -> Latencies:
    """Latencies as the client saw them, from the instants events with output arrived.

    TTFT runs from arrival at the gateway (queueing included) to the first output; the mean
    time between tokens spreads first-to-last over the tokens after the first (an event may
    carry several tokens); the largest gap is between consecutive output events. Without
    any output event (a non-streamed answer), the first token came with the last.
    """
    first = output_times_s[0] if output_times_s else completed_s
    last = output_times_s[-1] if output_times_s else completed_s
    gaps = [b - a for a, b in itertools.pairwise(output_times_s)]
    mean = (last - first) / (generated_tokens - 1) if generated_tokens > 1 else 0.0
    return Latencies(first_token_s=first, ttft_ms=(first - arrival_s) * 1e3,
                     tbt_mean_ms=mean * 1e3, tbt_max_ms=max(gaps, default=0.0) * 1e3,
                     e2e_ms=(completed_s - arrival_s) * 1e3)

"""The gateway's pure logic: request checks, headers, error shapes, server-sent events,
latencies, instance registry, and prompt counting with a real (locally trained) tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from throttllem._errors import ApiRequestError, ConfigError
from throttllem._gateway.instances import (
    InstanceRegistry,
    parse_instances,
    phases_of,
    read_instances_file,
)
from throttllem._gateway.protocol import (
    PROMPT_TEXT_MAX_CHARS,
    SseSplitter,
    check_length,
    error_body,
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
from throttllem.testing import write_test_tokenizer as write_tokenizer

MODELS = ("tiny",)
CLASSES = frozenset({"standard", "interactive", "batch"})


def refusal(fn: object, *args: object) -> ApiRequestError:
    assert callable(fn)
    with pytest.raises(ApiRequestError) as info:
        fn(*args)
    return info.value


def test_error_body_is_openai_shaped() -> None:
    body = json.loads(error_body(ApiRequestError(400, "bad", code="c", param="p")))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error",
                              "param": "p", "code": "c"}}


@pytest.mark.parametrize(("raw", "status", "code", "param"), [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (b'{"prompt": "hi"}', 400, None, "model"),
    (b'{"model": "gpt-4", "prompt": "hi"}', 404, "model_not_found", "model"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 0}', 400, None, "max_tokens"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": -3}', 400, None, "max_tokens"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": "9"}', 400, None, "max_tokens"),
    (b'{"model": "tiny", "prompt": 5}', 400, None, "prompt"),
    (b'{"model": "tiny", "prompt": ["a", "b"]}', 400, None, "prompt"),
    (b'{"model": "tiny", "prompt": "hi", "stream": "yes"}', 400, None, "stream"),
])
def test_bad_completion_bodies_are_refused(raw: bytes, status: int, code: str | None,
                                           param: str | None) -> None:
    err = refusal(parse_request, "completions", raw, MODELS)
    assert (err.status, err.code, err.param) == (status, code, param)
    assert err.message


@pytest.mark.parametrize("messages", [
    "[]", '"hi"', '[{"content": "no role"}]',
    '[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
    '[{"role": "user", "content": 7}]',
])
def test_bad_chat_messages_are_refused(messages: str) -> None:
    raw = f'{{"model": "tiny", "messages": {messages}}}'.encode()
    assert refusal(parse_request, "chat", raw, MODELS).param == "messages"


def test_requests_parse_to_what_they_ask() -> None:
    chat = parse_request("chat", msgspec.json.encode({
        "model": "tiny", "stream": True, "max_tokens": 99, "max_completion_tokens": 7,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}]}), MODELS)
    assert chat.stream
    assert not chat.wants_usage
    assert chat.max_tokens == 7  # max_completion_tokens wins, as in OpenAI's API
    assert chat.prompt.messages == ({"role": "user", "content": "a\nb"},)
    ids = parse_request("completions", b'{"model": "tiny", "prompt": [[1, 2, 3]]}', MODELS)
    assert ids.prompt.token_ids == (1, 2, 3)
    assert ids.max_tokens is None
    one = parse_request("completions", b'{"model": "tiny", "prompt": ["once"]}', MODELS)
    assert one.prompt.text == "once"


def test_upstream_body_asks_a_stream_for_its_usage() -> None:
    parsed = parse_request("completions", b'{"model": "tiny", "prompt": "x", "stream": true}',
                           MODELS)
    assert msgspec.json.decode(upstream_body(parsed))["stream_options"] == {
        "include_usage": True}
    plain = parse_request("completions", b'{"model": "tiny", "prompt": "x"}', MODELS)
    assert "stream_options" not in msgspec.json.decode(upstream_body(plain))
    asked = parse_request("completions", b'{"model": "tiny", "prompt": "x", "stream": true, '
                                         b'"stream_options": {"include_usage": true}}', MODELS)
    assert asked.wants_usage


def test_the_context_window_holds_prompt_and_completion() -> None:
    assert check_length(100, None, 512) == 412  # as many as the window leaves
    assert check_length(100, 412, 512) == 412
    assert refusal(check_length, 100, 413, 512).code == "context_length_exceeded"
    too_long = refusal(check_length, 512, None, 512)
    assert too_long.code == "context_length_exceeded"
    assert "512 tokens" in too_long.message


def test_published_prompt_text_fits_a_nats_message() -> None:
    assert published_prompt_text(None) is None
    assert published_prompt_text("short") == "short"
    long = published_prompt_text("é" * (PROMPT_TEXT_MAX_CHARS + 10))
    assert long is not None
    assert len(long) == PROMPT_TEXT_MAX_CHARS
    assert len(long.encode()) < 1 << 20  # NATS's default max_payload


def test_tenant_from_key_or_header() -> None:
    assert tenant_of({}, {}) == "default"
    assert tenant_of({"x-throttllem-tenant": "acme"}, {}) == "acme"
    keys = {"sk-a": "acme"}
    assert tenant_of({"authorization": "Bearer sk-a", "x-throttllem-tenant": "evil"},
                     keys) == "acme"  # with keys, the key decides
    for headers in ({}, {"authorization": "Bearer sk-b"}, {"authorization": "Basic sk-a"}):
        err = refusal(tenant_of, headers, keys)
        assert (err.status, err.code) == (401, "invalid_api_key")


def test_slo_class_and_llm_d_bounds() -> None:
    assert slo_of({}, CLASSES).slo_class == "standard"
    slo = slo_of({"x-throttllem-slo-class": "interactive", "x-slo-ttft-ms": "250",
                  "x-slo-tpot-ms": "20.5"}, CLASSES)
    assert (slo.slo_class, slo.ttft_ms, slo.tpot_ms) == ("interactive", 250.0, 20.5)
    assert refusal(slo_of, {"x-throttllem-slo-class": "gold"}, CLASSES).code == \
        "unknown_slo_class"
    for bad in ("0", "-5", "nan", "inf", "fast"):
        assert refusal(slo_of, {"x-slo-tpot-ms": bad}, CLASSES).param == "x-slo-tpot-ms"


def test_sse_events_are_split_across_arbitrary_chunks() -> None:
    stream = (b'data: {"choices": [{"text": "a"}]}\n\n'
              b'data: {"choices": [{"text": ""}]}\r\n\r\n'
              b': a comment\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
              b'\n\ndata: [DONE]\n\n')
    for size in (1, 7, len(stream)):
        splitter = SseSplitter()
        payloads = [p for i in range(0, len(stream), size)
                    for p in splitter.feed(stream[i:i + size])]
        assert [read_chunk(p).has_output for p in payloads] == [True, False, False, False]
        assert read_chunk(payloads[2]).usage_only
        assert read_chunk(payloads[2]).usage == response_usage(
            b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
        assert read_chunk(payloads[3]).done
        assert splitter.pending == b""


def test_chunks_with_output_errors_and_garbage() -> None:
    assert read_chunk(b'{"choices": [{"delta": {"role": "assistant", "content": ""}}]}') \
        .has_output is False
    assert read_chunk(b'{"choices": [{"delta": {"content": "x"}}]}').has_output
    assert read_chunk(b'{"choices": [{"delta": {"reasoning_content": "hm"}}]}').has_output
    assert read_chunk(b'{"error": {"message": "boom"}}').error is not None
    assert read_chunk(b"{oops").error is not None
    assert response_usage(b"not json") is None


def test_latencies_from_output_instants() -> None:
    lat = latencies(10.0, [10.5, 10.6, 10.9], 11.0, generated_tokens=4)
    assert lat.ttft_ms == pytest.approx(500.0)
    assert lat.tbt_mean_ms == pytest.approx(400.0 / 3)  # first to last over 3 later tokens
    assert lat.tbt_max_ms == pytest.approx(300.0)
    assert lat.e2e_ms == pytest.approx(1000.0)
    whole = latencies(10.0, [], 12.0, generated_tokens=5)  # not streamed: all at the end
    assert (whole.ttft_ms, whole.tbt_max_ms) == pytest.approx((2000.0, 0.0))


def test_instances_and_scaler_phases() -> None:
    urls = parse_instances(["i0=http://127.0.0.1:8000/", "i1=https://e1:9/x"])
    assert urls == {"i0": "http://127.0.0.1:8000", "i1": "https://e1:9/x"}
    for bad in (["i0"], ["i0=ftp://x"], ["a.b=http://x"], ["i0=http://x", "i0=http://y"]):
        with pytest.raises(ConfigError):
            parse_instances(bad)
    reason = "drain i1: load fell; warming=i2 active=i0 draining=i1"
    assert phases_of(reason) == {"i2": "warming", "i0": "active", "i1": "draining"}
    registry = InstanceRegistry(urls)
    assert registry.admissible("i1")  # no scaler heard from: every instance serves
    registry.on_scale_target(reason)
    assert registry.admissible("i0")
    assert not registry.admissible("i1")
    registry.on_scale_target("a reason without phases")  # keeps what it knew
    assert not registry.admissible("i1")


# --------------------------------------------------------------------------- tokenizer

def test_prompt_counter_counts_as_the_tokenizer_and_template_do(tmp_path: Path) -> None:
    counter = PromptCounter.load(write_tokenizer(tmp_path / "m"))
    plain = counter.tokenizer.encode("the lazy dog", add_special_tokens=False).ids
    assert counter.count_text("the lazy dog") == len(plain) + 1  # BOS, as the engine adds
    rendered = counter.render_chat([{"role": "user", "content": "the lazy dog"}])
    assert rendered == "<s><|user|>the lazy dog</s><|assistant|>"
    assert counter.count_text(rendered, add_special_tokens=False) == len(
        counter.tokenizer.encode(rendered, add_special_tokens=False).ids)


def test_prompt_counter_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        PromptCounter.load(tmp_path)
    bare = PromptCounter.load(write_tokenizer(tmp_path / "bare", template=None))
    assert refusal(bare.render_chat, [{"role": "user", "content": "x"}]).code == \
        "no_chat_template"
    strict = PromptCounter.load(write_tokenizer(
        tmp_path / "strict", template="{{ raise_exception('system role not supported') }}"))
    assert "system role not supported" in refusal(
        strict.render_chat, [{"role": "system", "content": "x"}]).message


def test_instances_file(tmp_path: Path) -> None:
    path = tmp_path / "instances"
    path.write_text("# engines\ni0=http://10.0.0.5:8000\n\n  i1=http://10.0.0.6:8000  \n")
    assert parse_instances(read_instances_file(path)) == {
        "i0": "http://10.0.0.5:8000", "i1": "http://10.0.0.6:8000"}
    with pytest.raises(ConfigError, match="cannot read"):
        read_instances_file(tmp_path / "missing")

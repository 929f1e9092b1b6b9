"""A real vLLM (CPU build) on the tiny model, with the throttLL'eM scheduler: every engine
step arrives as `engine.iteration.<instance>` over a real nats-server, agrees with vLLM's own
Prometheus counters, and names the request ids the client sent."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._events import ENGINE_CODEC, EngineIteration
from throttllem._subjects import engine_iteration
from throttllem.testing import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.timeout(900)]  # the first test also starts the session's vLLM

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)$")


def scrape(server: VllmServer) -> dict[str, float]:
    """vLLM's /metrics, every sample summed over its labels."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
        text = r.read().decode()
    totals: dict[str, float] = Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            totals[m["name"]] += float(m["value"])
    return totals


@pytest.mark.anyio
async def test_iterations_match_vllms_counters_and_carry_our_request_ids(
        vllm: VllmServer, session_nats: EmbeddedNatsServer) -> None:
    openai = pytest.importorskip("openai")
    bus = await Bus.connect(session_nats.url, name="test-vllm-iterations")
    events: list[EngineIteration] = []

    async def on_iteration(event: EngineIteration) -> None:
        events.append(event)

    await bus.subscribe(engine_iteration(vllm.instance), ENGINE_CODEC, on_iteration)
    await bus.sync()
    before = scrape(vllm)
    client = openai.AsyncOpenAI(base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0)
    words = ["please", "explain", "the", "energy", "of", "a", "server", "clock", "in", "one",
             "short", "story"]
    # Eight concurrent requests of different lengths, completions and chat, streamed and not.
    plan = {f"req-{k}": (4 + 3 * k, 1 + k % 5) for k in range(8)}  # id -> (tokens, prompt words)
    usage: dict[str, int] = {}

    async def one(request_id: str, max_tokens: int, n_words: int, k: int) -> None:
        prompt = " ".join(words[:n_words + 3])
        headers = {"X-Request-Id": request_id}
        extra = {"ignore_eos": True}
        if k % 2 == 0:
            if k % 4 == 0:
                stream = await client.completions.create(
                    model=vllm.model, prompt=prompt, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_headers=headers,
                    extra_body=extra)
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage[request_id] = chunk.usage.completion_tokens
            else:
                done = await client.completions.create(
                    model=vllm.model, prompt=prompt, max_tokens=max_tokens,
                    extra_headers=headers, extra_body=extra)
                assert done.usage is not None
                usage[request_id] = done.usage.completion_tokens
        else:
            chat = await client.chat.completions.create(
                model=vllm.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens, extra_headers=headers, extra_body=extra)
            assert chat.usage is not None
            usage[request_id] = chat.usage.completion_tokens

    async with anyio.create_task_group() as tg:
        for k, (request_id, (max_tokens, n_words)) in enumerate(plan.items()):
            tg.start_soon(one, request_id, max_tokens, n_words, k)
    await client.close()
    assert usage == {r: tokens for r, (tokens, _) in plan.items()}  # ignore_eos: exact lengths

    after = scrape(vllm)
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    prompt_tokens = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    assert generated == sum(usage.values())

    def seen_tokens() -> int:  # every scheduled request emits one token per step (no chunking)
        return sum(e.batch_size for e in events)

    with anyio.fail_after(30):  # events are fire-and-forget: wait until the last ones land
        while seen_tokens() < generated:
            await anyio.sleep(0.05)
    await bus.close()

    # The events agree with vLLM's own counters.
    assert seen_tokens() == generated
    assert sum(e.prefill_tokens for e in events) == prompt_tokens
    assert sum(e.decode_tokens for e in events) == generated - len(plan)  # first token: prefill
    # vLLM's histogram of tokens per iteration adds prompt and generated tokens.
    iteration_tokens = (after["vllm:iteration_tokens_total_sum"]
                        - before["vllm:iteration_tokens_total_sum"])
    assert iteration_tokens == prompt_tokens + generated

    # Each request appears under the id we sent, once per token it generated.
    per_request = Counter(r for e in events for r in e.request_ids)
    assert per_request == Counter(usage)
    # The contract: sequence numbers rise, counts add up, KV use within the pool, no energy.
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs)
    for e in events:
        assert e.instance == vllm.instance
        assert e.batch_size == len(e.request_ids) == len(e.request_tokens)
        assert e.prefill_tokens + e.decode_tokens == sum(e.request_tokens)
        assert 0 < e.kv_blocks_used <= e.kv_blocks_total
        assert e.energy_mj == 0.0

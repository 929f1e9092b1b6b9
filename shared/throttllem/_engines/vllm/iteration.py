"""Pure pieces of the vLLM adapter (no vLLM import): our request id from vLLM's internal one,
and one scheduler step as an `engine.iteration` event."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from throttllem._events import EngineIteration

# vLLM's OpenAI server builds its engine request id from the `X-Request-Id` header:
# completions `cmpl-<id>-<prompt index>`, chat `chatcmpl-<id>`; `n > 1` makes children
# `<child index>_<parent id>`; the engine then appends `-<8 random hex>` for uniqueness
# (unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set).
_CHILD = re.compile(r"^\d+_(?=(?:chat)?cmpl-)")
_RANDOM_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
_PROMPT_INDEX = re.compile(r"-\d+$")


def our_request_id(vllm_id: str, *, randomized: bool = True) -> str:
    """The id the gateway sent as `X-Request-Id`, from the id vLLM's scheduler sees.

    An id of another shape (a request not sent through the OpenAI server) is returned whole,
    so it never matches one of ours by accident.
    """
    rest = _CHILD.sub("", vllm_id, count=1)
    if randomized:
        if not _RANDOM_SUFFIX.search(rest):
            return vllm_id
        rest = rest[:-9]
    if rest.startswith("chatcmpl-"):
        return rest[len("chatcmpl-"):] or vllm_id
    if rest.startswith("cmpl-") and _PROMPT_INDEX.search(rest):
        inner = _PROMPT_INDEX.sub("", rest[len("cmpl-"):], count=1)
        return inner or vllm_id
    return vllm_id


def iteration_event(*, instance: str, seq: int, start_s: float, duration_ms: float,
                    scheduled_tokens: Mapping[str, int], prefill_ids: Collection[str],
                    kv_blocks_used: int, kv_blocks_total: int, queue_len: int,
                    randomized_ids: bool = True) -> EngineIteration:
    """One engine step: every scheduled request with the tokens it processed.

    `prefill_ids` are the requests still in their prompt (new, resumed after preemption, or a
    later chunk of a chunked prefill); every other scheduled request decodes. No GPU reading
    happens here, so clock and energy are 0 (not measured): telemetry attributes measured
    energy from NVML where a GPU exists.
    """
    prefill = decode = 0
    for request_id, tokens in scheduled_tokens.items():
        if request_id in prefill_ids:
            prefill += tokens
        else:
            decode += tokens
    return EngineIteration(
        instance=instance, seq=seq, start_s=start_s, duration_ms=max(duration_ms, 0.0),
        batch_size=len(scheduled_tokens), decode_tokens=decode, prefill_tokens=prefill,
        kv_blocks_used=max(kv_blocks_used, 0), kv_blocks_total=max(kv_blocks_total, 0),
        queue_len=max(queue_len, 0), clock_mhz=0.0, energy_mj=0.0, power_w=0.0,
        request_ids=[our_request_id(r, randomized=randomized_ids) for r in scheduled_tokens],
        request_tokens=list(scheduled_tokens.values()))

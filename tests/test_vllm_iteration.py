"""The vLLM adapter's pure parts and its publisher (no vLLM needed): request ids mapped back
to the gateway's, one step as an event, and a publisher that survives NATS being down."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._engines.vllm.iteration import iteration_event, our_request_id
from throttllem._engines.vllm.publisher import EventPublisher, settings_from_env
from throttllem._errors import ConfigError
from throttllem._events import ENGINE_CODEC, EngineIteration
from throttllem._subjects import engine_iteration


@pytest.mark.parametrize(("vllm_id", "ours"), [
    ("cmpl-q1-0-1a2b3c4d", "q1"),              # completions: prompt index, random suffix
    ("chatcmpl-q1-1a2b3c4d", "q1"),            # chat: random suffix only
    ("cmpl-tenant-a-42-0-deadbeef", "tenant-a-42"),  # our ids may hold dashes and digits
    ("chatcmpl-r-7-00000000", "r-7"),
    ("1_cmpl-q9-0-0123abcd", "q9"),            # n > 1: child index before the parent id
    ("12_x-0-0123abcd", "12_x-0-0123abcd"),    # not an OpenAI-server id: kept whole
    ("cmpl-q1-0", "cmpl-q1-0"),                # no random suffix where one is expected
])
def test_our_request_id_from_vllms(vllm_id: str, ours: str) -> None:
    assert our_request_id(vllm_id) == ours


def test_our_request_id_without_randomization() -> None:
    assert our_request_id("cmpl-q1-0", randomized=False) == "q1"
    assert our_request_id("chatcmpl-q1-1a2b3c4d", randomized=False) == "q1-1a2b3c4d"


def test_a_step_splits_prefill_from_decode_per_request() -> None:
    event = iteration_event(
        instance="v0", seq=3, start_s=100.0, duration_ms=4.5,
        scheduled_tokens={"cmpl-a-0-00000000": 1, "chatcmpl-b-11111111": 37,
                          "cmpl-c-0-22222222": 1},
        prefill_ids={"chatcmpl-b-11111111"}, kv_blocks_used=9, kv_blocks_total=1023,
        queue_len=2)
    assert (event.batch_size, event.decode_tokens, event.prefill_tokens) == (3, 2, 37)
    assert event.request_ids == ["a", "b", "c"]
    assert event.request_tokens == [1, 37, 1]
    assert (event.kv_blocks_used, event.kv_blocks_total, event.queue_len) == (9, 1023, 2)
    # No GPU is read by the adapter: energy is not measured here (0), never modelled.
    assert (event.energy_mj, event.power_w, event.clock_mhz) == (0.0, 0.0, 0.0)


def test_settings_need_an_instance_name() -> None:
    with pytest.raises(ConfigError, match="THROTTLLEM_INSTANCE"):
        settings_from_env({})
    with pytest.raises(ConfigError, match="subject token"):
        settings_from_env({"THROTTLLEM_INSTANCE": "a.b"})
    assert settings_from_env({"THROTTLLEM_INSTANCE": "i0"}) == ("nats://127.0.0.1:4222", "i0")
    assert settings_from_env({"THROTTLLEM_INSTANCE": "i0",
                              "THROTTLLEM_NATS_URL": "nats://h:1"}) == ("nats://h:1", "i0")


def _event(seq: int) -> EngineIteration:
    return iteration_event(instance="p0", seq=seq, start_s=float(seq), duration_ms=1.0,
                           scheduled_tokens={f"cmpl-r{seq}-0-00000000": 1}, prefill_ids=(),
                           kv_blocks_used=1, kv_blocks_total=8, queue_len=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
@pytest.mark.anyio
async def test_publisher_survives_nats_down_then_delivers(tmp_path: Path) -> None:
    """Started before NATS exists: submits return, events are dropped and counted; once a
    server comes up on its URL, later events arrive."""
    port = _free_port()
    publisher = EventPublisher(f"nats://127.0.0.1:{port}", name="test-publisher",
                               reconnect_wait_s=0.1)
    try:
        for seq in range(50):
            publisher.submit(engine_iteration("p0"), _event(seq))
        with anyio.fail_after(10):
            while publisher.counters["dropped_disconnected"] < 50:
                await anyio.sleep(0.05)
        assert publisher.counters["published"] == 0

        with EmbeddedNatsServer(store_dir=tmp_path / "nats", port=port) as server:
            bus = await Bus.connect(server.url, name="test-watcher")
            got: list[EngineIteration] = []

            async def on_iteration(event: EngineIteration) -> None:
                got.append(event)

            await bus.subscribe(engine_iteration("p0"), ENGINE_CODEC, on_iteration)
            await bus.sync()
            seq = 50
            with anyio.fail_after(30):
                while not got:  # until the publisher has connected
                    publisher.submit(engine_iteration("p0"), _event(seq))
                    seq += 1
                    await anyio.sleep(0.1)
            assert got[0].request_ids == [f"r{got[0].seq}"]
            assert publisher.counters["published"] >= 1
            await bus.close()
    finally:
        publisher.close()


def test_submit_after_close_is_counted_not_raised() -> None:
    publisher = EventPublisher("nats://127.0.0.1:1", name="closed", reconnect_wait_s=0.1)
    publisher.close()
    deadline = time.monotonic() + 5
    while publisher._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    publisher.submit(engine_iteration("p0"), _event(0))
    assert publisher.counters["dropped_stopped"] == 1

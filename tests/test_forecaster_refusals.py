"""What the forecaster plans with and forgets: predictions clipped to what the engine can
generate, and requests an engine refuses dropped from the projections (over a real
nats-server), so no ghost pins an instance's clock up."""

from __future__ import annotations

import time

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.controller import POLICIES, Controller
from throttllem._core.placement import (
    EngineShape,
    never_fits,
    planned_lengths,
)
from throttllem._events import (
    RequestAdmitted,
    RequestArrived,
    RequestDeferred,
    RequestEvent,
    RequestPredicted,
)
from throttllem._runtime import Clock
from throttllem._subjects import REQUEST_DEFERRED, REQUEST_PREDICTED
from throttllem.testing import forecaster_service, setup_policy, watch_decisions

SHAPE = EngineShape(kv_block_tokens=16, kv_blocks_total=1000, max_batch=64,
                    max_batched_tokens=4096, kv_watermark_blocks=10)


def test_planned_lengths_are_clipped_to_what_the_engine_can_generate() -> None:
    def plan(prompt: int, max_tokens: int, median: float, upper: float,
             shape: EngineShape = SHAPE) -> tuple[float, float]:
        return planned_lengths(shape, prompt_tokens=prompt, max_tokens=max_tokens,
                               predicted_tokens=median, upper_tokens=upper)

    assert plan(100, 4096, 200.0, 300.0) == (200.0, 300.0)  # nothing to clip
    assert plan(100, 250, 200.0, 300.0) == (200.0, 250.0)  # max_tokens
    assert plan(100, 4096, 500.0, 300.0) == (500.0, 500.0)  # upper never below the median
    # KV cache above the watermark: (1000 − 10) × 16 = 15,840 tokens.
    assert plan(15_000, 4096, 2000.0, 3000.0) == (840.0, 840.0)
    wide = EngineShape(kv_block_tokens=16, kv_blocks_total=100_000, max_batch=64,
                       max_batched_tokens=4096, max_model_len=8192)
    assert plan(8000, 4096, 300.0, 400.0, wide) == (192.0, 192.0)  # the context window
    assert plan(9000, 4096, 300.0, 400.0, wide) == (1.0, 1.0)  # the engine will refuse it
    unbounded = EngineShape(kv_block_tokens=16, kv_blocks_total=100_000, max_batch=64,
                            max_batched_tokens=4096)
    assert plan(8000, 4096, 300.0, 400.0, unbounded) == (300.0, 400.0)


def test_prompts_no_engine_can_hold_are_named() -> None:
    windowed = EngineShape(kv_block_tokens=16, kv_blocks_total=100_000, max_batch=64,
                           max_batched_tokens=4096, max_model_len=8192)
    assert never_fits(windowed, 8191) is None
    assert never_fits(windowed, 8192) == ("prompt of 8192 tokens leaves no room in the "
                                          "8192-token context window")
    assert never_fits(SHAPE, 15_839) is None
    assert never_fits(SHAPE, 15_840) == "prompt of 15840 tokens exceeds the 15840-token KV cache"


def arrived(rid: str, prompt_tokens: int = 100, max_tokens: int = 4096) -> RequestArrived:
    return RequestArrived(id=rid, arrival_s=time.time(), prompt_tokens=prompt_tokens,
                          max_tokens=max_tokens)


def test_a_refused_request_is_not_rebuilt_into_its_tracker() -> None:
    policy, shape = setup_policy()
    history: list[RequestEvent] = [
        RequestAdmitted(request=arrived("a"), instance="i0", decided_s=1.0),
        RequestAdmitted(request=arrived("b"), instance="i0", decided_s=1.0),
        RequestDeferred(id="b", decided_s=1.1, reason="i0: never fits", final=True),
    ]
    controller = Controller(POLICIES["throttllem"], shape=shape, policy=policy)
    controller.add_instance("i0")
    controller.restore(history)
    trackers = controller.trackers
    assert trackers["i0"].requests == ["a"]


@pytest.mark.anyio
@pytest.mark.slow
async def test_an_engine_refusal_frees_the_instance(nats: EmbeddedNatsServer) -> None:
    clock = Clock(epoch_wall_s=0.0)  # event time = Unix time, as the arrivals
    client = await Bus.connect(nats.url, name="engine-stand-in")
    await client.ensure_request_stream()
    decided = await watch_decisions(client)
    service = forecaster_service(instances=["i0"], policy="throttllem")
    bus = await Bus.connect(nats.url, name="forecaster")
    async with anyio.create_task_group() as tg:
        await tg.start(service.run, bus, clock)
        # A prompt past the 8,192-token window: refused at once, holding nobody up.
        await client.publish_durable(REQUEST_PREDICTED, RequestPredicted(
            id="too-long", predicted_tokens=10.0, upper_tokens=20.0, model_version="t",
            request=arrived("too-long", prompt_tokens=9000)))
        # A prompt near the window and a prediction far past it.
        await client.publish_durable(REQUEST_PREDICTED, RequestPredicted(
            id="long", predicted_tokens=5000.0, upper_tokens=9000.0, model_version="t",
            request=arrived("long", prompt_tokens=8000)))
        with anyio.fail_after(10):
            while {"long", "too-long"} - decided.keys():
                await anyio.sleep(0.02)
        long, too_long = decided["long"], decided["too-long"]
        assert isinstance(long, RequestAdmitted)
        assert long.upper_tokens == 192.0  # planned as the engine can serve it
        assert isinstance(too_long, RequestDeferred)  # and never admitted
        assert too_long.final
        assert "leaves no room in the 8192-token context window" in too_long.reason
        assert service.controller.trackers["i0"].requests == ["long"]
        assert service.controller.outstanding["i0"] == 1
        # The engine refuses it for good: the forecaster must let it go.
        await client.publish_durable(REQUEST_DEFERRED, RequestDeferred(
            id="long", decided_s=clock.now_s(), reason="i0: prompt leaves no room",
            final=True))
        with anyio.fail_after(10):
            while service.controller.trackers["i0"].requests:
                await anyio.sleep(0.02)
        assert service.controller.outstanding["i0"] == 0
        assert "long" not in service.controller.placed
        tg.cancel_scope.cancel()
    await bus.close()
    await client.close()

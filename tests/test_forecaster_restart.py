"""The throttLL'eM forecaster rebuilds its view from the request stream after a restart:
admitted-but-unfinished requests are tracked again and deferred requests are not lost."""

from __future__ import annotations

import time

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.controller import POLICIES, Controller
from throttllem._events import (
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestPredicted,
)
from throttllem._runtime import Clock
from throttllem._services.forecaster import ForecasterService
from throttllem._subjects import REQUEST_PREDICTED
from throttllem.testing import crowded_perf, forecaster_service, setup_policy

_, SHAPE = setup_policy()



CROWDED = crowded_perf(3)


def arrived(rid: str) -> RequestArrived:
    return RequestArrived(id=rid, arrival_s=1.0, prompt_tokens=100)


def predicted(rid: str, tokens: float = 50.0) -> RequestPredicted:
    return RequestPredicted(id=rid, predicted_tokens=tokens, upper_tokens=tokens * 1.2,
                            model_version="t", request=arrived(rid))


def test_rebuild_state_from_history() -> None:
    history = [
        predicted("a"), RequestAdmitted(request=arrived("a"), instance="i0", decided_s=1.0,
                                        predicted_tokens=50, upper_tokens=60),
        predicted("b"), RequestAdmitted(request=arrived("b"), instance="i1", decided_s=1.0),
        RequestCompleted(id="b", instance="i1", arrival_s=1, admitted_s=1, first_token_s=1.1,
                         completed_s=2, prompt_tokens=100, generated_tokens=5, ttft_ms=100,
                         tbt_mean_ms=10, tbt_max_ms=12, e2e_ms=1000),
        predicted("c"), RequestDeferred(id="c", decided_s=1.0, reason="full"),
        predicted("d"), RequestDeferred(id="d", decided_s=1.0, reason="full"),
        RequestAdmitted(request=arrived("d"), instance="i0", decided_s=2.0),  # later admitted
        predicted("e"), RequestDeferred(id="e", decided_s=1.0, reason="too long", final=True),
    ]
    policy, _ = setup_policy()
    controller = Controller(POLICIES["throttllem"], shape=SHAPE, policy=policy)
    for name in ("i0", "i1"):
        controller.add_instance(name)
    assert controller.restore(history) == []
    trackers = controller.trackers
    assert sorted(trackers["i0"].requests) == ["a", "d"]
    assert len(trackers["i1"]) == 0  # b completed
    # d was admitted after all; e is final
    assert [w.request.id for w in controller.pending] == ["c"]
    assert controller.outstanding == {"i0": 2, "i1": 0}


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_restarted_forecaster_keeps_its_requests(nats: EmbeddedNatsServer) -> None:
    clock = Clock(epoch_wall_s=time.time())
    producer = await Bus.connect(nats.url, name="predictor")
    await producer.ensure_request_stream()

    async def run_for_a_while(service: ForecasterService, publish: bool) -> None:
        bus = await Bus.connect(nats.url, name="forecaster")
        async with anyio.create_task_group() as tg:
            await tg.start(service.run, bus, clock)
            if publish:
                for n in range(3):
                    await producer.publish_durable(REQUEST_PREDICTED, predicted(f"r{n}"))
                # A fourth request would slow every pass past the TBT bound: deferred.
                await producer.publish_durable(REQUEST_PREDICTED, predicted("fourth"))
            with anyio.fail_after(10):
                while (sum(len(t) for t in service.controller.trackers.values()) < 3
                       or not service.controller.pending):
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        await bus.close()

    first = forecaster_service(instances=["i0"], policy="throttllem", perf=CROWDED)
    await run_for_a_while(first, publish=True)
    second = forecaster_service(instances=["i0"], policy="throttllem", perf=CROWDED)
    await run_for_a_while(second, publish=False)  # nothing new: all from the stream
    await producer.close()
    tracked = sorted(r for t in second.controller.trackers.values() for r in t.requests)
    assert tracked == ["r0", "r1", "r2"]
    assert [w.request.id for w in second.controller.pending] == ["fourth"]

"""Poison messages: a durable message that keeps failing moves to its dead-letter subject
(counted, never looping, never silent: an unserved request gets a final deferral), and the
per-id state that unknown or unfinished ids used to grow for ever is bounded."""

from __future__ import annotations

import time
from functools import partial

import anyio
import pytest
from nats.aio.msg import Msg

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.energy import EnergyLedger
from throttllem._core.scaling import ScalingPolicy
from throttllem._events import (
    REQUEST_CODEC,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
)
from throttllem._runtime import Clock
from throttllem._security import identities
from throttllem._services.scaler import ScalerService
from throttllem._subjects import DEAD_REQUEST, REQUEST_ARRIVED, request_admitted
from throttllem.testing import forecaster_service, watch_decisions


def arrived(rid: str) -> RequestArrived:
    return RequestArrived(id=rid, arrival_s=time.time(), prompt_tokens=20, max_tokens=50)


@pytest.mark.anyio
@pytest.mark.slow
async def test_an_admission_that_keeps_failing_is_dead_lettered_and_finally_deferred(
        nats: EmbeddedNatsServer) -> None:
    forecaster = forecaster_service(instances=["i0"], policy="default")
    fbus = await Bus.connect(nats.url, name="forecaster", service="forecaster")
    ebus = await Bus.connect(nats.url, name="engine", service="engine")
    client = await Bus.connect(nats.url, name="client")
    served: list[str] = []
    attempts: dict[str, int] = {}
    dead: list[Msg] = []

    async def flaky_engine(event: RequestEvent) -> None:
        """An engine stand-in that fails on one request every time (a poison message)."""
        assert isinstance(event, RequestAdmitted)
        attempts[event.request.id] = attempts.get(event.request.id, 0) + 1
        if event.request.id == "poison":
            raise RuntimeError("this request breaks the engine")
        served.append(event.request.id)

    async def on_dead(msg: Msg) -> None:
        dead.append(msg)

    try:
        await client.ensure_request_stream()
        decided = await watch_decisions(client)
        await client.nc.subscribe(DEAD_REQUEST, cb=on_dead)
        async with anyio.create_task_group() as tg:
            await tg.start(forecaster.run, fbus, Clock(epoch_wall_s=0.0))
            await tg.start(partial(
                ebus.consume, durable="flaky-engine", subject=request_admitted("i0"),
                codec=REQUEST_CODEC, handler=flaky_engine, dead_letter_after=3))
            for rid in ("r1", "poison", "r2"):
                await client.publish_durable(REQUEST_ARRIVED, arrived(rid),
                                             msg_id=f"arrived-{rid}")
            with anyio.fail_after(30):
                while not (isinstance(d := decided.get("poison"), RequestDeferred) and d.final):
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert sorted(served) == ["r1", "r2"]  # the others never waited on the poison
        assert attempts["poison"] == 3  # then no more: it does not loop
        assert ebus.counters["dead_lettered.request"] == 1
        assert len(dead) == 1
        headers = dead[0].headers or {}
        assert headers["Tllm-Dead-Subject"] == request_admitted("i0")
        assert headers["Tllm-Dead-Deliveries"] == "3"
        assert "breaks the engine" in headers["Tllm-Dead-Error"]
        poisoned = REQUEST_CODEC.decode(dead[0].data)  # stored as it came
        assert isinstance(poisoned, RequestAdmitted)
        assert poisoned.request.id == "poison"
        final = decided["poison"]
        assert isinstance(final, RequestDeferred)
        assert "dead-lettered" in final.reason
        assert fbus.counters["dead_requests_deferred"] == 1
        assert "poison" not in forecaster.controller.placed  # forgotten, not pinned
    finally:
        for bus in (fbus, ebus, client):
            await bus.close()


def test_every_durable_consumer_may_dead_letter_its_family() -> None:
    matrix = identities(["i0"])
    assert "tllm.v1.dead.request" in matrix["engine-i0"].publish_allow()
    assert "tllm.v1.dead.request" in matrix["telemetry"].publish_allow()
    assert "tllm.v1.dead.energy" in matrix["billing"].publish_allow()
    assert "tllm.v1.dead.dead" in matrix["forecaster"].publish_allow()
    assert not any(".dead." in s for s in matrix["replayer"].publish_allow())


def test_the_energy_ledger_forgets_the_idlest_ids_past_its_bound() -> None:
    ledger = EnergyLedger(max_requests=2)
    ledger.add_iteration(["a", "b"], [1, 1], 10.0)
    ledger.add_iteration(["a"], [1], 4.0)  # a is active again: b is now the idlest
    ledger.add_iteration(["c"], [1], 6.0)
    assert len(ledger) == 2
    assert ledger.evicted == 1
    assert ledger.pop("b") == 0.0
    assert ledger.pop("a") == pytest.approx(9.0)
    assert ledger.unattributed_mj == pytest.approx(5.0)  # b's share, no longer billable
    assert ledger.attributed_mj + ledger.unattributed_mj == pytest.approx(20.0)
    with pytest.raises(ValueError, match="at least one"):
        EnergyLedger(max_requests=0)


@pytest.mark.anyio
async def test_the_scaler_tracks_a_bounded_number_of_ids_and_forgets_ended_ones() -> None:
    scaler = ScalerService(setup="s", policy=ScalingPolicy(capacity_per_instance=1.0),
                           instances=["i0"], max_outstanding=3)
    for n in range(5):  # ids only an iteration names (never admitted, never completed)
        scaler._hold("i0", f"ghost{n}")
    assert scaler.outstanding_counts() == {"i0": 3}
    assert scaler.forgotten == 2
    request = arrived("x")
    await scaler._on_request(RequestAdmitted(request=request, instance="i0", decided_s=0.0))
    await scaler._on_request(RequestAborted(id="x", decided_s=1.0, instance="i0",
                                            cause="client_gone"))
    await scaler._on_request(RequestAdmitted(request=arrived("y"), instance="i0", decided_s=0.0))
    await scaler._on_request(RequestDeferred(id="y", decided_s=1.0, reason="no", final=True))
    assert not {"x", "y"} & set(scaler.outstanding["i0"])
    await scaler._on_request(RequestCompleted(
        id="ghost4", instance="i0", arrival_s=0.0, admitted_s=0.0, first_token_s=0.5,
        completed_s=1.0, prompt_tokens=1, generated_tokens=1, ttft_ms=500.0, tbt_mean_ms=1.0,
        tbt_max_ms=1.0, e2e_ms=1000.0))
    assert "ghost4" not in scaler.outstanding["i0"]

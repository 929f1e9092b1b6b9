"""One controller, two shells: the same event script through the evaluator's shell (the
controller applied to a simulation) and through the live forecaster service (over a real
nats-server) gives the same decisions in the same order.

The script is made on the evaluator's side (its iterations and completions name the requests
the controller admitted there), then replayed on the bus with a clock the test sets. Each
step is: time moves, a tick, the event, a tick. Live, the service ticks on its own, so the
test waits for two ticks after moving the clock and two after the service has handled the
event (a second tick at the same instant changes nothing, so both sides see the same
effective ticks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.controller import Admit, Decision, Defer, Refuse, SetClock
from throttllem._core.perf import FunctionPerfModel
from throttllem._eval.policies import ControlledPolicy, make_policy
from throttllem._eval.sim import Simulation
from throttllem._events import (
    FREQ_CODEC,
    REQUEST_CODEC,
    EngineIteration,
    FreqTarget,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestPredicted,
)
from throttllem._subjects import (
    REQUEST_ARRIVED,
    REQUEST_COMPLETED,
    REQUEST_PREDICTED,
    engine_iteration,
)
from throttllem._twin.profile import load_profile
from throttllem.testing import forecaster_service, setup_policy

INSTANCES = ["i0", "i1"]
T0 = 1_000.0


def _pass_time(batch: npt.NDArray[np.float64], kv: npt.NDArray[np.float64],
               prefill: npt.NDArray[np.float64], clock: npt.NDArray[np.float64],
               ) -> npt.NDArray[np.float64]:
    """Passes slow with the batch and speed up with the clock: a few requests run at the
    floor, more need higher clocks, a dozen per instance fill it (later ones wait)."""
    return np.asarray(0.002 + 0.004 * batch * (1980.0 / clock) + 1e-6 * prefill + 0.0 * kv,
                      np.float64)


PERF = FunctionPerfModel(_pass_time, name="contract")
# Eval policy names for each live policy.
EVAL_NAME = {"throttllem": "freq", "default": "default", "retail": "retail",
             "agft": "agft", "voltana": "voltana"}

Key = tuple[Any, ...]


def key_of(decision: Decision) -> Key:
    match decision:
        case Admit():
            return ("admit", decision.request.id, decision.instance)
        case Defer():
            return ("defer", decision.request_id)
        case Refuse():
            return ("refuse", decision.request_id)
        case SetClock():
            return ("clock", decision.instance, decision.clock_mhz)
    raise AssertionError(decision)


class RecordingPolicy(ControlledPolicy):
    """The evaluator's shell, recording every decision it applies."""

    def __init__(self, inner: ControlledPolicy) -> None:
        self.__dict__.update(inner.__dict__)
        self.recorded: list[Key] = []

    def _apply(self, sim: Simulation, decisions: list[Decision]) -> None:
        self.recorded.extend(key_of(d) for d in decisions)
        super()._apply(sim, decisions)


@dataclass
class Step:
    t: float
    event: RequestArrived | RequestPredicted | EngineIteration | RequestCompleted


def request(k: int) -> RequestArrived:
    # Request 7 has a class no controller knows: refused for good by both.
    return RequestArrived(id=f"r{k}", arrival_s=T0 + 0.1 * k, prompt_tokens=200 + 10 * k,
                          max_tokens=512, slo_class="gold" if k == 7 else "standard")


def run_eval(live_policy: str) -> tuple[list[Step], list[Key]]:
    """Run the script on the evaluator's shell; return the script and its decisions."""
    profile = load_profile("h100-llama3-8b-tp1")
    policy, shape = setup_policy()
    policy = dataclasses.replace(policy, perf=PERF)
    predictions = {f"r{k}": (100.0, 130.0) for k in range(30)}
    name = EVAL_NAME[live_policy]
    inner = make_policy(name, INSTANCES, shape=shape, policy=policy,
                        predictions=predictions if name == "freq" else None)
    shell = RecordingPolicy(inner)
    sim = Simulation(profile, INSTANCES, shell)
    steps: list[Step] = []

    def at(t: float) -> None:
        sim.now_s = t

    def tick(t: float) -> None:
        at(t)
        shell.on_tick(sim)

    tick(T0)
    for k in range(30):
        r = request(k)
        at(r.arrival_s)
        step_event: Any = (RequestPredicted(id=r.id, predicted_tokens=100.0,
                                            upper_tokens=130.0, model_version="t", request=r)
                           if name == "freq" else r)
        steps.append(Step(r.arrival_s, step_event))
        tick(r.arrival_s)
        shell.on_arrival(sim, r)
        tick(r.arrival_s)
    seq = 0
    for round_, round_t in enumerate((T0 + 4.0, T0 + 6.5, T0 + 9.0)):
        # One pass per instance over what the controller placed there, then completions of
        # the oldest requests of each instance.
        for n, instance in enumerate(INSTANCES):
            t = round_t + 0.5 * n
            ids = sorted(i for i, inst in shell.controller.placed.items() if inst == instance)
            seq += 1
            it = EngineIteration(instance=instance, seq=seq, start_s=t - 0.02,
                                 duration_ms=20.0, batch_size=len(ids),
                                 decode_tokens=len(ids), prefill_tokens=0, kv_blocks_used=1,
                                 kv_blocks_total=10, queue_len=0, clock_mhz=1005.0,
                                 request_ids=ids, request_tokens=[1] * len(ids))
            steps.append(Step(t, it))
            tick(t)
            shell.on_iteration(sim, it)
            tick(t)
            for rid in ids[: 4 + round_]:
                done = RequestCompleted(
                    id=rid, instance=instance, arrival_s=T0, admitted_s=T0, first_token_s=t,
                    completed_s=t, prompt_tokens=200, generated_tokens=1, ttft_ms=1.0,
                    tbt_mean_ms=0.0, tbt_max_ms=0.0, e2e_ms=1.0)
                steps.append(Step(t, done))
                tick(t)
                shell.on_completed(sim, done)
                tick(t)
    return steps, shell.recorded


class ManualClock:
    """Event time the test sets (the service reads only `now_s`)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def now_s(self) -> float:
        return self.t


async def run_live(nats: EmbeddedNatsServer, live_policy: str, steps: list[Step]) -> list[Key]:
    clock = ManualClock(T0)
    recorded: list[Key] = []
    recorder = await Bus.connect(nats.url, name="recorder")
    client = await Bus.connect(nats.url, name="script")
    await client.ensure_request_stream()

    async def on_message(msg: Any) -> None:  # one subscription: the publisher's order kept
        if ".freq.target." in msg.subject:
            target = FREQ_CODEC.decode(msg.data)
            assert isinstance(target, FreqTarget)
            clock = None if target.clock_mhz is None else int(target.clock_mhz)
            recorded.append(("clock", target.instance, clock))
            return
        event = REQUEST_CODEC.decode(msg.data)
        if isinstance(event, RequestAdmitted):
            recorded.append(("admit", event.request.id, event.instance))
        elif isinstance(event, RequestDeferred) and event.reason != "test":
            recorded.append(("refuse" if event.final else "defer", event.id))

    await recorder.nc.subscribe("tllm.v1.>", cb=on_message)
    await recorder.sync()
    service = forecaster_service(instances=INSTANCES, policy=live_policy,
                                 perf=PERF if live_policy in ("throttllem", "voltana")
                                 else None,
                                 tick_wall_s=0.005)
    bus = await Bus.connect(nats.url, name="forecaster")

    async def two_ticks() -> None:
        with anyio.fail_after(20):
            ticks = bus.counters["ticks"]
            while bus.counters["ticks"] < ticks + 2:
                await anyio.sleep(0.002)

    async def settled(counter: str, count: int) -> None:
        with anyio.fail_after(20):
            while bus.counters[counter] < count:
                await anyio.sleep(0.002)
        await two_ticks()

    async with anyio.create_task_group() as tg:
        await tg.start(service.run, bus, clock)
        await settled("ticks", 1)
        seen: dict[str, int] = {}
        for step in steps:
            clock.t = step.t
            await two_ticks()  # time moved: its tick comes before the event, on both sides
            match step.event:
                case RequestPredicted():
                    await client.publish_durable(REQUEST_PREDICTED, step.event)
                    counter = "events.request"
                case RequestArrived():
                    await client.publish_durable(REQUEST_ARRIVED, step.event)
                    counter = "events.request"
                case EngineIteration():
                    await client.publish(engine_iteration(step.event.instance), step.event)
                    counter = "events.iteration"
                case RequestCompleted():
                    await client.publish_durable(REQUEST_COMPLETED, step.event)
                    counter = "events.completed"
            seen[counter] = seen.get(counter, 0) + 1
            await settled(counter, seen[counter])
        await recorder.sync()
        await anyio.sleep(0.1)  # let the recorder's callbacks run
        tg.cancel_scope.cancel()
    await bus.close()
    await client.close()
    await recorder.close()
    return recorded


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.parametrize("live_policy", ["throttllem", "retail", "default", "agft",
                                         "voltana"])
async def test_the_live_service_and_the_evaluator_decide_alike(
        nats: EmbeddedNatsServer, live_policy: str) -> None:
    steps, expected = run_eval(live_policy)
    kinds = {k[0] for k in expected}
    # The script exercises what the policy decides: refusals always, placements with
    # deferrals and clock changes for the predictive controller, clock changes for the
    # governor.
    assert "refuse" in kinds
    assert "admit" in kinds
    if live_policy == "throttllem":
        assert {"defer", "clock"} <= kinds
        assert len({k[2] for k in expected if k[0] == "clock"}) >= 2  # clocks move
    if live_policy in ("retail", "agft", "voltana"):
        assert "clock" in kinds
    live = await run_live(nats, live_policy, steps)
    assert live == expected

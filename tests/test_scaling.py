"""The autoscaler: properties of the pure decision (bounds, hysteresis, cool-down, warm-up,
drain), the load estimator, and the service over a real nats-server."""

from __future__ import annotations

import itertools
import random
import re
import time

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttllem import ConfigError
from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.scaling import (
    Action,
    LoadEstimator,
    Phase,
    ScaleDecision,
    ScalerState,
    ScalingPolicy,
    decide,
)
from throttllem._events import (
    SCALE_CODEC,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    ScaleEvent,
    ScaleTarget,
)
from throttllem._runtime import Clock
from throttllem._services.scaler import ScalerService
from throttllem._subjects import REQUEST_ARRIVED, REQUEST_COMPLETED, SCALE_TARGET, request_admitted

CHANGE = re.compile(r"^(ready|remove|scale-out|undrain|drain) [A-Za-z0-9_-]+(?=:)")
OUT = {Action.SCALE_OUT, Action.UNDRAIN}
IN = {Action.DRAIN}


@st.composite
def policies(draw: st.DrawFn) -> ScalingPolicy:
    lo = draw(st.integers(1, 3))
    hi = draw(st.integers(lo, 6))
    in_t = draw(st.floats(0.1, 0.7))
    out_t = draw(st.floats(in_t + 0.05, 1.0))
    return ScalingPolicy(capacity_per_instance=draw(st.floats(1.0, 100.0)), in_threshold=in_t,
                         out_threshold=out_t, min_instances=lo, max_instances=hi,
                         warmup_s=draw(st.floats(0.0, 30.0)), cooldown_s=draw(st.floats(0.0, 30.0)))


# One step: time advance, load as a multiple of one instance's capacity, outstanding per name.
steps = st.lists(st.tuples(st.floats(0.0, 20.0), st.floats(0.0, 8.0),
                           st.dictionaries(st.sampled_from([f"i{k}" for k in range(8)]),
                                           st.integers(0, 3), max_size=8)),
                 min_size=1, max_size=60)


def run(policy: ScalingPolicy, state: ScalerState, trace: list[tuple[float, float, dict[str, int]]],
        *, constant_load: float | None = None) -> list[tuple[float, ScaleDecision, dict[str, int]]]:
    out = []
    now = 0.0
    for dt, load_x, held in trace:
        now += dt
        load = (constant_load if constant_load is not None
                else load_x * policy.capacity_per_instance)
        d = decide(state, load, now, policy, outstanding=held)
        out.append((now, d, held))
        state = d.state
    return out


def start(policy: ScalingPolicy, n: int | None = None) -> ScalerState:
    n = policy.min_instances if n is None else n
    return ScalerState.initial([f"i{k}" for k in range(n)], 0.0)


@settings(max_examples=200, deadline=None)
@given(policies(), steps)
def test_never_exceeds_bounds(policy: ScalingPolicy, trace: list) -> None:  # type: ignore[type-arg]
    for _, d, _ in run(policy, start(policy), trace):
        s = d.state
        assert s.serving >= policy.min_instances
        assert s.serving + s.count(Phase.WARMING) <= policy.max_instances
        assert s.provisioned <= policy.max_instances + s.count(Phase.DRAINING)
        assert d.instances == s.provisioned
        assert len({i.name for i in s.instances}) == s.provisioned


@settings(max_examples=200, deadline=None)
@given(policies(), steps, st.floats(0.0, 8.0), st.integers(0, 5))
def test_no_flapping_under_constant_load(policy: ScalingPolicy, trace: list,  # type: ignore[type-arg]
                                         load_x: float, extra: int) -> None:
    n = min(policy.min_instances + extra, policy.max_instances)
    load = load_x * policy.capacity_per_instance
    directions = {("out" if c.action in OUT else "in")
                  for _, d, _ in run(policy, start(policy, n), trace, constant_load=load)
                  for c in d.changes if c.action in OUT | IN}
    assert len(directions) <= 1, directions


@pytest.mark.parametrize("eps", [1e-9, 1e-3, -1e-9, -1e-3])
def test_no_flapping_right_at_the_thresholds(eps: float) -> None:
    policy = ScalingPolicy(capacity_per_instance=10.0, min_instances=1, max_instances=6,
                           warmup_s=5.0, cooldown_s=2.0)
    for n in range(1, 6):
        for threshold in (policy.out_threshold * 10.0 * n, policy.in_threshold * 10.0 * (n - 1)):
            load = threshold * (1 + eps)
            trace = [(1.0, 0.0, {})] * 200
            actions = [c.action for _, d, _ in run(policy, start(policy, n), trace,
                                                   constant_load=load) for c in d.changes]
            assert not ({*actions} & OUT and {*actions} & IN), (n, load, actions)


@settings(max_examples=200, deadline=None)
@given(policies(), steps)
def test_decisions_respect_the_cool_down(policy: ScalingPolicy, trace: list) -> None:  # type: ignore[type-arg]
    times = [now for now, d, _ in run(policy, start(policy), trace)
             if any(c.action in OUT | IN for c in d.changes)]
    assert all(b - a >= policy.cooldown_s for a, b in itertools.pairwise(times))


def test_scale_out_when_load_rises_above_the_threshold_after_the_cool_down() -> None:
    policy = ScalingPolicy(capacity_per_instance=10.0, out_threshold=0.8, warmup_s=60.0,
                           cooldown_s=30.0, max_instances=4)
    state = ScalerState.initial(["i0", "i1"], 0.0)
    assert not decide(state, 16.0, 1.0, policy).changed  # 16 = 0.8 × 10 × 2: not above
    d = decide(state, 16.1, 1.0, policy)
    assert [(c.action, c.instance) for c in d.changes] == [(Action.SCALE_OUT, "i2")]
    assert d.instances == 3
    assert d.reason.startswith("scale-out i2: load 16.1 > 0.8 × 10 × 2")
    # Load keeps rising: nothing within the cool-down, another instance right after it.
    assert not decide(d.state, 100.0, 30.9, policy).changed
    d2 = decide(d.state, 100.0, 31.0, policy)
    assert [(c.action, c.instance) for c in d2.changes] == [(Action.SCALE_OUT, "i3")]
    # ... and never above max_instances, however high the load.
    d3 = decide(d2.state, 1e9, 1000.0, policy)
    assert [c.action for c in d3.changes] == [Action.READY, Action.READY]
    assert d3.state.provisioned == 4


def test_warming_instances_do_not_count_as_capacity() -> None:
    policy = ScalingPolicy(capacity_per_instance=10.0, warmup_s=60.0, cooldown_s=0.0)
    state = ScalerState.initial(["i0"], 0.0)
    d = decide(state, 9.0, 0.0, policy)
    assert d.state.names(Phase.WARMING) == ["i1"]
    assert d.state.serving == 1
    assert d.state.serving_capacity(policy) == 10.0, "a warming instance serves nothing"
    # Still warming just before warmup_s: no scale-in either (nothing to drain while warming).
    d = decide(d.state, 0.0, 59.9, policy)
    assert not d.changed
    assert d.state.names(Phase.WARMING) == ["i1"]
    # Warm-up over: it serves now.
    d = decide(d.state, 9.0, 60.0, policy)
    assert [(c.action, c.instance) for c in d.changes] == [(Action.READY, "i1")]
    assert d.state.serving_capacity(policy) == 20.0
    # Warming counts as coming: load that two instances carry orders no third meanwhile.
    state = ScalerState.initial(["i0"], 0.0)
    d = decide(state, 9.0, 0.0, policy)
    assert not decide(d.state, 15.0, 10.0, policy).changed
    assert decide(d.state, 16.5, 10.0, policy).state.names(Phase.WARMING) == ["i1", "i2"]


@settings(max_examples=200, deadline=None)
@given(policies(), steps)
def test_ready_exactly_after_warm_up(policy: ScalingPolicy, trace: list) -> None:  # type: ignore[type-arg]
    prev = start(policy)
    for now, d, _ in run(policy, prev, trace):
        before = {i.name: i for i in prev.instances}
        for inst in d.state.instances:
            old = before.get(inst.name)
            if old is not None and old.phase is Phase.WARMING:
                # (ready, and possibly drained at once if the load fell meanwhile)
                ready = inst.phase is not Phase.WARMING
                assert ready == (now - old.since_s >= policy.warmup_s)
        prev = d.state


@settings(max_examples=200, deadline=None)
@given(policies(), steps)
def test_scale_in_removes_only_drained_instances(policy: ScalingPolicy, trace: list) -> None:  # type: ignore[type-arg]
    prev = start(policy, policy.max_instances)
    for _, d, held in run(policy, prev, trace):
        phases = {i.name: i.phase for i in prev.instances}
        after = {i.name: i.phase for i in d.state.instances}
        for c in d.changes:
            if c.action is Action.REMOVE:
                assert phases[c.instance] is Phase.DRAINING, "removed without draining first"
                assert held.get(c.instance, 0) == 0, "removed while it still held requests"
            if c.action is Action.DRAIN:
                active = [n for n, p in after.items() if p is Phase.ACTIVE] + [c.instance]
                assert held.get(c.instance, 0) == min(held.get(n, 0) for n in active)
        prev = d.state


def test_scale_in_drains_the_least_loaded_then_removes_it_once_empty() -> None:
    policy = ScalingPolicy(capacity_per_instance=10.0, in_threshold=0.5, cooldown_s=5.0)
    state = ScalerState.initial(["i0", "i1", "i2"], 0.0)
    assert not decide(state, 10.0, 0.0, policy).changed  # 10 = 0.5 × 10 × 2: not below
    d = decide(state, 9.9, 0.0, policy, outstanding={"i0": 3, "i1": 1, "i2": 4})
    assert [(c.action, c.instance) for c in d.changes] == [(Action.DRAIN, "i1")]
    assert d.instances == 3, "a draining instance still runs"
    assert d.state.serving == 2
    # Not removed while it holds a request, however long it takes ...
    d = decide(d.state, 0.0, 100.0, policy, outstanding={"i1": 1})
    assert not d.changed
    # ... removed once empty.
    d = decide(d.state, 0.0, 101.0, policy, outstanding={"i1": 0, "i0": 2})
    assert (d.changes[0].action, d.changes[0].instance) == (Action.REMOVE, "i1")
    assert "i1" not in d.state.names()
    # An already-empty victim is removed on the next call, never in the one that picked it.
    d = decide(ScalerState.initial(["i0", "i1"], 0.0), 0.0, 0.0, policy)
    assert [c.action for c in d.changes] == [Action.DRAIN]
    assert [c.action for c in decide(d.state, 0.0, 0.5, policy).changes] == [Action.REMOVE]


def test_scale_out_takes_back_a_draining_instance_first() -> None:
    policy = ScalingPolicy(capacity_per_instance=10.0, cooldown_s=0.0, warmup_s=60.0)
    d = decide(ScalerState.initial(["i0", "i1"], 0.0), 1.0, 0.0, policy,
               outstanding={"i1": 2})
    assert d.state.names(Phase.DRAINING) == ["i0"]
    d = decide(d.state, 50.0, 1.0, policy, outstanding={"i0": 2})
    assert [(c.action, c.instance) for c in d.changes] == [(Action.UNDRAIN, "i0")]
    assert d.state.serving == 2, "undrained at once, no warm-up"


def test_drain_timeout_and_min_instances() -> None:
    policy = ScalingPolicy(capacity_per_instance=10.0, cooldown_s=0.0, drain_timeout_s=30.0,
                           min_instances=2, max_instances=3)
    d = decide(ScalerState.initial(["i0"], 0.0), 0.0, 0.0, policy)
    assert [c.action for c in d.changes] == [Action.SCALE_OUT]
    assert "below min_instances=2" in d.reason
    d = decide(ScalerState.initial(["i0", "i1", "i2"], 0.0), 0.0, 0.0, policy)
    assert [(c.action, c.instance) for c in d.changes] == [(Action.DRAIN, "i2")]
    assert not decide(d.state, 0.0, 29.0, policy, outstanding={"i2": 1}).changed
    d = decide(d.state, 0.0, 30.0, policy, outstanding={"i2": 1})
    assert [c.action for c in d.changes] == [Action.REMOVE]
    assert "timed out" in d.reason
    assert not decide(d.state, 0.0, 100.0, policy).changed  # at min_instances


def test_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="hysteresis"):
        ScalingPolicy(capacity_per_instance=1.0, in_threshold=0.8, out_threshold=0.8)
    with pytest.raises(ConfigError, match="min_instances"):
        ScalingPolicy(capacity_per_instance=1.0, min_instances=3, max_instances=2)
    with pytest.raises(ConfigError, match="capacity"):
        ScalingPolicy(capacity_per_instance=0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 100.0), st.floats(0.0, 10.0)), max_size=80),
       st.floats(0.0, 120.0), st.floats(0.5, 30.0), st.randoms(use_true_random=False))
def test_load_estimator_is_a_windowed_rate_independent_of_order(
        arrivals: list[tuple[float, float]], now: float, window: float, rnd: random.Random) -> None:
    expected = sum(w for t, w in arrivals if now - window < t <= now) / window
    shuffled = list(arrivals)
    rnd.shuffle(shuffled)
    for order in (arrivals, shuffled):
        est = LoadEstimator(window)
        for t, w in order:
            est.observe(t, w)
        assert est.rate(now) == pytest.approx(expected, abs=1e-9)


# --------------------------------------------------------------------------- service


@pytest.mark.anyio
@pytest.mark.slow
async def test_service_scales_out_after_a_burst_then_drains_and_removes(
        nats: EmbeddedNatsServer) -> None:
    # Event time runs 10× the wall: window 2 s, warm-up 1 s, cool-down 1 s (event time).
    clock = Clock(epoch_wall_s=time.time(), speed=10.0)
    policy = ScalingPolicy(capacity_per_instance=5.0, warmup_s=1.0, cooldown_s=1.0,
                           min_instances=1, max_instances=2)
    scaler = ScalerService(setup="h100-llama3-8b-tp1", policy=policy, instances=["i0"],
                           window_s=2.0, tick_s=0.02, reannounce_s=1e6)
    bus = await Bus.connect(nats.url, name="scaler")
    gateway = await Bus.connect(nats.url, name="gateway")
    targets: list[ScaleTarget] = []

    async def on_scale(event: ScaleEvent) -> None:
        assert isinstance(event, ScaleTarget)
        targets.append(event)

    async def wait_for(pred: object) -> ScaleTarget:
        with anyio.fail_after(10):
            while not any(pred(t) for t in targets):  # type: ignore[operator]
                await anyio.sleep(0.01)
        return next(t for t in targets if pred(t))  # type: ignore[operator]

    await gateway.subscribe(SCALE_TARGET, SCALE_CODEC, on_scale)
    async with anyio.create_task_group() as tg:
        await tg.start(scaler.run, bus, clock)
        first = await wait_for(lambda t: True)
        assert (first.setup, first.instances) == ("h100-llama3-8b-tp1", 1)
        assert first.reason.startswith("start:")
        # A burst: 30 arrivals now is 15 req/s over the 2 s window > 0.8 × 5 × 1.
        for k in range(30):
            await gateway.publish(REQUEST_ARRIVED, RequestArrived(
                id=f"q{k}", arrival_s=clock.now_s(), prompt_tokens=10))
        out = await wait_for(lambda t: t.instances == 2)
        assert out.reason.startswith("scale-out i1")
        # i0 holds a request: when the burst has left the window, i1 (empty) is drained
        # (warm-up done, cool-down over) and then removed; i0 is never touched.
        req = RequestArrived(id="held", arrival_s=clock.now_s(), prompt_tokens=10)
        await gateway.publish(request_admitted("i0"), RequestAdmitted(
            request=req, instance="i0", decided_s=clock.now_s()))
        drain = await wait_for(lambda t: "drain i1" in t.reason)
        assert drain.instances == 2
        removed = await wait_for(lambda t: "remove i1: drained" in t.reason)
        assert removed.instances == 1
        assert scaler.outstanding_counts() == {"i0": 1}
        now = clock.now_s()
        await gateway.publish(REQUEST_COMPLETED, RequestCompleted(
            id="held", instance="i0", arrival_s=now, admitted_s=now, first_token_s=now,
            completed_s=now, prompt_tokens=10, generated_tokens=1, ttft_ms=1.0,
            tbt_mean_ms=1.0, tbt_max_ms=1.0, e2e_ms=1.0))
        with anyio.fail_after(5):
            while scaler.outstanding_counts() != {"i0": 0}:
                await anyio.sleep(0.01)
        n = len(targets)
        await anyio.sleep(0.3)  # 3 s of event time with nothing changing: nothing published
        assert len(targets) == n
        tg.cancel_scope.cancel()
    changes = [m.group(0) for t in targets for part in t.reason.split("; ")
               if (m := CHANGE.match(part))]
    assert changes == ["scale-out i1", "ready i1", "drain i1", "remove i1"]
    assert targets[-1].instances == 1
    assert targets[-1].reason.endswith("warming=- active=i0 draining=-")
    assert scaler.health_metrics()["instances"] == 1.0
    for b in (bus, gateway):
        await b.close()

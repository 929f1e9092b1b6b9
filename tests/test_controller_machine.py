"""The controller state machine on its own (no bus, no simulation): events in, decisions out."""

from __future__ import annotations

import dataclasses

import pytest

from throttllem._core.controller import (
    DEFER_REASON,
    POLICIES,
    Admit,
    Controller,
    ControllerConfig,
    Decision,
    Defer,
    Refuse,
    SetClock,
)
from throttllem._errors import ConfigError, ThrottllemError
from throttllem._events import RequestAborted, RequestAdmitted, RequestArrived
from throttllem.testing import crowded_perf, setup_policy

POLICY, SHAPE = setup_policy()



THREE_FIT = dataclasses.replace(POLICY, perf=crowded_perf(3))
LENGTHS = (50.0, 60.0)


def request(rid: str, t: float = 0.0, *, tenant: str = "t", slo_class: str = "standard",
            prompt_tokens: int = 100) -> RequestArrived:
    return RequestArrived(id=rid, arrival_s=t, prompt_tokens=prompt_tokens, tenant=tenant,
                          slo_class=slo_class)


def controller(config: ControllerConfig = POLICIES["throttllem"], *,
               instances: tuple[str, ...] = ("i0",), policy: object = THREE_FIT) -> Controller:
    ctl = Controller(config, shape=SHAPE, policy=policy)  # type: ignore[arg-type]
    for name in instances:
        ctl.add_instance(name)
    return ctl


def admitted(decisions: list[Decision]) -> list[str]:
    return [d.request.id for d in decisions if isinstance(d, Admit)]


def test_fcfs_deferral_then_admission_as_capacity_frees() -> None:
    ctl = controller()
    for k in range(3):
        assert admitted(ctl.offer(request(f"r{k}"), LENGTHS, 0.0)) == [f"r{k}"]
    assert ctl.offer(request("r3"), LENGTHS, 0.0) == [Defer("r3", DEFER_REASON)]
    # Nothing jumps ahead of a deferred request, not even one that would fit later.
    assert ctl.offer(request("r4"), LENGTHS, 0.0) == []
    assert ctl.deferred == 1
    assert admitted(ctl.completed("r0", "i0", 0.1)) == ["r3"]
    assert admitted(ctl.completed("r1", "i0", 0.1)) == ["r4"]
    assert ctl.outstanding == {"i0": 3}


def test_forget_frees_an_admitted_request_and_drops_a_waiting_one() -> None:
    ctl = controller()
    for k in range(3):
        ctl.offer(request(f"r{k}"), LENGTHS, 0.0)
    ctl.offer(request("r3"), LENGTHS, 0.0)
    ctl.offer(request("r4"), LENGTHS, 0.0)
    assert ctl.forget("r3", 0.5) == []  # still waiting: just gone from the queue
    assert [w.request.id for w in ctl.pending] == ["r4"]
    assert admitted(ctl.forget("r1", 0.6)) == ["r4"]  # aborted while running: frees a slot
    assert "r1" not in ctl.placed
    assert sorted(ctl.trackers["i0"].requests) == ["r0", "r2", "r4"]
    assert ctl.forget("unknown", 0.7) == []


def test_unknown_classes_and_unservable_prompts_are_refused_under_every_policy() -> None:
    for name, config in POLICIES.items():
        ctl = controller(config)
        [gold] = ctl.offer(request("g", slo_class="gold"), LENGTHS, 0.0)
        assert isinstance(gold, Refuse), name
        assert gold.cause == "unknown_slo_class"
        assert gold.retry_after_s == 0.0  # a retry can never succeed
        [huge] = ctl.offer(request("h", prompt_tokens=9000), LENGTHS, 0.0)
        assert isinstance(huge, Refuse)
        assert huge.cause == "never_fits"
        assert ctl.placed == {}


def test_a_full_queue_sheds_new_requests_with_a_retry_hint() -> None:
    ctl = controller(dataclasses.replace(POLICIES["throttllem"], max_pending=2))
    for k in range(3):
        ctl.offer(request(f"r{k}"), LENGTHS, 0.0)
    ctl.offer(request("w0"), LENGTHS, 0.0)
    ctl.offer(request("w1"), LENGTHS, 0.0)
    [shed] = ctl.offer(request("w2"), LENGTHS, 0.0)
    assert isinstance(shed, Refuse)
    assert shed.cause == "shed"
    assert shed.retry_after_s > 0
    assert [w.request.id for w in ctl.pending] == ["w0", "w1"]


def test_requests_waiting_too_long_are_shed_on_a_tick() -> None:
    # No instance serves (all warming): requests wait, and the oldest past the bound go.
    ctl = controller(dataclasses.replace(POLICIES["throttllem"], max_wait_s=5.0))
    ctl.set_serving([])
    ctl.offer(request("old", 0.0), LENGTHS, 0.0)
    ctl.offer(request("new", 4.0), LENGTHS, 4.0)
    shed = [d for d in ctl.tick(5.5) if isinstance(d, Refuse)]
    assert [(d.request_id, d.cause) for d in shed] == [("old", "queue_timeout")]
    assert [w.request.id for w in ctl.pending] == ["new"]


def test_a_tenant_over_its_rate_is_refused_and_others_are_not() -> None:
    ctl = controller(dataclasses.replace(POLICIES["default"], tenant_rps=1.0, tenant_burst=2.0))
    decisions = [ctl.offer(request(f"a{k}", tenant="a"), None, 0.0) for k in range(3)]
    assert [type(d[0]).__name__ for d in decisions] == ["Admit", "Admit", "Refuse"]
    limited = decisions[2][0]
    assert isinstance(limited, Refuse)
    assert limited.cause == "rate_limited"
    assert limited.retry_after_s == pytest.approx(1.0)
    assert admitted(ctl.offer(request("b0", tenant="b"), None, 0.0)) == ["b0"]
    assert admitted(ctl.offer(request("a3", tenant="a"), None, 1.0)) == ["a3"]  # refilled


def test_only_serving_instances_take_new_requests() -> None:
    ctl = controller(POLICIES["default"], instances=("i0", "i1", "i2"))
    ctl.set_serving(["i1"])  # i0 draining, i2 warming
    assert {d.instance for d in ctl.offer(request("x"), None, 0.0) if isinstance(d, Admit)} \
        == {"i1"}
    ctl.set_serving([])
    assert ctl.offer(request("y"), None, 0.0) == [Defer("y", DEFER_REASON)]
    ctl.set_serving(None)
    assert admitted(ctl.tick(1.0)) == ["y"]


def test_clock_targets_are_leases_renewed_every_third_and_sent_on_change() -> None:
    ctl = controller(POLICIES["throttllem"], policy=POLICY)
    floor = POLICY.floor_mhz
    first = ctl.tick(0.0)
    assert first == [SetClock("i0", floor, "retune (lower)", changed=True)]
    assert ctl.tick(0.5) == []  # unchanged, lease fresh
    [renewal] = ctl.tick(1.0)  # lease_s 3 → renewed every second
    assert renewal == SetClock("i0", floor, "retune (same)", changed=False)


def test_a_static_clock_is_set_when_the_instance_is_added() -> None:
    ctl = Controller(ControllerConfig(admission="jsq", clocks="static", static_clock_mhz=1200),
                     shape=SHAPE, policy=POLICY)
    assert ctl.add_instance("i0") == [SetClock("i0", 1200, "static clock", changed=True)]
    with pytest.raises(ConfigError):
        ctl.add_instance("i0")
    with pytest.raises(ThrottllemError, match="not a supported SM clock"):
        Controller(ControllerConfig(admission="jsq", clocks="static", static_clock_mhz=1201),
                   shape=SHAPE, policy=POLICY)


def test_restore_skips_aborted_requests() -> None:
    ctl = controller()
    history = [RequestAdmitted(request=request("a"), instance="i0", decided_s=0.0,
                               predicted_tokens=50, upper_tokens=60),
               RequestAdmitted(request=request("b"), instance="i0", decided_s=0.0),
               RequestAborted(id="b", decided_s=1.0, instance="i0",
                              cause="client-disconnected")]
    assert ctl.restore(history) == []
    assert ctl.trackers["i0"].requests == ["a"]
    assert ctl.placed == {"a": "i0"}


def test_bad_configurations_are_refused() -> None:
    for bad in ({"lease_s": 0.0}, {"max_pending": 0}, {"max_wait_s": -1.0},
                {"tenant_rps": 0.0}, {"down_margin_steps": 0}):
        with pytest.raises(ConfigError):
            ControllerConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clock policy"):
        Controller(POLICIES["throttllem"], shape=SHAPE)


def test_an_abort_that_overtakes_its_arrival_drops_the_request() -> None:
    ctl = controller()
    assert ctl.forget("early", 0.0) == []  # the gateway gave up before the offer came
    assert ctl.offer(request("early"), LENGTHS, 0.1) == []
    assert "early" not in ctl.placed
    assert admitted(ctl.offer(request("early"), LENGTHS, 0.2)) == ["early"]  # once only


def test_a_requests_own_bounds_tighten_its_class_never_loosen_it() -> None:
    from throttllem._core.slo import DEFAULT_SLO_CLASSES, tightened  # noqa: PLC0415

    standard = DEFAULT_SLO_CLASSES["standard"]  # TTFT 500 ms + 0.25 ms/token, TBT 50 ms
    assert tightened(standard, prompt_tokens=400, ttft_ms=None, tbt_ms=None) is standard
    tight = tightened(standard, prompt_tokens=400, ttft_ms=200.0, tbt_ms=20.0)
    assert tight.ttft_bound_ms(400) == 200.0
    assert tight.tbt_ms == 20.0
    loose = tightened(standard, prompt_tokens=400, ttft_ms=5000.0, tbt_ms=80.0)
    assert loose == standard
    # The controller plans with the tighter bounds.
    ctl = controller()
    strict = RequestArrived(id="s", arrival_s=0.0, prompt_tokens=100, tbt_slo_ms=20.0,
                            ttft_slo_ms=300.0)
    assert admitted(ctl.offer(strict, LENGTHS, 0.0)) == ["s"]
    assert ctl.trackers["i0"].column("tbt_bound_ms").tolist() == [20.0]
    assert ctl.trackers["i0"].column("ttft_bound_ms").tolist() == [300.0]

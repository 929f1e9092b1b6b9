"""Clock costs in the controller: releasing an idle lock when that pays, no lowering step
that cannot pay off, and the peers' clock rules (AGFT, VoltanaLLM) as rules of the one
controller."""

from __future__ import annotations

import dataclasses

import pytest

from throttllem._core.controller import (
    POLICIES,
    Controller,
    ControllerConfig,
    Decision,
    SetClock,
)
from throttllem._core.peers import AgftBandit, AgftConfig, PassSeen, VoltanaConfig, VoltanaEcoFreq
from throttllem._core.switching import IdlePower, lowering_dwell_s, next_backoff
from throttllem._errors import ConfigError
from throttllem._events import EngineIteration, RequestArrived
from throttllem._twin.costs import controller_idle_power
from throttllem._twin.profile import load_profile
from throttllem.testing import setup_policy

IDLE = IdlePower(unlocked_w=71.0, locked_points=((360.0, 80.0), (1830.0, 160.0)),
                 relock_penalty_w=150.0)


def clocks_of(decisions: list[Decision]) -> list[int | None]:
    return [d.clock_mhz for d in decisions if isinstance(d, SetClock) and d.changed]


def test_release_waits_the_break_even_and_never_when_unlocked_idle_costs_more() -> None:
    wait = IDLE.release_after_s(1005.0, 0.2)
    assert wait is not None
    saving_w = IDLE.locked_w(1005.0) - IDLE.unlocked_w
    assert wait == pytest.approx(0.2 * 150.0 / saving_w)
    assert IDLE.release_after_s(1005.0, 0.0) == 0.0  # instant switches: release at once
    cheap_lock = dataclasses.replace(IDLE, unlocked_w=200.0)
    assert cheap_lock.release_after_s(1005.0, 0.2) is None
    assert lowering_dwell_s(1.0, 0.2, 0) == 1.0
    assert lowering_dwell_s(1.0, 5.0, 0) == 5.0
    assert lowering_dwell_s(1.0, 0.2, 2) == 4.0
    assert next_backoff(0, 0.1, 0.2) == 1  # undone before its switch completed
    assert next_backoff(3, 0.5, 0.2) == 0  # held: back to normal
    assert next_backoff(6, 0.1, 0.2) == 6  # capped


def test_profile_gives_the_controller_its_idle_power() -> None:
    profile = load_profile("h100-llama3-8b-tp1")
    idle = controller_idle_power(profile)
    assert idle is not None
    assert idle.unlocked_w == profile.gpu.idle_power_w
    assert idle.locked_w(profile.controller.floor_mhz) > idle.unlocked_w
    assert idle.relock_penalty_w > 0
    flat = profile.with_overrides({"clocking.locked_idle_w": "flat"})
    assert controller_idle_power(flat) is None


def _predictive(switch_latency_s: float, idle: IdlePower | None) -> Controller:
    policy, shape = setup_policy()
    config = dataclasses.replace(POLICIES["throttllem"], idle_power=idle,
                                 switch_latency_s=switch_latency_s)
    ctl = Controller(config, shape=shape, policy=policy)
    ctl.add_instance("i0")
    return ctl


def test_an_idle_instance_is_released_after_the_break_even_and_locked_again_for_work() -> None:
    ctl = _predictive(0.2, IDLE)
    first = ctl.tick(0.0)  # idle from now: locked (to the floor) first
    assert clocks_of(first)
    assert None not in clocks_of(first)
    clock = ctl.clock_mhz["i0"]
    wait = IDLE.release_after_s(clock, 0.2)
    assert wait is not None
    assert None not in clocks_of(ctl.tick(wait / 2))
    released = ctl.tick(wait + 0.01)
    assert clocks_of(released) == [None]
    assert "i0" in ctl.unlocked
    assert ctl.tick(wait + 5.0) == []  # stays released, no lease renewals
    request = RequestArrived(id="r1", arrival_s=wait + 6.0, prompt_tokens=100, max_tokens=64)
    back = ctl.offer(request, (50.0, 60.0), wait + 6.0)
    assert isinstance(back[0], SetClock)
    assert back[0].clock_mhz is not None
    assert back[0].changed
    assert "i0" not in ctl.unlocked


def test_without_idle_power_a_lock_is_never_released() -> None:
    ctl = _predictive(0.0, None)
    decisions = [d for t in range(0, 100, 5) for d in ctl.tick(float(t))]
    assert None not in [d.clock_mhz for d in decisions if isinstance(d, SetClock)]


def test_the_dwell_before_lowering_is_at_least_one_switch() -> None:
    ctl = _predictive(5.0, None)  # a slow switch: 5 s
    ctl.tick(0.0)
    ctl.clock_mhz["i0"] = ctl.policy.clocks.mhz[-1] if ctl.policy else 1980
    ctl.changed_s["i0"] = 0.0
    assert clocks_of(ctl.tick(2.0)) == []  # past min_dwell_s (1 s), within one switch
    assert clocks_of(ctl.tick(5.5)) != []


def test_bad_clock_cost_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="switch_latency_s"):
        ControllerConfig(switch_latency_s=-1.0)
    with pytest.raises(ConfigError, match="IdlePower"):
        IdlePower(unlocked_w=71.0, locked_points=((360.0, 80.0),), relock_penalty_w=1.0)


def _pass(t: float, *, batch: int = 8, queue: int = 0, energy_mj: float = 3000.0,
          duration_ms: float = 20.0) -> PassSeen:
    return PassSeen(end_s=t, duration_ms=duration_ms, batch_size=batch, decode_tokens=batch,
                    prefill_tokens=0, kv_tokens=batch * 512, kv_fraction=0.1, queue_len=queue,
                    energy_mj=energy_mj)


def test_agft_measures_its_baseline_unlocked_then_tries_every_arm_from_the_top() -> None:
    policy, _ = setup_policy()
    cfg = AgftConfig()
    bandit = AgftBandit(cfg, policy.clocks.mhz, policy.floor_mhz)
    assert bandit.arms[0] == policy.floor_mhz
    assert bandit.arms[-1] == policy.clocks.mhz[-1]
    t = 0.0
    chosen: list[int | None] = []
    for _ in range(cfg.baseline_windows + len(bandit.arms)):
        bandit.observe(_pass(t))
        t += cfg.period_s
        assert bandit.due(t)
        chosen.append(bandit.decide(t, tpot_limit_ms=50.0))
    assert chosen[: cfg.baseline_windows - 1] == [None] * (cfg.baseline_windows - 1)
    tried = chosen[cfg.baseline_windows - 1:]
    assert tried[: len(bandit.arms)] == sorted(bandit.arms, reverse=True)
    assert tried[-1] in bandit.arms  # then LinUCB's choice
    assert bandit.decide(t + cfg.period_s, 50.0) == bandit.idle_mhz  # no passes: idle clock


def test_agft_prunes_clocks_at_and_below_an_slo_breach() -> None:
    policy, _ = setup_policy()
    bandit = AgftBandit(AgftConfig(baseline_windows=1), policy.clocks.mhz, policy.floor_mhz)
    bandit.observe(_pass(0.0))
    first = bandit.decide(1.0, 50.0)  # baseline done: the top arm first
    assert first == bandit.arms[-1]
    second_window = bandit.decide  # the top arm's window breaks the TPOT limit
    bandit.observe(_pass(1.5, duration_ms=80.0))
    second_window(2.0, 50.0)
    assert bandit.boundary_mhz == bandit.arms[-1]
    bandit.observe(_pass(2.5))
    assert bandit.decide(3.0, 50.0) == bandit.arms[-1]  # nothing else is left


def test_voltana_picks_the_lowest_listed_clock_that_fits_the_itl_slo() -> None:
    policy, _ = setup_policy()
    eco = VoltanaEcoFreq(VoltanaConfig(), (policy.floor_mhz, policy.clocks.mhz[-1]))
    eco.observe(_pass(0.0, batch=8))
    assert eco.decide(0.1, policy.perf, 50.0) == policy.floor_mhz
    eco.observe(_pass(0.2, batch=8, queue=3))
    assert eco.decide(0.3, policy.perf, 50.0) == policy.clocks.mhz[-1]  # requests wait
    eco.observe(_pass(0.4, batch=8))
    assert eco.decide(0.5, policy.perf, 1.0) == policy.clocks.mhz[-1]  # nothing fits
    assert eco.decide(0.6, policy.perf, 50.0) is None  # no passes: keep
    assert eco.decide(6.0, policy.perf, 50.0) == policy.floor_mhz  # quiet for 5 s


@pytest.mark.parametrize("rule", ["agft", "voltana"])
def test_peer_rules_run_in_the_controller_from_engine_passes(rule: str) -> None:
    policy, shape = setup_policy()
    ctl = Controller(POLICIES[rule], shape=shape, policy=policy)
    seen = clocks_of(ctl.add_instance("i0"))
    for k in range(200):
        t = 0.1 * k
        it = EngineIteration(instance="i0", seq=k, start_s=t, duration_ms=20.0,
                             batch_size=16, decode_tokens=16, prefill_tokens=0,
                             kv_blocks_used=500, kv_blocks_total=27669,
                             queue_len=3 if 100 <= k < 110 else 0, clock_mhz=1980.0,
                             energy_mj=6000.0)
        ctl.iteration("i0", [], t + 0.02, 20.0, engine=it)
        seen += clocks_of(ctl.tick(t + 0.05))
    assert len(set(seen)) >= 2  # the rule moved the clock
    assert all(c is None or c in policy.clocks.mhz for c in seen)

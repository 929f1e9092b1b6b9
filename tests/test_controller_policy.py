"""throttLL'eM's placement and retuning (pure), on the twin's setup profile."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from throttllem._core.forecast import Candidate
from throttllem._core.placement import InstanceTracker, place, retune
from throttllem._core.slo import SloClass
from throttllem._core.slo_check import RequestSlo
from throttllem.testing import setup_policy

STANDARD = SloClass(name="standard")
POLICY, SHAPE = setup_policy()
TOP = POLICY.clocks.mhz[-1]


def tracker(name: str, *, running: int = 0, queued: int = 0, now_s: float = 0.0,
            prompt: int = 1000, predicted: float = 200.0, generated: int = 10) -> InstanceTracker:
    t = InstanceTracker(name, SHAPE)
    for n in range(running + queued):
        t.admitted(f"{name}-{n}", prompt_tokens=prompt, predicted_tokens=predicted,
                   upper_tokens=predicted * 1.3, arrival_s=now_s - 1.0, slo=STANDARD)
    for step in range(generated):
        t.iteration([f"{name}-{n}" for n in range(running)], now_s - 0.5 + step * 0.01)
    return t


def candidate(now_s: float, *, prompt: int = 800, predicted: float = 150.0,
              arrival_s: float | None = None) -> tuple[Candidate, RequestSlo]:
    arrival = now_s if arrival_s is None else arrival_s
    return (Candidate(prompt_tokens=prompt, predicted_tokens=predicted,
                      upper_tokens=predicted * 1.3),
            RequestSlo.for_request(STANDARD, prompt_tokens=prompt, arrival_s=arrival))


def test_floor_is_the_energy_optimal_clock_not_the_lowest() -> None:
    assert POLICY.clocks.mhz[0] < POLICY.floor_mhz < TOP


def test_tracker_turns_events_into_running_and_queued_state() -> None:
    t = tracker("i0", running=3, queued=2, generated=5)
    state, slo = t.snapshot()
    assert state.n_running == 3
    assert state.n_queued == 2
    assert state.running_generated_tokens.tolist() == [5, 5, 5]
    assert len(slo) == 5
    assert np.isnan(slo.first_token_s[3:]).all()  # queued: no token yet
    assert not np.isnan(slo.first_token_s[:3]).any()
    t.completed("i0-0")
    assert t.snapshot()[0].n_running == 2


def test_idle_instances_run_at_the_floor_and_load_raises_the_clock() -> None:
    assert retune(InstanceTracker("idle", SHAPE), POLICY, now_s=0.0) == POLICY.floor_mhz
    light = retune(tracker("a", running=4), POLICY, now_s=0.0)
    heavy = retune(tracker("b", running=200, prompt=3000, predicted=600.0), POLICY, now_s=0.0)
    assert POLICY.floor_mhz <= light <= heavy <= TOP


def test_placement_prefers_the_instance_that_can_run_slowest() -> None:
    busy = tracker("busy", running=200, prompt=3000, predicted=600.0)
    quiet = tracker("quiet", running=2)
    cand, slo = candidate(0.0)
    placement = place({"busy": busy, "quiet": quiet}, cand, slo, POLICY, now_s=0.0)
    assert placement is not None
    assert placement.instance == "quiet"
    # Adding a request never lets the instance run slower than it does without it.
    assert placement.clock_mhz >= retune(quiet, POLICY, now_s=0.0)
    assert placement.clock_mhz < retune(busy, POLICY, now_s=0.0) or \
        retune(busy, POLICY, now_s=0.0) == POLICY.floor_mhz


def test_a_request_already_too_late_anywhere_is_admitted_best_effort_at_top_clock() -> None:
    # Arrived 100 s ago: its TTFT bound (≈0.7 s) is long gone whatever we do.
    cand, slo = candidate(100.0, arrival_s=0.0)
    placement = place({"i0": tracker("i0", running=2, now_s=100.0)}, cand, slo, POLICY,
                      now_s=100.0)
    assert placement is not None
    assert placement.clock_mhz == TOP
    assert "best effort" in placement.reason


def test_a_full_instance_defers_a_request_that_could_still_make_it() -> None:
    # A small KV cache (16k tokens), nearly full: a long prompt would overflow it.
    small = replace(SHAPE, kv_blocks_total=1000)
    t = InstanceTracker("i0", small)
    for n in range(4):
        t.admitted(f"r{n}", prompt_tokens=3500, predicted_tokens=300, upper_tokens=300,
                   arrival_s=0.0, slo=STANDARD)
    for step in range(3):
        t.iteration([f"r{n}" for n in range(4)], 0.1 * step)
    cand, slo = candidate(1.0, prompt=3000, predicted=100.0)
    assert place({"i0": t}, cand, slo, POLICY, now_s=1.0) is None
    # An empty instance beside it takes the request.
    placement = place({"i0": t, "i1": InstanceTracker("i1", small)}, cand, slo, POLICY,
                      now_s=1.0)
    assert placement is not None
    assert placement.instance == "i1"


def test_lost_causes_do_not_pin_the_clock_at_the_top() -> None:
    t = tracker("i0", running=3, now_s=0.0)
    # One running request arrived long ago and never got its first token: a lost cause.
    t.admitted("late", prompt_tokens=500, predicted_tokens=50, upper_tokens=60,
               arrival_s=-1000.0, slo=STANDARD)
    clock = retune(t, POLICY, now_s=0.0)
    assert clock < TOP
    assert not math.isnan(clock)

"""Packing admission (`Policy.pack`): among instances that take a request at the same clock,
the busiest goes first, so batches grow where the SLOs still hold; spreading (the default)
is unchanged."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tests.test_placement import CLOCKS, SHAPE, SLO, random_trackers
from throttllem._core.forecast import Candidate
from throttllem._core.perf import AffinePerfModel
from throttllem._core.placement import (
    InstanceTracker,
    Policy,
    _search,
    admission_order,
    place,
)
from throttllem._core.slo_check import RequestSlo


def test_admission_order_spreads_or_packs_with_names_breaking_ties() -> None:
    held = {"b": 3, "a": 3, "c": 0, "d": 7}
    assert admission_order(held, pack=False) == ["c", "a", "b", "d"]
    assert admission_order(held, pack=True) == ["d", "a", "b", "c"]
    assert admission_order({}, pack=True) == []


def _light_instances(now_s: float) -> dict[str, InstanceTracker]:
    """Two instances far from any SLO: `busy` holds four short requests, `quiet` one."""
    trackers = {}
    for name, n in (("busy", 4), ("quiet", 1)):
        tracker = InstanceTracker(name, SHAPE)
        for j in range(n):
            tracker.admitted(f"{name}-{j}", prompt_tokens=200, predicted_tokens=20.0,
                             upper_tokens=30.0, arrival_s=now_s - 1.0, slo=SLO)
        tracker.iteration(tracker.requests, now_s - 0.5)
        trackers[name] = tracker
    return trackers


def test_packing_sends_a_request_that_fits_at_the_floor_to_the_busier_instance() -> None:
    now_s = 50.0
    spread = Policy(perf=AffinePerfModel(), clocks=CLOCKS, floor_mhz=1005)
    candidate = Candidate(prompt_tokens=300, predicted_tokens=20.0, upper_tokens=30.0)
    candidate_slo = RequestSlo.for_request(SLO, prompt_tokens=300, arrival_s=now_s)
    got = {pack: place(_light_instances(now_s), candidate, candidate_slo,
                       dataclasses.replace(spread, pack=pack), now_s=now_s)
           for pack in (False, True)}
    assert got[False] is not None
    assert got[True] is not None
    assert (got[False].instance, got[False].clock_mhz) == ("quiet", 1005)
    assert (got[True].instance, got[True].clock_mhz) == ("busy", 1005)


@pytest.mark.parametrize("seed", range(10))
def test_packing_still_takes_the_lowest_clock_first(seed: int) -> None:
    """Packing only breaks ties: the answer is the exhaustive minimum of (clock, −requests,
    name), whatever the early exit at the floor skips."""
    rng = random.Random(seed)
    policy = Policy(perf=AffinePerfModel(), clocks=CLOCKS,
                    floor_mhz=rng.choice([345, 1005]), pack=True)
    now_s = 100.0
    trackers = random_trackers(rng, now_s)
    prompt = rng.randint(100, 3000)
    candidate = Candidate(prompt_tokens=prompt, predicted_tokens=200.0, upper_tokens=300.0)
    candidate_slo = RequestSlo.for_request(SLO, prompt_tokens=prompt, arrival_s=now_s)
    got = place(trackers, candidate, candidate_slo, policy, now_s=now_s)
    keys = []
    for name, tracker in trackers.items():
        clock, _ = _search(tracker, policy, now_s, (candidate, candidate_slo))
        if clock is not None:
            keys.append((clock, -len(tracker), name))
    if not keys:
        assert got is None or got.reason.startswith("best effort")
    else:
        assert got is not None
        assert (got.instance, got.clock_mhz) == (min(keys)[2], min(keys)[0])


def test_the_evaluators_pack_policies_pack_and_the_others_do_not() -> None:
    from throttllem._core.scaling import ScalingPolicy  # noqa: PLC0415
    from throttllem._eval.policies import DEFAULT_POLICIES, make_policy  # noqa: PLC0415

    policy = Policy(perf=AffinePerfModel(), clocks=CLOCKS, floor_mhz=1005)
    scaling = ScalingPolicy(capacity_per_instance=10.0)
    packs = {}
    for name in ("freq", "throttllem", "freq-pack", "throttllem-pack"):
        made = make_policy(name, ["i0"], shape=SHAPE, policy=policy, predictions={},
                           scaling=scaling)
        assert made.controller.policy is not None
        packs[name] = made.controller.policy.pack
    assert packs == {"freq": False, "throttllem": False, "freq-pack": True,
                     "throttllem-pack": True}
    assert "freq-pack" not in DEFAULT_POLICIES
    assert "freq" in DEFAULT_POLICIES


def test_the_live_pack_policy_hands_place_a_packing_policy() -> None:
    from throttllem._core.controller import POLICIES, Controller  # noqa: PLC0415

    policy = Policy(perf=AffinePerfModel(), clocks=CLOCKS, floor_mhz=1005)
    packed = Controller(POLICIES["throttllem-pack"], shape=SHAPE, policy=policy)
    plain = Controller(POLICIES["throttllem"], shape=SHAPE, policy=policy)
    assert packed.policy is not None
    assert packed.policy.pack
    assert plain.policy is policy

"""`place` stops at the first instance (in tie-break order) that takes the request at the
floor clock: its answer must be the exhaustive one. Searches warm-started at each
instance's last answer must give the answers of cold ones."""

from __future__ import annotations

import dataclasses
import random

import pytest

from throttllem._core.clock_search import SupportedClocks
from throttllem._core.forecast import Candidate
from throttllem._core.perf import AffinePerfModel
from throttllem._core.placement import (
    EngineShape,
    InstanceTracker,
    Policy,
    _search,
    place,
    retune,
)
from throttllem._core.slo import SloClass
from throttllem._core.slo_check import RequestSlo

CLOCKS = SupportedClocks(tuple(range(345, 1981, 15)))
SHAPE = EngineShape(kv_block_tokens=16, kv_blocks_total=27_669, max_batch=256,
                    max_batched_tokens=8192)
SLO = SloClass(name="standard")


def exhaustive(trackers: dict[str, InstanceTracker], candidate: Candidate,
               candidate_slo: RequestSlo, policy: Policy, now_s: float) -> tuple[str, int] | None:
    keys = []
    for name, tracker in trackers.items():
        clock, _ = _search(tracker, policy, now_s, (candidate, candidate_slo))
        if clock is not None:
            keys.append((clock, len(tracker), name))
    return (min(keys)[2], min(keys)[0]) if keys else None


def random_trackers(rng: random.Random, now_s: float) -> dict[str, InstanceTracker]:
    trackers = {}
    for k in range(rng.randint(1, 5)):
        tracker = InstanceTracker(f"i{k}", SHAPE)
        for j in range(rng.randint(0, 120)):
            tracker.admitted(f"i{k}-r{j}", prompt_tokens=rng.randint(50, 4000),
                             predicted_tokens=float(rng.randint(5, 600)),
                             upper_tokens=float(rng.randint(600, 900)),
                             arrival_s=now_s - rng.uniform(0.0, 20.0), slo=SLO)
        ids = tracker.requests
        for step in range(rng.randint(0, 60)):
            tracker.iteration(ids[: rng.randint(0, len(ids))], now_s - 1.0 + step / 100)
        trackers[tracker.name] = tracker
    return trackers


@pytest.mark.parametrize("seed", range(12))
def test_early_exit_matches_the_exhaustive_placement(seed: int) -> None:
    rng = random.Random(seed)
    policy = Policy(perf=AffinePerfModel(), clocks=CLOCKS, floor_mhz=rng.choice([345, 1005]))
    now_s = 100.0
    trackers = random_trackers(rng, now_s)
    prompt = rng.randint(100, 3000)
    candidate = Candidate(prompt_tokens=prompt, predicted_tokens=200.0, upper_tokens=300.0)
    candidate_slo = RequestSlo.for_request(SLO, prompt_tokens=prompt, arrival_s=now_s)
    got = place(trackers, candidate, candidate_slo, policy, now_s=now_s)
    want = exhaustive(trackers, candidate, candidate_slo, policy, now_s)
    if want is None:
        assert got is None or got.reason.startswith("best effort")
    else:
        assert got is not None
        assert (got.instance, got.clock_mhz) == want


@pytest.mark.parametrize("seed", range(8))
def test_warm_started_searches_decide_as_cold_ones(seed: int) -> None:
    """The same stream of placements, passes and retunes on two copies of the instances,
    one policy warm-starting each search at the instance's last answer, one not: every
    decision is the same, and the warm starts were really used."""
    rng = random.Random(seed)
    cold = Policy(perf=AffinePerfModel(), clocks=CLOCKS, floor_mhz=rng.choice([345, 1005]),
                  warm_start=False)
    warm = dataclasses.replace(cold, warm_start=True)
    now_s = 100.0
    state = rng.getstate()
    copies = []
    for _ in (cold, warm):
        rng.setstate(state)
        copies.append(random_trackers(rng, now_s))
    tbt_ms = rng.choice([12.0, 20.0, 50.0])  # tight classes put answers mid-range
    slo = SloClass(name="tight", tbt_ms=tbt_ms)
    hinted = 0
    for n in range(40):
        now_s += 0.05
        prompt = rng.randint(100, 3000)
        candidate = Candidate(prompt_tokens=prompt, predicted_tokens=float(rng.randint(5, 400)),
                              upper_tokens=500.0)
        candidate_slo = RequestSlo.for_request(slo, prompt_tokens=prompt, arrival_s=now_s)
        hinted += sum(t.last_clock_mhz is not None for t in copies[1].values())
        got = [place(trackers, candidate, candidate_slo, policy, now_s=now_s)
               for trackers, policy in zip(copies, (cold, warm), strict=True)]
        assert got[0] == got[1], f"decision {n}"
        if got[0] is not None:
            for trackers in copies:
                trackers[got[0].instance].admitted(
                    f"new{n}", prompt_tokens=prompt, predicted_tokens=candidate.predicted_tokens,
                    upper_tokens=candidate.upper_tokens, arrival_s=now_s, slo=slo)
        passes = {name: t.requests[: rng.randint(0, len(t))] for name, t in copies[0].items()}
        for trackers in copies:
            for name, ids in passes.items():
                trackers[name].iteration(ids, now_s)
        clocks = [[retune(t, policy, now_s=now_s) for t in trackers.values()]
                  for trackers, policy in zip(copies, (cold, warm), strict=True)]
        assert clocks[0] == clocks[1], f"retune after decision {n}"
    assert hinted > 0

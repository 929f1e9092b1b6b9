"""`place` stops at the first instance (in tie-break order) that takes the request at the
floor clock: its answer must be the exhaustive one."""

from __future__ import annotations

import random

import pytest

from throttllem._core.clock_search import SupportedClocks
from throttllem._core.controller import (
    EngineShape,
    InstanceTracker,
    Policy,
    _search,
    perf_for,
    place,
)
from throttllem._core.forecast import Candidate
from throttllem._core.perf import AffinePerfModel
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
        state, slo = tracker.snapshot()
        clock, _ = _search(state, RequestSlo.concat([slo, candidate_slo]), policy, now_s,
                           candidate, perf=perf_for(tracker, policy, now_s))
        if clock is not None:
            keys.append((clock, len(tracker), name))
    return (min(keys)[2], min(keys)[0]) if keys else None


@pytest.mark.parametrize("seed", range(12))
def test_early_exit_matches_the_exhaustive_placement(seed: int) -> None:
    rng = random.Random(seed)
    policy = Policy(perf=AffinePerfModel(), clocks=CLOCKS, floor_mhz=rng.choice([345, 1005]))
    now_s = 100.0
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

"""The node autoscaler's pure decisions (`throttllem._core.node_config`): the predetermined
mixes, hysteresis, and reconfiguration within the node's GPUs."""

from __future__ import annotations

import itertools

import pytest

from throttllem._core.node_config import (
    NodeAction,
    NodePhase,
    NodePolicy,
    NodeState,
    TpOption,
    cheapest_mix,
    decide_node,
    frontier,
    route_pool,
    target_mix,
)
from throttllem._errors import ConfigError

# Capacities as the twin measures them have TP4 > 2 x TP2 > 4 x TP1 (superlinear); the
# tests also run a sublinear node so that the rules do not depend on that.
SUPERLINEAR = (TpOption(setup="tp1", tp_degree=1, capacity=3.0),
               TpOption(setup="tp2", tp_degree=2, capacity=10.0),
               TpOption(setup="tp4", tp_degree=4, capacity=25.0))
SUBLINEAR = (TpOption(setup="tp1", tp_degree=1, capacity=4.0),
             TpOption(setup="tp2", tp_degree=2, capacity=7.0),
             TpOption(setup="tp4", tp_degree=4, capacity=12.0))
NODES = [NodePolicy(options=o, node_gpus=8, warmup_s=60.0, cooldown_s=30.0)
         for o in (SUPERLINEAR, SUBLINEAR)]


@pytest.mark.parametrize("node", NODES)
def test_frontier_rises_in_gpus_and_capacity_and_fits_the_node(node: NodePolicy) -> None:
    table = frontier(node)
    gpus = [node.gpus(m) for m in table]
    caps = [node.capacity(m) for m in table]
    assert gpus == sorted(set(gpus))
    assert caps == sorted(set(caps))
    assert all(g <= node.node_gpus for g in gpus)
    # no mix of the node has more capacity on as few GPUs as a frontier mix
    ranges = [range(node.node_gpus // o.tp_degree + 1) for o in node.options]
    for counts in itertools.product(*ranges):
        mix = tuple((o.setup, n) for o, n in zip(node.options, counts, strict=True))
        if 0 < node.gpus(mix) <= node.node_gpus:
            best = max(node.capacity(m) for m in table if node.gpus(m) <= node.gpus(mix))
            assert node.capacity(mix) <= best


@pytest.mark.parametrize("node", NODES)
def test_cheapest_mix_meets_the_load_with_the_fewest_gpus(node: NodePolicy) -> None:
    table = frontier(node)
    top = node.capacity(table[-1])
    for k in range(1, 40):
        load = top * node.out_threshold * k / 40
        mix = cheapest_mix(node, load, node.out_threshold)
        assert node.out_threshold * node.capacity(mix) >= load
        assert all(node.out_threshold * node.capacity(m) < load for m in table
                   if node.gpus(m) < node.gpus(mix))


@pytest.mark.parametrize("node", NODES)
def test_a_constant_load_does_not_flap(node: NodePolicy) -> None:
    top = node.capacity(frontier(node)[-1])
    for k in range(1, 50):
        load = top * k / 50
        for start in frontier(node):
            first = target_mix(node, start, load)
            assert target_mix(node, first, load) == first


def _run(node: NodePolicy, loads: list[float], step_s: float = 1.0,
         drain_s: float = 5.0) -> list[NodeState]:
    """Drive `decide_node` through a load profile; a draining instance holds requests for
    `drain_s` after it starts draining."""
    state = NodeState.initial(node, frontier(node)[-1], 0.0)
    states = [state]
    for k, load in enumerate(loads):
        now = (k + 1) * step_s
        held = {i.name: (1 if i.phase is NodePhase.DRAINING and now - i.since_s < drain_s
                         else 0) for i in state.instances}
        decision = decide_node(state, load, now, node, outstanding=held)
        for change in decision.changes:
            assert change.action is NodeAction.RETARGET or change.instance
        state = decision.state
        states.append(state)
    return states


@pytest.mark.parametrize("node", NODES)
def test_reconfigurations_stay_within_the_node_and_keep_serving(node: NodePolicy) -> None:
    top = node.capacity(frontier(node)[-1])
    # down, up, down again, in steps held long enough to reconfigure fully
    levels = [0.9, 0.05, 0.3, 0.6, 0.15, 0.75, 0.02]
    loads = [top * node.out_threshold * lv for lv in levels for _ in range(400)]
    states = _run(node, loads)
    for state in states:
        assert state.gpus_used(node) <= node.node_gpus
        assert any(i.phase is NodePhase.ACTIVE for i in state.instances)
    for k in range(400, len(states), 400):  # each level settles on its target
        settled = states[k]
        assert all(i.phase is NodePhase.ACTIVE for i in settled.instances)
        assert settled.serving_mix(node) == settled.target
        load = loads[k - 1]
        assert node.capacity(settled.target) * node.out_threshold >= min(
            load, node.capacity(frontier(node)[-1]) * node.out_threshold)


def test_make_before_break_when_gpus_are_free() -> None:
    node = NODES[0]
    state = NodeState.initial(node, (("tp1", 1),), 0.0)
    load = node.out_threshold * node.option("tp4").capacity  # one TP4 is the cheapest fit
    decision = decide_node(state, load, 1.0, node)
    assert decision.state.target == (("tp1", 0), ("tp2", 0), ("tp4", 1))
    # the TP4 warms on free GPUs while the TP1 keeps serving
    assert decision.state.count("tp4", NodePhase.WARMING) == 1
    assert decision.state.count("tp1", NodePhase.ACTIVE) == 1
    ready = decide_node(decision.state, load, 1.0 + node.warmup_s, node)
    assert ready.state.count("tp4", NodePhase.ACTIVE) == 1
    assert ready.state.count("tp1", NodePhase.DRAINING) == 1  # only now does it drain
    gone = decide_node(ready.state, load, 2.0 + node.warmup_s, node, outstanding={})
    assert gone.state.names() == ["tp4-0"]


def test_break_before_make_frees_only_what_the_next_instance_needs() -> None:
    node = NodePolicy(options=SUPERLINEAR[1:], node_gpus=8, warmup_s=60.0, cooldown_s=0.0)
    state = NodeState.initial(node, (("tp2", 4),), 0.0)
    # a light load: one TP4 is cheaper than four TP2, but needs GPUs that all four hold;
    # two TP2 drain first, and the two that keep serving carry the load meanwhile
    load = 0.5 * node.out_threshold * 2 * node.option("tp2").capacity
    decision = decide_node(state, load, 1.0, node)
    assert decision.state.target == (("tp2", 0), ("tp4", 1))
    assert decision.state.count("tp2", NodePhase.DRAINING) == 2
    assert decision.state.count("tp2", NodePhase.ACTIVE) == 2
    assert decision.state.gpus_used(node) <= node.node_gpus


def test_no_hole_is_opened_that_the_load_cannot_afford() -> None:
    node = NodePolicy(options=SUPERLINEAR[1:], node_gpus=8, warmup_s=60.0, cooldown_s=0.0)
    state = NodeState.initial(node, (("tp2", 4),), 0.0)
    # a heavy load: two TP4 would carry it, but reaching them drains TP2s that it needs
    load = node.out_threshold * 0.95 * 2 * node.option("tp4").capacity
    decision = decide_node(state, load, 1.0, node)
    assert decision.state.count("tp2", NodePhase.ACTIVE) == 4
    assert not decision.state.names(phase=NodePhase.DRAINING)


def test_growing_keeps_every_instance_when_the_threshold_mix_needs_a_hole() -> None:
    node = NODES[0]
    state = NodeState.initial(node, (("tp1", 1), ("tp2", 1), ("tp4", 1)), 0.0)  # 7 GPUs
    have = node.capacity(state.target)
    load = node.out_threshold * have * 1.02  # just above what it carries
    decision = decide_node(state, load, 1.0, node)
    # the threshold mix (2 x TP4) would drain TP1 and TP2 first; adding a TP1 on the free
    # GPU covers the load without taking anything away
    assert decision.state.target == (("tp1", 2), ("tp2", 1), ("tp4", 1))
    assert decision.state.count("tp1", NodePhase.WARMING) == 1
    assert not decision.state.names(phase=NodePhase.DRAINING)


def test_bad_node_policies_are_refused() -> None:
    with pytest.raises(ConfigError, match="hysteresis"):
        NodePolicy(options=SUPERLINEAR, node_gpus=8, in_threshold=0.9, out_threshold=0.8)
    with pytest.raises(ConfigError, match="differ"):
        NodePolicy(options=(SUPERLINEAR[0], SUPERLINEAR[0]), node_gpus=8)
    with pytest.raises(ConfigError, match="cannot hold"):
        NodePolicy(options=SUPERLINEAR[2:], node_gpus=2)
    with pytest.raises(ConfigError, match="capacity"):
        TpOption(setup="x", tp_degree=1, capacity=0.0)
    with pytest.raises(ConfigError, match="GPUs"):
        NodeState.initial(NODES[0], (("tp4", 3),), 0.0)
    with pytest.raises(ConfigError, match="no pool"):
        route_pool({})


def test_route_pool_takes_the_least_work_per_capacity() -> None:
    assert route_pool({"tp4": 0.5, "tp2": 0.7}) == "tp4"
    assert route_pool({"b": 0.2, "a": 0.2}) == "a"


def test_no_shrink_through_a_hole_the_kept_instances_cannot_carry() -> None:
    node = NodePolicy(options=SUPERLINEAR, node_gpus=8, warmup_s=60.0, cooldown_s=0.0)
    state = NodeState.initial(node, (("tp4", 2),), 0.0)
    tp4 = node.option("tp4").capacity
    # the threshold mix 1 x TP2 + 1 x TP4 needs GPUs both TP4 hold: one would drain, and the
    # other alone would carry this load above the in-threshold while the TP2 warms
    load = node.in_threshold * tp4 * 1.2
    decision = decide_node(state, load, 1.0, node)
    assert decision.state.target == (("tp1", 0), ("tp2", 0), ("tp4", 2))
    assert not decision.state.names(phase=NodePhase.DRAINING)
    # at a light load the kept TP4 carries it: one TP4 drains (a plain scale-in)
    light = decide_node(state, node.in_threshold * tp4 * 0.5, 1.0, node)
    assert light.state.count("tp4", NodePhase.DRAINING) == 1


@pytest.mark.parametrize(("name", "tp", "kv_ratio"), [("h100-llama2-13b-tp1", 1, 6.25),
                                                     ("h100-llama2-13b-tp4", 4, 1.5625)])
def test_13b_tp_setups_are_derived_like_tp2(name: str, tp: int, kv_ratio: float) -> None:
    """The TP1/TP4 twin setups rescale the 8B fit as the TP2 one does, say so, and mark
    every assumption; the KV pool fits the card and shrinks per GPU with the TP degree."""
    from throttllem._twin import clockmodel as cm  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    p8, p13 = load_profile("h100-llama3-8b-tp1"), load_profile(name)
    assert p13.engine.tp_degree == tp
    assert p13.model == load_profile("h100-llama2-13b-tp2").model
    assert "not measured" in p13.description.lower()
    assert "derived" in p13.sources["time.kv_ms_per_ktoken"]
    assert "assumption" in p13.sources["time.weights_ms"] or tp == 1
    assert p13.time.kv_ms_per_ktoken == pytest.approx(p8.time.kv_ms_per_ktoken * kv_ratio,
                                                      rel=1e-4)
    per_gpu_kv = p13.model.kv_bytes_per_token / tp
    assert p13.engine.kv_blocks * p13.engine.block_tokens * per_gpu_kv < 0.9 * 80 * 2**30
    # more GPUs per instance: faster passes
    times = [float(cm.iteration_time_s(load_profile(f"h100-llama2-13b-tp{k}"), batch=64,
                                       kv_tokens=64_000, prefill_tokens=0, clock_mhz=1980))
             for k in (1, 2, 4)]
    assert times == sorted(times, reverse=True)

"""The node autoscaler in the evaluator: its own rows beside count-only scaling, on a
Llama-2-13B node of 8 GPUs mixing TP1, TP2 and TP4, with the invariants every run must keep
(no figure is asserted: the twin's numbers move as it is refined)."""

from __future__ import annotations

import pytest

from throttllem._errors import ConfigError
from throttllem._eval.driver import EvalOptions, evaluate, format_evaluation, to_document

SETUPS = ["h100-llama2-13b-tp1", "h100-llama2-13b-tp2", "h100-llama2-13b-tp4"]
POLICIES = ["default", "autoscale", "tp-autoscale", "tp-autoscale+throttllem"]


def test_node_policies_have_their_own_rows_and_keep_the_invariants() -> None:
    opts = EvalOptions(trace="conv", minutes=3.0, instances=4, peak_load=0.3,
                       setup="h100-llama2-13b-tp2", node_setups=SETUPS, policies=POLICIES,
                       warmup_s=20.0, cooldown_s=10.0)
    ev = evaluate(opts)
    assert list(ev.runs) == POLICIES
    base = ev.runs["default"].report
    refused_everywhere = base.requests_submitted - base.requests_served
    for name, run in ev.runs.items():
        r = run.report
        assert r.energy_j > 0
        assert r.requests_submitted == ev.requests
        # no request lost: every one is served or refused, and a node serves at least what
        # the fixed node does (a refusal is a prompt no engine of the model can hold)
        assert r.requests_served + r.requests_rejected == r.requests_submitted, name
        assert r.requests_served >= base.requests_served, name
        assert r.requests_rejected <= refused_everywhere, name
        # the idle floor (every provisioned GPU idling) is below what was drawn
        assert 0 < run.idle_floor_j < r.energy_j
        assert 0 < run.gpu_hours <= 8 * ev.horizon_s / 3600 + 1e-9
    for name in ("tp-autoscale", "tp-autoscale+throttllem"):
        node = ev.runs[name].node
        assert node is not None
        assert node["node_gpus"] == 8
        assert 0 < node["max_gpus_held"] <= node["node_gpus"]
        assert {t["gpus"] for t in node["thresholds"]} <= set(range(1, 9))
        assert set(node["options"]) == set(SETUPS)
        assert sum(node["serving_mix_seconds"].values()) > 0
        assert all(o["capacity_rps"] > 0 for o in node["options"].values())
    for name in ("default", "autoscale"):
        assert ev.runs[name].node is None
    table = format_evaluation(ev)
    assert "tp-autoscale+throttllem" in table
    assert "node options" in table
    doc = to_document(ev, opts)
    assert doc["policies"]["tp-autoscale"]["node"]["retargets"] >= 0


def test_node_policies_need_their_setups() -> None:
    with pytest.raises(ConfigError, match="--node-setups"):
        evaluate(EvalOptions(policies=["tp-autoscale"], setup="h100-llama2-13b-tp2"))

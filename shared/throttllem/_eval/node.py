"""The node autoscaler in the evaluator: a mix of tensor-parallel configurations on one node.

`tp-autoscale` and `tp-autoscale+throttllem` run the node autoscaler
(`throttllem._core.node_config.decide_node`: which TP configurations, how many of each, on
the node's GPUs) instead of the count-only scaler, beside `autoscale` and `throttllem` on
the same requests. Each configuration is a pool: its instances share one controller (the
very `Controller` the live forecaster drives, on that setup's engine shape and performance
model), so admission and clocks inside a pool are exactly those of `autoscale` (join the
shortest queue, default clocks) or `throttllem` (`place`, `retune`). Between pools, a
request goes to the pool whose serving instances hold the fewest outstanding requests per
unit of capacity (`route_pool`), among the pools whose engines can ever hold its prompt.

The instances of every pool live in one simulation, each on its own setup's engine and GPU
twins, so the node's energy is all of its GPUs' counters (warming and draining included):
a reconfiguration costs what its warm-ups and drains cost. Requests waiting (deferred) in a
pool left with no serving and no warming instance move to another pool; none is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from throttllem._core.controller import (
    Admit,
    Controller,
    ControllerConfig,
    Decision,
    Defer,
    Refuse,
    SetClock,
)
from throttllem._core.node_config import (
    Mix,
    NodeAction,
    NodePhase,
    NodePolicy,
    NodeState,
    TpOption,
    decide_node,
    frontier,
    route_pool,
)
from throttllem._core.placement import EngineShape, Policy, never_fits
from throttllem._core.scaling import LOAD_WINDOW_S, SCALE_TICK_S, LoadEstimator
from throttllem._core.slo import SloClass
from throttllem._core.switching import IdlePower
from throttllem._errors import ConfigError
from throttllem._eval.policies import PolicySpec
from throttllem._eval.sim import SimPolicy, Simulation
from throttllem._events import EngineIteration, RequestArrived, RequestCompleted
from throttllem._twin.costs import controller_idle_power
from throttllem._twin.profile import SetupProfile

# The node policies: the count-only `autoscale` and `throttllem`, with the node autoscaler.
NODE_POLICIES: Mapping[str, PolicySpec] = {
    "tp-autoscale": PolicySpec(admission="jsq", clocks="top", scaling=True),
    "tp-autoscale+throttllem": PolicySpec(admission="place", clocks="predictive",
                                          scaling=True),
}


@dataclass(frozen=True, slots=True)
class PoolSetup:
    """What one configuration's pool needs: its twin profile, its clock policy (predictive
    runs), and the clock costs its controller knows."""

    profile: SetupProfile
    policy: Policy | None = None
    idle_power: IdlePower | None = None
    switch_latency_s: float = 0.0


@dataclass(slots=True)
class NodeLog:
    """What the node did: when its serving mix changed, and how often it reconfigured."""

    mixes: list[tuple[float, Mix]] = field(default_factory=list)  # (t, serving mix)
    retargets: int = 0
    scale_outs: int = 0
    drains: int = 0
    cancelled: int = 0  # warm-ups called off (the target moved on before they were ready)
    moved_waiting: int = 0  # deferred requests moved out of a pool left without instances
    max_gpus_held: int = 0  # the most GPUs the node's instances held at once (any phase)
    events: list[tuple[float, str]] = field(default_factory=list)


class NodeSimPolicy(SimPolicy):
    """The node autoscaler and one controller per configuration, driving one simulation."""

    def __init__(self, name: str, *, spec: PolicySpec, node: NodePolicy,
                 pools: Mapping[str, PoolSetup], initial: Mix,
                 predictions: Mapping[str, tuple[float, float]] | None = None,
                 tick_s: float = 0.1,
                 slo_classes: Mapping[str, SloClass] | None = None) -> None:
        if spec.admission == "place" and predictions is None:
            raise ConfigError(f"policy {name!r} needs length predictions")
        missing = [o.setup for o in node.options if o.setup not in pools]
        if missing:
            raise ConfigError(f"no pool set up for {missing}")
        self.name = name
        self.node = node
        self.table = frontier(node)
        self.state = NodeState.initial(node, initial, 0.0)
        self.pools = dict(pools)
        self.shapes = {s: EngineShape.of(p.profile.setup) for s, p in pools.items()}
        self.controllers = {
            o.setup: Controller(
                ControllerConfig(admission=spec.admission, clocks=spec.clocks,
                                 idle_power=pools[o.setup].idle_power,
                                 switch_latency_s=pools[o.setup].switch_latency_s),
                shape=self.shapes[o.setup], policy=pools[o.setup].policy,
                slo_classes=slo_classes)
            for o in node.options}
        self.predictions = predictions or {}
        self.tick_s = tick_s
        self.load = LoadEstimator(LOAD_WINDOW_S, started_s=0.0)
        self.log = NodeLog()
        self._scaled_s = -math.inf
        self._started = False
        self._setup_of = {i.name: i.setup for i in self.state.instances}

    @property
    def initial_profiles(self) -> dict[str, SetupProfile]:
        """The profile of every instance the node starts with (for `Simulation`)."""
        return {i.name: self.pools[i.setup].profile for i in self.state.instances}

    @property
    def initial_names(self) -> list[str]:
        return [i.name for i in self.state.instances]

    @property
    def deferred(self) -> int:  # type: ignore[override]
        return sum(c.deferred for c in self.controllers.values())

    # ------------------------------------------------------------------ decisions out

    def _apply(self, sim: Simulation, setup: str, decisions: list[Decision]) -> None:
        controller = self.controllers[setup]
        for d in decisions:
            match d:
                case SetClock():
                    sim.set_clock(d.instance, d.clock_mhz)
                case Admit():
                    if not sim.admit(d.instance, d.request):
                        self._apply(sim, setup, controller.forget(d.request.id, sim.now_s))
                case Refuse():
                    sim.refuse(d.request_id, d.reason)
                case Defer():
                    pass

    # ------------------------------------------------------------------ routing

    def _pool_for(self, request: RequestArrived) -> str:
        """The pool to offer `request` to (see the module docstring)."""
        fits = [o for o in self.node.options
                if never_fits(self.shapes[o.setup], request.prompt_tokens) is None]
        if not fits:  # no engine can hold it: the largest refuses it, with its reason
            return max(self.node.options, key=lambda o: self.shapes[o.setup].kv_blocks_total
                       * self.shapes[o.setup].kv_block_tokens).setup
        return self._least_loaded(fits) or self._least_loaded(fits, phase=NodePhase.WARMING) \
            or max(fits, key=lambda o: o.capacity).setup

    def _least_loaded(self, options: Sequence[TpOption],
                      phase: NodePhase = NodePhase.ACTIVE) -> str | None:
        load: dict[str, float] = {}
        for o in options:
            names = self.state.names(o.setup, phase)
            if not names:
                continue
            c = self.controllers[o.setup]
            held = sum(c.outstanding.get(n, 0) for n in names) + len(c.pending)
            load[o.setup] = held / (o.capacity * len(names))
        return route_pool(load) if load else None

    def _offer(self, sim: Simulation, request: RequestArrived) -> None:
        setup = self._pool_for(request)
        lengths = self.predictions.get(request.id) if self.predictions else None
        self._apply(sim, setup, self.controllers[setup].offer(request, lengths, sim.now_s))

    # ------------------------------------------------------------------ instances

    def _scale(self, sim: Simulation) -> None:
        now_s = sim.now_s
        was = {i.name: i.phase for i in self.state.instances}
        decision = decide_node(self.state, self.load.rate_if_known(now_s), now_s, self.node,
                               outstanding={n: sim.outstanding(n) for n in sim.instances},
                               table=self.table)
        self.state = decision.state
        self.log.max_gpus_held = max(self.log.max_gpus_held, self.state.gpus_used(self.node))
        for change in decision.changes:
            if change.action is NodeAction.SCALE_OUT:
                self.log.scale_outs += 1
                sim.add_instance(change.instance, self.pools[change.setup].profile)
                self._setup_of[change.instance] = change.setup
                self._apply(sim, change.setup,
                            self.controllers[change.setup].add_instance(change.instance))
            elif change.action is NodeAction.REMOVE:
                if was.get(change.instance) is NodePhase.WARMING:
                    self.log.cancelled += 1
                sim.remove_instance(change.instance)
                self.controllers[change.setup].remove_instance(change.instance)
            elif change.action is NodeAction.DRAIN:
                self.log.drains += 1
            elif change.action is NodeAction.RETARGET:
                self.log.retargets += 1
        for o in self.node.options:
            self.controllers[o.setup].set_serving(self.state.names(o.setup, NodePhase.ACTIVE))
        if decision.changed:
            self.log.events.append((now_s, decision.reason))
            serving = self.state.serving_mix(self.node)
            if not self.log.mixes or self.log.mixes[-1][1] != serving:
                self.log.mixes.append((now_s, serving))
        self._rehome(sim)

    def _rehome(self, sim: Simulation) -> None:
        """Deferred requests of a pool with no serving and no warming instance go to
        another pool (they would wait there for ever)."""
        for o in self.node.options:
            if self.state.names(o.setup, NodePhase.ACTIVE) or self.state.names(
                    o.setup, NodePhase.WARMING):
                continue
            controller = self.controllers[o.setup]
            for waiting in list(controller.pending):
                request = waiting.request
                self._apply(sim, o.setup, controller.forget(request.id, sim.now_s))
                self.log.moved_waiting += 1
                self._offer(sim, request)

    # ------------------------------------------------------------------ hooks

    def _start(self, sim: Simulation) -> None:
        if self._started:
            return
        self._started = True
        for inst in self.state.instances:
            self._apply(sim, inst.setup, self.controllers[inst.setup].add_instance(inst.name))
        self.log.mixes.append((sim.now_s, self.state.serving_mix(self.node)))
        self.log.max_gpus_held = self.state.gpus_used(self.node)

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        self._start(sim)
        self.load.observe(request.arrival_s)
        self._offer(sim, request)

    def on_iteration(self, sim: Simulation, it: EngineIteration) -> None:
        self.controllers[self._setup_of[it.instance]].iteration(
            it.instance, it.request_ids, it.start_s + it.duration_ms / 1e3, it.duration_ms,
            engine=it)

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        setup = self._setup_of[done.instance]
        self._apply(sim, setup, self.controllers[setup].completed(done.id, done.instance,
                                                                  sim.now_s))

    def on_tick(self, sim: Simulation) -> None:
        self._start(sim)
        if sim.now_s - self._scaled_s >= SCALE_TICK_S:
            self._scaled_s = sim.now_s
            self._scale(sim)
        for setup, controller in self.controllers.items():
            self._apply(sim, setup, controller.tick(sim.now_s))


def node_simulation(name: str, node: NodePolicy, pools: Mapping[str, PoolSetup], *,
                    base: SetupProfile, predictions: Mapping[str, tuple[float, float]] | None,
                    tick_s: float, slo_classes: Mapping[str, SloClass] | None,
                    label: str | None = None) -> Simulation:
    """A simulation of `name` (one of `NODE_POLICIES`) starting on the node's largest
    predetermined mix (all of the node serving, as `default` and `autoscale` start)."""
    spec = NODE_POLICIES.get(name)
    if spec is None:
        raise ConfigError(f"unknown node policy {name!r}; known: {', '.join(NODE_POLICIES)}")
    policy = NodeSimPolicy(label or name, spec=spec, node=node, pools=pools,
                           initial=frontier(node)[-1], predictions=predictions,
                           tick_s=tick_s, slo_classes=slo_classes)
    return Simulation(base, policy.initial_names, policy, profiles=policy.initial_profiles)


@dataclass(frozen=True, slots=True)
class NodeSetup:
    """The node policy (options with their capacities) and each option's pool."""

    policy: NodePolicy
    profiles: Mapping[str, SetupProfile]
    clock_policies: Mapping[str, Policy]
    fidelity: bool

    def pools(self, name: str) -> dict[str, PoolSetup]:
        """The pools of node policy `name` (clock policies only where its clocks need
        them, as the single-setup runs)."""
        predictive = NODE_POLICIES[name].clocks == "predictive"
        return {s: PoolSetup(
            profile=p,
            policy=self.clock_policies.get(s) if predictive else None,
            idle_power=controller_idle_power(p) if predictive and self.fidelity else None,
            switch_latency_s=p.clocking.switch_latency_s if predictive else 0.0)
            for s, p in self.profiles.items()}


def build_node(setups: Sequence[str], *, node_gpus: int, base: SetupProfile,
               base_capacity: float, profile_of: Callable[[str], SetupProfile],
               capacity_of: Callable[[SetupProfile], float],
               clock_policy_of: Callable[[SetupProfile], Policy], fidelity: bool,
               warmup_s: float, cooldown_s: float) -> NodeSetup:
    """The node's options: each setup's twin profile and per-instance capacity, measured on
    the twin as the single-setup runs measure theirs (the base setup's is reused)."""
    profiles: dict[str, SetupProfile] = {}
    options: list[TpOption] = []
    models = {p.setup.model.name for p in (base, *(profile_of(s) for s in setups))}
    if len(models) != 1:
        raise ConfigError(f"a node's TP configurations serve one model; got {sorted(models)}")
    for name in dict.fromkeys(setups):
        profile = base if name in (base.name, base.path) else profile_of(name)
        if profile.name in profiles:
            raise ConfigError(f"--node-setups names {profile.name} twice")
        capacity = base_capacity if profile.name == base.name else capacity_of(profile)
        profiles[profile.name] = profile
        tp = profile.engine.tp_degree
        options.append(TpOption(setup=profile.name, tp_degree=tp, capacity=capacity,
                                label=f"tp{tp}-"))
    node = NodePolicy(options=tuple(options), node_gpus=node_gpus, warmup_s=warmup_s,
                      cooldown_s=cooldown_s)
    policies = {s: clock_policy_of(p) for s, p in profiles.items()}
    return NodeSetup(policy=node, profiles=profiles, clock_policies=policies,
                     fidelity=fidelity)


def node_summary(policy: SimPolicy, horizon_s: float) -> dict[str, Any] | None:
    """The node's figures for reports: time share of each serving mix, reconfigurations;
    None for a policy that is not a node policy."""
    if not isinstance(policy, NodeSimPolicy):
        return None
    log = policy.log
    node = policy.node

    def short(mix: Mix) -> str:  # "1×TP1 + 1×TP4" (the evaluator's labels are unique)
        return " + ".join(f"{n}×{node.option(s).prefix.rstrip('-').upper()}"
                          for s, n in mix if n) or "nothing"

    share: dict[str, float] = {}
    for k, (t, mix) in enumerate(log.mixes):
        end = log.mixes[k + 1][0] if k + 1 < len(log.mixes) else horizon_s
        share[short(mix)] = share.get(short(mix), 0.0) + max(end - t, 0.0)
    return {
        "node_gpus": policy.node.node_gpus,
        "options": {o.setup: {"tp_degree": o.tp_degree, "capacity_rps": o.capacity}
                    for o in policy.node.options},
        "thresholds": [{"mix": short(m), "gpus": policy.node.gpus(m),
                        "grow_above_rps": policy.node.out_threshold * policy.node.capacity(m)}
                       for m in policy.table],
        "serving_mix_seconds": share,
        "retargets": log.retargets, "scale_outs": log.scale_outs, "drains": log.drains,
        "cancelled_warmups": log.cancelled,
        "moved_waiting": log.moved_waiting,
        "max_gpus_held": log.max_gpus_held,
    }


def format_node_lines(summaries: Mapping[str, dict[str, Any]]) -> list[str]:
    """One line per node run: where its time went, and what reconfiguring took."""
    lines: list[str] = []
    for name, s in summaries.items():
        total = sum(s["serving_mix_seconds"].values()) or 1.0
        top = sorted(s["serving_mix_seconds"].items(), key=lambda kv: -kv[1])[:4]
        shares = ", ".join(f"{mix} {100 * t / total:.0f}%" for mix, t in top)
        lines.append(f"{name}: node of {s['node_gpus']} GPUs; serving {shares}; "
                     f"{s['retargets']} re-targets, {s['scale_outs']} warm-ups "
                     f"({s['cancelled_warmups']} called off), {s['drains']} drains")
    if summaries:
        first = next(iter(summaries.values()))
        caps = ", ".join(f"{k} {v['capacity_rps']:.2f} req/s"
                         for k, v in first["options"].items())
        lines.append(f"node options (capacity per instance): {caps}")
        steps = ", ".join(f"{t['mix']} ({t['gpus']} GPUs) up to {t['grow_above_rps']:.1f}"
                          for t in first["thresholds"])
        lines.append(f"node thresholds (req/s): {steps}")
    return lines

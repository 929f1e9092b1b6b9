"""The node autoscaler: which tensor-parallel configurations to run on a node, and how many.

The paper scales engine instances *and their configurations* (Llama-2-13B at TP1, TP2 and
TP4 on one 8-GPU node) by predetermined load thresholds, leaving fine control to frequency
scaling; its observation is that tensor parallelism gives the highest throughput per
instance, but using the fewest GPUs that meet the load matters most. `scaling.decide` only
changes the count of one setup; this module chooses the *mix*. Pure decisions, time passed
in.

**Options.** Each configuration the node may run (`TpOption`): a setup (GPU, model, TP
degree), the GPUs one instance takes (`tp_degree`) and the load one instance sustains within
its SLOs (`capacity`, profiled offline, in the load's unit).

**Predetermined thresholds** (`frontier`). Every mix of counts that fits the node's GPUs is
ranked by GPUs used (fewest first), then by capacity (most first), then by instances
(fewest: fewer to warm and drain); the frontier keeps each mix that has more capacity than
every cheaper one. `cheapest_mix(load, headroom)` is the first frontier mix with
`headroom × capacity ≥ load`, so the thresholds are the frontier's capacities times the
headroom, fixed before any load is seen.

**Hysteresis** (`target_mix`), with `in_threshold < out_threshold` as in `scaling`: grow to
`cheapest_mix(L, out)` when `L > out × capacity(current)`; shrink to `cheapest_mix(L, in)`
when that uses fewer GPUs (is cheaper) than the current mix. At a constant load neither
follows the other: after growing, `cheapest_mix(L, in)` needs at least as much capacity as
the current mix, so it is never cheaper; after shrinking, `capacity ≥ L / in > L / out`.
Target changes are `cooldown_s` apart. Growing into the threshold mix may need GPUs that
instances still serving hold; then the cheapest mix that keeps every instance, fits the free
GPUs and covers the load is taken instead where one exists, else the largest such mix when
it adds capacity, else the node stays as it is: taking capacity away while the load exceeds
what serves would only make the overload worse. Shrinking likewise takes the threshold mix
only if it is reached by drains and free GPUs alone, or if the instances it keeps carry the
load within `in_threshold` while the new ones warm; else the cheapest mix that is (the
paper gives thresholds, not how to move between mixes: these are our rules).

**Reconfiguration** (`decide_node`, every call, towards the target). An instance is warming
(ordered, drawing idle power, serving nothing for `warmup_s`), active, or draining (admitted
nothing new, removed once it holds nothing). A reconfiguration costs what draining and
warming cost: per setup, surplus warming instances are cancelled at once; a missing
instance takes back a draining one of its setup if any (warm already), else is ordered
while the node has free GPUs (make-before-break: the old instances serve until the new ones
are ready, then drain); when the GPUs are all taken, surplus instances are drained first
(fewest outstanding first, just enough to free the GPUs the next missing instance needs),
only while nothing is warming, and only when the instances that keep serving carry the load
within `out_threshold` (break-before-make; otherwise the node waits for the load to allow it).
Any free GPUs of the node may form a TP group (NVSwitch: all-to-all; placement on the
node's topology is not modelled).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from enum import Enum

import msgspec

from throttllem._errors import ConfigError

# A mix: instance count per option (setup name), every option present (0 allowed).
Mix = tuple[tuple[str, int], ...]


class TpOption(msgspec.Struct, frozen=True, kw_only=True):
    """One configuration the node may run: a setup and what one instance of it takes and
    sustains. `label` prefixes its instances' names."""

    setup: str
    tp_degree: int
    capacity: float
    label: str = ""

    def __post_init__(self) -> None:
        if self.tp_degree < 1:
            raise ConfigError(f"{self.setup}: tp_degree must be >= 1, not {self.tp_degree}")
        if not self.capacity > 0:
            raise ConfigError(f"{self.setup}: capacity must be > 0, not {self.capacity}")

    @property
    def prefix(self) -> str:
        return self.label or f"tp{self.tp_degree}-"


class NodePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The node's options, its GPU count, and the thresholds and times of `scaling`."""

    options: tuple[TpOption, ...]
    node_gpus: int
    out_threshold: float = 0.8
    in_threshold: float = 0.5
    min_instances: int = 1
    warmup_s: float = 60.0
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.options:
            raise ConfigError("a node policy needs at least one TP option")
        names = [o.setup for o in self.options]
        prefixes = [o.prefix for o in self.options]
        if len(set(names)) != len(names) or len(set(prefixes)) != len(prefixes):
            raise ConfigError(f"TP options must differ in setup and label: {names}")
        if not 0 < self.in_threshold < self.out_threshold:
            raise ConfigError(f"need 0 < in_threshold < out_threshold (hysteresis), got "
                              f"{self.in_threshold} and {self.out_threshold}")
        if self.min_instances < 1:
            raise ConfigError("min_instances must be >= 1")
        smallest = min(o.tp_degree for o in self.options)
        if self.node_gpus < smallest * self.min_instances:
            raise ConfigError(f"a node of {self.node_gpus} GPUs cannot hold "
                              f"{self.min_instances} instance(s) of any option")
        if self.warmup_s < 0 or self.cooldown_s < 0:
            raise ConfigError("warmup_s and cooldown_s must be >= 0")

    def option(self, setup: str) -> TpOption:
        for o in self.options:
            if o.setup == setup:
                return o
        raise ConfigError(f"no TP option for setup {setup!r}")

    def gpus(self, mix: Mix) -> int:
        return sum(self.option(s).tp_degree * n for s, n in mix)

    def capacity(self, mix: Mix) -> float:
        return sum(self.option(s).capacity * n for s, n in mix)


def _key(policy: NodePolicy, mix: Mix) -> tuple[int, float, int, Mix]:
    """Cheaper first: fewer GPUs, more capacity, fewer instances, then by name (a total
    order, so that every choice is deterministic)."""
    return (policy.gpus(mix), -policy.capacity(mix), sum(n for _, n in mix), mix)


@functools.lru_cache(maxsize=64)
def all_mixes(policy: NodePolicy) -> tuple[Mix, ...]:
    """Every mix that fits the node (at least `min_instances`), cheapest first."""
    options = policy.options
    ranges = [range(policy.node_gpus // o.tp_degree + 1) for o in options]
    mixes: list[Mix] = []
    for counts in itertools.product(*ranges):
        mix = tuple((o.setup, n) for o, n in zip(options, counts, strict=True))
        if sum(counts) >= policy.min_instances and policy.gpus(mix) <= policy.node_gpus:
            mixes.append(mix)
    return tuple(sorted(mixes, key=lambda m: _key(policy, m)))


@functools.lru_cache(maxsize=64)
def frontier(policy: NodePolicy) -> tuple[Mix, ...]:
    """The predetermined mixes, cheapest first, each with more capacity than every cheaper
    one (see the module docstring); computed once per policy."""
    out: list[Mix] = []
    best = 0.0
    for mix in all_mixes(policy):
        if policy.capacity(mix) > best:
            out.append(mix)
            best = policy.capacity(mix)
    return tuple(out)


def cheapest_mix(policy: NodePolicy, load: float, headroom: float,
                 table: Sequence[Mix] | None = None) -> Mix:
    """The first frontier mix with `headroom × capacity ≥ load`; the largest when none is."""
    mixes = frontier(policy) if table is None else table
    for mix in mixes:
        if headroom * policy.capacity(mix) >= load:
            return mix
    return mixes[-1]


def additions_gpus(policy: NodePolicy, have: Mix, mix: Mix) -> int:
    """GPUs the instances `mix` has beyond `have` take."""
    counts = dict(have)
    return sum(policy.option(s).tp_degree * max(0, n - counts.get(s, 0)) for s, n in mix)


def target_mix(policy: NodePolicy, current: Mix, load: float | None,
               table: Sequence[Mix] | None = None, *,
               reach: tuple[Mix, int] | None = None) -> Mix:
    """The mix to move to from `current` at `load` (None: unknown yet, stay).

    `reach` = (the instances the node has, warming ones included; its free GPUs): when
    growing into the threshold mix would first take capacity away (its new instances do not
    fit the free GPUs), the cheapest mix that keeps every instance, fits the free GPUs and
    covers the load is taken instead, if there is one (make-before-break, no hole)."""
    if load is None:
        return current
    if load > policy.out_threshold * policy.capacity(current):
        grown = cheapest_mix(policy, load, policy.out_threshold, table)
        if reach is not None and additions_gpus(policy, reach[0], grown) > reach[1]:
            have = dict(reach[0])
            keeping = [m for m in all_mixes(policy)
                       if all(n >= have.get(s, 0) for s, n in m)
                       and additions_gpus(policy, reach[0], m) <= reach[1]]
            covering = [m for m in keeping
                        if policy.out_threshold * policy.capacity(m) >= load]
            largest = max(keeping, key=policy.capacity, default=None)
            if covering:
                grown = covering[0]
            elif largest is not None and policy.capacity(largest) > policy.capacity(
                    reach[0]):  # none covers: at least use the free GPUs, hole-free
                grown = largest
            else:  # a hole while the load exceeds what serves: never affordable; stay
                grown = current
        # never "grow" into less capacity (the node's largest mix may not cover the load)
        return grown if policy.capacity(grown) > policy.capacity(current) else current
    shrunk = cheapest_mix(policy, load, policy.in_threshold, table)
    if reach is not None and not _shrink_ok(policy, reach, shrunk, load):
        shrunk = next((m for m in all_mixes(policy)
                       if policy.in_threshold * policy.capacity(m) >= load
                       and _shrink_ok(policy, reach, m, load)), current)
    return shrunk if _key(policy, shrunk) < _key(policy, current) else current


def _shrink_ok(policy: NodePolicy, reach: tuple[Mix, int], mix: Mix, load: float) -> bool:
    """Whether the node can move to `mix` without a hole, or with one that the instances
    it keeps carry within `in_threshold` (the load may rise while the new ones warm)."""
    return policy.in_threshold * _capacity_through(policy, reach, mix) >= load


def _capacity_through(policy: NodePolicy, reach: tuple[Mix, int], mix: Mix) -> float:
    """What keeps serving while the node moves from `reach` towards `mix`: everything when
    the new instances fit the free GPUs; else what is left once the smallest surplus
    instances drained free the GPUs of the largest new one (`_reconcile`'s order)."""
    have, free = reach
    adding = [policy.option(s) for s, n in mix for _ in range(max(0, n - dict(have).get(s, 0)))]
    total = policy.capacity(have)
    if sum(o.tp_degree for o in adding) <= free:
        return total
    want = dict(mix)
    surplus = sorted((policy.option(s) for s, n in have for _ in range(max(0, n - want[s]))),
                     key=lambda o: (o.capacity, o.setup))
    need = max(o.tp_degree for o in adding)
    for o in surplus:
        if free >= need:
            break
        free += o.tp_degree
        total -= o.capacity
    return total


def describe(mix: Mix) -> str:
    """`2×h100-llama2-13b-tp2 + 1×...`, or `nothing`."""
    parts = [f"{n}×{s}" for s, n in mix if n]
    return " + ".join(parts) or "nothing"


# --------------------------------------------------------------------------- reconciling


class NodePhase(Enum):
    WARMING = "warming"
    ACTIVE = "active"
    DRAINING = "draining"


class NodeInstance(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    setup: str
    phase: NodePhase
    since_s: float


class NodeAction(Enum):
    READY = "ready"          # warm-up over: serves now
    REMOVE = "remove"        # drained (or a cancelled warm-up): its GPUs are free
    SCALE_OUT = "scale-out"  # ordered: warming on free GPUs
    UNDRAIN = "undrain"      # a draining instance serves again (warm already)
    DRAIN = "drain"          # admit nothing new to it; removed once it holds nothing
    RETARGET = "retarget"    # the target mix changed (instance: empty)


class NodeChange(msgspec.Struct, frozen=True, kw_only=True):
    action: NodeAction
    instance: str
    setup: str
    reason: str


class NodeState(msgspec.Struct, frozen=True, kw_only=True):
    instances: tuple[NodeInstance, ...]
    target: Mix
    last_decision_s: float | None = None

    @classmethod
    def initial(cls, policy: NodePolicy, mix: Mix, now_s: float) -> NodeState:
        """`mix` already running and serving when the scaler starts."""
        if policy.gpus(mix) > policy.node_gpus:
            raise ConfigError(f"{describe(mix)} needs {policy.gpus(mix)} GPUs; the node has "
                              f"{policy.node_gpus}")
        full = _complete(policy, mix)
        instances = tuple(
            NodeInstance(name=f"{policy.option(s).prefix}{k}", setup=s, phase=NodePhase.ACTIVE,
                         since_s=now_s) for s, n in full for k in range(n))
        return cls(instances=instances, target=full)

    def names(self, setup: str | None = None, phase: NodePhase | None = None) -> list[str]:
        return [i.name for i in self.instances
                if (setup is None or i.setup == setup) and (phase is None or i.phase is phase)]

    def count(self, setup: str, phase: NodePhase) -> int:
        return sum(1 for i in self.instances if i.setup == setup and i.phase is phase)

    def gpus_used(self, policy: NodePolicy) -> int:
        """GPUs held by every instance that exists (warming and draining included)."""
        return sum(policy.option(i.setup).tp_degree for i in self.instances)

    def setup_of(self, name: str) -> str:
        for i in self.instances:
            if i.name == name:
                return i.setup
        raise ConfigError(f"no node instance {name!r}")

    def serving_mix(self, policy: NodePolicy) -> Mix:
        return tuple((o.setup, self.count(o.setup, NodePhase.ACTIVE)) for o in policy.options)

    def _next_name(self, option: TpOption) -> str:
        used = {i.name for i in self.instances}
        k = 0
        while f"{option.prefix}{k}" in used:
            k += 1
        return f"{option.prefix}{k}"


def _complete(policy: NodePolicy, mix: Mix) -> Mix:
    """`mix` with every option present, in option order."""
    counts = dict(mix)
    unknown = sorted(set(counts) - {o.setup for o in policy.options})
    if unknown:
        raise ConfigError(f"mix names setups the node has no option for: {unknown}")
    return tuple((o.setup, counts.get(o.setup, 0)) for o in policy.options)


class NodeDecision(msgspec.Struct, frozen=True, kw_only=True):
    state: NodeState
    changes: tuple[NodeChange, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def reason(self) -> str:
        return "; ".join(f"{c.action.value} {c.instance or describe(self.state.target)}: "
                         f"{c.reason}" for c in self.changes)


def _with(state: NodeState, name: str, phase: NodePhase | None, now_s: float) -> NodeState:
    out: list[NodeInstance] = []
    for inst in state.instances:
        if inst.name != name:
            out.append(inst)
        elif phase is not None:
            out.append(msgspec.structs.replace(inst, phase=phase, since_s=now_s))
    return msgspec.structs.replace(state, instances=tuple(out))


def decide_node(state: NodeState, load: float | None, now_s: float, policy: NodePolicy, *,
                outstanding: Mapping[str, int] | None = None,
                table: Sequence[Mix] | None = None) -> NodeDecision:
    """One step of the node autoscaler (rules in the module docstring). `load` is in the
    unit of the options' capacities (None: not known yet); `outstanding` maps instance names
    to requests they hold (missing: 0); `table` is `frontier(policy)` if precomputed."""
    held = outstanding or {}
    changes: list[NodeChange] = []

    # -- housekeeping: warm-ups end, drains finish
    for inst in state.instances:
        if inst.phase is NodePhase.WARMING and now_s - inst.since_s >= policy.warmup_s:
            state = _with(state, inst.name, NodePhase.ACTIVE, now_s)
            changes.append(NodeChange(action=NodeAction.READY, instance=inst.name,
                                      setup=inst.setup,
                                      reason=f"warm-up of {policy.warmup_s:g} s over"))
        elif (inst.phase is NodePhase.DRAINING and now_s > inst.since_s
              and max(0, held.get(inst.name, 0)) == 0):
            state = _with(state, inst.name, None, now_s)
            changes.append(NodeChange(action=NodeAction.REMOVE, instance=inst.name,
                                      setup=inst.setup, reason="drained"))

    # -- the target mix, outside the cool-down
    cooling = (state.last_decision_s is not None
               and now_s - state.last_decision_s < policy.cooldown_s)
    if not cooling:
        coming = tuple((o.setup, state.count(o.setup, NodePhase.ACTIVE)
                        + state.count(o.setup, NodePhase.WARMING)) for o in policy.options)
        free = policy.node_gpus - state.gpus_used(policy)
        # a target that needs GPUs instances still hold is judged from what serves now
        stuck = additions_gpus(policy, coming, state.target) > free
        target = _complete(policy, target_mix(
            policy, coming if stuck else state.target, load, table, reach=(coming, free)))
        if target != state.target:
            why = (f"load {load:.3g} vs capacity {policy.capacity(state.target):.3g} of "
                   f"{describe(state.target)} (out {policy.out_threshold:g}, "
                   f"in {policy.in_threshold:g})")
            state = msgspec.structs.replace(state, target=target, last_decision_s=now_s)
            changes.append(NodeChange(action=NodeAction.RETARGET, instance="", setup="",
                                      reason=why))

    # -- reconcile towards the target
    state, more = _reconcile(state, now_s, policy, held, load)
    changes.extend(more)
    return NodeDecision(state=state, changes=tuple(changes))


def _reconcile(state: NodeState, now_s: float, policy: NodePolicy,
               held: Mapping[str, int], load: float | None,
               ) -> tuple[NodeState, list[NodeChange]]:
    changes: list[NodeChange] = []
    want = dict(state.target)
    # surplus warming instances: cancelled (they hold nothing)
    for o in policy.options:
        s = o.setup
        while (state.count(s, NodePhase.ACTIVE) + state.count(s, NodePhase.WARMING) > want[s]
               and state.count(s, NodePhase.WARMING)):
            name = state.names(s, NodePhase.WARMING)[-1]
            state = _with(state, name, None, now_s)
            changes.append(NodeChange(action=NodeAction.REMOVE, instance=name, setup=s,
                                      reason="warm-up cancelled: no longer in the target"))
    # missing instances: take back a draining one, else order on free GPUs
    blocked: list[TpOption] = []
    for o in sorted(policy.options, key=lambda o: -o.tp_degree):
        s = o.setup
        while state.count(s, NodePhase.ACTIVE) + state.count(s, NodePhase.WARMING) < want[s]:
            draining = state.names(s, NodePhase.DRAINING)
            if draining:
                state = _with(state, draining[-1], NodePhase.ACTIVE, now_s)
                changes.append(NodeChange(action=NodeAction.UNDRAIN, instance=draining[-1],
                                          setup=s, reason="in the target again"))
                continue
            if policy.node_gpus - state.gpus_used(policy) < o.tp_degree:
                blocked.append(o)
                break
            name = state._next_name(o)
            state = msgspec.structs.replace(state, instances=(
                *state.instances,
                NodeInstance(name=name, setup=s, phase=NodePhase.WARMING, since_s=now_s)))
            changes.append(NodeChange(action=NodeAction.SCALE_OUT, instance=name, setup=s,
                                      reason=f"target {describe(state.target)}, warming "
                                             f"{policy.warmup_s:g} s"))
    # surplus active instances: drain
    surplus = [i for o in policy.options
               for i in sorted((i for i in state.instances
                                if i.setup == o.setup and i.phase is NodePhase.ACTIVE),
                               key=lambda i: (max(0, held.get(i.name, 0)), i.name))
               [: max(0, state.count(o.setup, NodePhase.ACTIVE)
                      + state.count(o.setup, NodePhase.WARMING) - want[o.setup])]]
    # smallest first (what a hole costs least), then fewest outstanding
    surplus.sort(key=lambda i: (policy.option(i.setup).capacity, max(0, held.get(i.name, 0)),
                                i.name))
    warming = any(i.phase is NodePhase.WARMING for i in state.instances)
    if not blocked and not warming:
        to_drain = surplus  # make-before-break done, or a plain scale-in
    elif blocked and not warming:  # break-before-make: free just what the next one needs
        need = blocked[0].tp_degree
        freeing = policy.node_gpus - state.gpus_used(policy) + sum(
            policy.option(i.setup).tp_degree for i in state.instances
            if i.phase is NodePhase.DRAINING)
        to_drain = []
        for inst in surplus:
            if freeing >= need:
                break
            to_drain.append(inst)
            freeing += policy.option(inst.setup).tp_degree
        # a hole only where what keeps serving carries the load within the out threshold
        staying = sum(policy.option(i.setup).capacity for i in state.instances
                      if i.phase is NodePhase.ACTIVE and i not in to_drain)
        if load is None or load > policy.out_threshold * staying:
            to_drain = []
    else:
        to_drain = []
    for inst in to_drain:
        state = _with(state, inst.name, NodePhase.DRAINING, now_s)
        changes.append(NodeChange(
            action=NodeAction.DRAIN, instance=inst.name, setup=inst.setup,
            reason=(f"not in the target {describe(state.target)}; "
                    f"{max(0, held.get(inst.name, 0))} outstanding")))
    return state, changes


def route_pool(load_per_capacity: Mapping[str, float]) -> str:
    """The pool a new request joins: the least outstanding work per unit of serving
    capacity (the node's join-shortest-queue across configurations), ties by name."""
    if not load_per_capacity:
        raise ConfigError("no pool serves")
    return min(load_per_capacity, key=lambda s: (load_per_capacity[s], s))

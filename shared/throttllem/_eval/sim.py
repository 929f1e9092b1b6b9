"""The discrete-event simulation behind `throttllem evaluate`: engine twins in simulated time.

No bus and no wall clock. Four kinds of event, kept in one heap of next-event times:

- arrivals, read from the (time-scaled) trace window in order, one pushed at a time;
- iteration ends: an engine instance runs one pass (`EngineTwin.step`) when it starts; its
  effects (tokens, completions) become visible at the pass's end, where the next pass starts;
  only the instance whose pass ends next is stepped;
- controller ticks, every `tick_s` simulated seconds, for policies that ask for them;
- timeline samples, every `sample_s`, which read every GPU's energy counter for the plots.

Events at the same instant run in this order: pass ends (completions free capacity), arrivals,
ticks, samples, then pass starts (so that several admissions at one instant share the next
pass, as the live engine drains its inbox before stepping).

The policy (`throttllem._eval.policies`) sees the same things the live forecaster and scaler
see (arrivals, `engine.iteration`, `request.completed`) and acts through `admit`, `set_clock`,
`add_instance` and `remove_instance`, calling exactly the core functions the live services
call. Clocks are applied directly with `GpuTwin.set_locked_clocks` (min = max, as the
actuator does): the actuator's lease is moot here, since a simulated controller never dies.

Energy is each GPU twin's energy counter, idle included: an instance draws power from the
moment it is added (warm-up included) until it is removed or the run's horizon
(`Simulation.finish`); instance-seconds are counted over the same spans.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from throttllem._core.report import ClockAccumulator
from throttllem._errors import ConfigError, RequestRejectedError
from throttllem._events import EngineIteration, RequestArrived, RequestCompleted
from throttllem._twin.engine import EngineTwin, IterationOutcome
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import SetupProfile

# Seconds of simulated time per timeline bin (the plots' resolution).
DEFAULT_SAMPLE_S = 5.0

# Order of simultaneous events.
_END, _ARRIVAL, _TICK, _SAMPLE, _START = 0, 1, 2, 3, 4


@dataclass(slots=True)
class _Instance:
    name: str
    gpu: GpuTwin
    engine: EngineTwin
    gpu_indices: tuple[int, ...]
    added_s: float
    removed_s: float | None = None
    scheduled: bool = False  # a pass start or end is in the heap
    inflight: IterationOutcome | None = None
    clock_mhz: int | None = None  # locked clock, None: GPU default

    def energy_mj(self) -> float:
        return sum(self.gpu.energy_mj(i) for i in self.gpu_indices)


@dataclass(slots=True)
class Timeline:
    """What the plots show, in bins of `sample_s` simulated seconds: energy drawn in each bin
    (all GPUs, J), the busy-time-weighted SM clock of the passes ending in it, and how many
    instances existed at its end."""

    sample_s: float
    t_s: list[float] = field(default_factory=list)  # bin ends
    energy_j: list[float] = field(default_factory=list)
    clock_mhz: list[float] = field(default_factory=list)  # nan: no pass ended in the bin
    instances: list[int] = field(default_factory=list)
    _busy_s: float = 0.0
    _clock_x_s: float = 0.0
    _last_energy_j: float = 0.0

    def add_pass(self, duration_s: float, clock_mhz: float) -> None:
        self._busy_s += duration_s
        self._clock_x_s += clock_mhz * duration_s

    def close_bin(self, t_s: float, energy_total_j: float, instances: int) -> None:
        self.t_s.append(t_s)
        self.energy_j.append(energy_total_j - self._last_energy_j)
        self._last_energy_j = energy_total_j
        self.clock_mhz.append(self._clock_x_s / self._busy_s if self._busy_s > 0 else math.nan)
        self.instances.append(instances)
        self._busy_s = self._clock_x_s = 0.0


@dataclass(slots=True)
class SimResult:
    """What one policy's run produced; energy is read by `Simulation.finish`."""

    completions: list[RequestCompleted] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    clocks: ClockAccumulator = field(default_factory=ClockAccumulator)
    timeline: Timeline = field(default_factory=lambda: Timeline(sample_s=DEFAULT_SAMPLE_S))
    submitted: int = 0
    end_s: float = 0.0  # the last event of the run (a completion, usually)
    iterations: int = 0
    ticks: int = 0


class SimPolicy:
    """What drives a simulation: the hooks it calls (the evaluator's policies implement
    them); the base does nothing and wants no ticks."""

    name = "base"
    tick_s: float | None = None
    deferred = 0

    def on_arrival(self, sim: Simulation, request: RequestArrived) -> None:
        raise NotImplementedError

    def on_iteration(self, sim: Simulation, it: EngineIteration) -> None:
        return None

    def on_completed(self, sim: Simulation, done: RequestCompleted) -> None:
        return None

    def on_tick(self, sim: Simulation) -> None:
        return None


class Simulation:
    """Engine twins (each on its own GpuTwin) driven by one policy in simulated time."""

    def __init__(self, profile: SetupProfile, instances: Sequence[str],
                 policy: SimPolicy, *, sample_s: float = DEFAULT_SAMPLE_S,
                 profiles: Mapping[str, SetupProfile] | None = None) -> None:
        if not instances:
            raise ConfigError("a simulation needs at least one instance")
        if not sample_s > 0:
            raise ConfigError(f"sample_s must be > 0, not {sample_s}")
        self.profile = profile
        self.policy = policy
        self.now_s = 0.0
        self._inst: dict[str, _Instance] = {}
        self._removed: list[_Instance] = []
        for name in instances:  # `profiles`: an instance's own setup, where it has one
            self.add_instance(name, (profiles or {}).get(name))
        self._heap: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self.result = SimResult(timeline=Timeline(sample_s=sample_s))

    # ------------------------------------------------------------------ what policies use

    @property
    def instances(self) -> list[str]:
        """Instances that exist now (warming, serving or draining), in creation order."""
        return list(self._inst)

    def add_instance(self, name: str, profile: SetupProfile | None = None) -> None:
        """A new engine instance exists from now on: its GPUs draw idle power at once (the
        policy decides when it serves, i.e. how long it warms up). `profile`: its own setup
        (a node mixing TP configurations); default: the simulation's."""
        if name in self._inst:
            raise ConfigError(f"instance {name!r} exists already")
        gpu = GpuTwin(profile or self.profile, start_s=self.now_s)
        engine = EngineTwin(profile or self.profile, name, gpu)
        self._inst[name] = _Instance(name, gpu, engine, tuple(range(gpu.gpu_count())),
                                     added_s=self.now_s)

    def remove_instance(self, name: str) -> None:
        """Stop an instance that holds no request: its GPUs draw nothing from now on."""
        inst = self._inst[name]
        if inst.engine.has_work() or inst.inflight is not None:
            raise ConfigError(f"instance {name!r} still holds requests; drain it first")
        inst.gpu.idle_until(self.now_s)
        inst.removed_s = self.now_s
        self._removed.append(self._inst.pop(name))

    def outstanding(self, name: str) -> int:
        """Requests the engine holds (running or queued)."""
        engine = self._inst[name].engine
        return engine.running_count + engine.queue_len

    def admit(self, instance: str, request: RequestArrived) -> bool:
        """Hand a request to an engine now. False: the engine refused it (it can never fit:
        reported as rejected, as the live engine's final `request.deferred`)."""
        inst = self._inst[instance]
        try:
            inst.engine.admit(request, admitted_s=self.now_s)
        except RequestRejectedError as e:
            self.result.rejected[request.id] = f"{instance}: {e}"
            return False
        if not inst.scheduled:
            inst.scheduled = True
            self._push(self.now_s, _START, instance)
        return True

    def refuse(self, request_id: str, reason: str) -> None:
        """The controller refuses a request for good (the live forecaster's final
        `request.deferred`): reported as rejected, never served."""
        self.result.rejected[request_id] = reason

    def set_clock(self, instance: str, clock_mhz: int | None) -> None:
        """Lock every GPU of the instance at `clock_mhz` (None: default clocks), as the
        actuator does; takes effect from the instance's next pass."""
        inst = self._inst[instance]
        if clock_mhz == inst.clock_mhz:
            return
        for i in inst.gpu_indices:  # asked for now; in effect one switch latency later
            if clock_mhz is None:
                inst.gpu.reset_locked_clocks(i, at_s=self.now_s)
            else:
                inst.gpu.set_locked_clocks(i, clock_mhz, clock_mhz, at_s=self.now_s)
        inst.clock_mhz = clock_mhz

    def clock_mhz(self, instance: str) -> int | None:
        return self._inst[instance].clock_mhz

    # ------------------------------------------------------------------ the loop

    def _push(self, t: float, kind: int, instance: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, instance))

    def _energy_at_j(self, t_s: float) -> float:
        """Energy of all GPUs up to `t_s`, read without advancing any GPU (a GPU idle since
        its last pass counts idle power up to `t_s`; one busy past `t_s` counts its pass)."""
        total_mj = sum(inst.energy_mj() for inst in self._removed)
        for inst in self._inst.values():
            for i in inst.gpu_indices:
                gap_s = max(t_s - inst.gpu.now_s(i), 0.0)
                total_mj += inst.gpu.energy_mj(i) + (
                    inst.gpu.idle_power_w(i) * 1e3 * gap_s if gap_s > 0 else 0.0)
        return total_mj / 1e3

    def run(self, requests: Sequence[RequestArrived]) -> SimResult:
        """Serve `requests` (sorted by arrival) to the end: every request completes or is
        rejected. Returns the result (energy: call `finish`)."""
        res = self.result
        res.submitted = len(requests)
        policy = self.policy
        tick_s = policy.tick_s
        sample_s = res.timeline.sample_s
        next_arrival = 0
        if requests:
            self._push(requests[0].arrival_s, _ARRIVAL)
        if tick_s is not None:
            self._push(0.0, _TICK)
        self._push(sample_s, _SAMPLE)
        heap = self._heap
        total = len(requests)
        while heap:
            t, kind, _, name = heapq.heappop(heap)
            self.now_s = t
            if kind == _END:
                inst = self._inst[name]
                outcome = inst.inflight
                assert outcome is not None
                inst.inflight = None
                it = outcome.iteration
                res.clocks.add(it)
                res.timeline.add_pass(it.duration_ms / 1e3, it.clock_mhz)
                res.iterations += 1
                policy.on_iteration(self, it)
                if outcome.completed:
                    res.completions.extend(outcome.completed)
                    res.end_s = t
                    for completed in outcome.completed:
                        policy.on_completed(self, completed)
                self._push(t, _START, name)
            elif kind == _START:
                starting = self._inst.get(name)
                if starting is None:  # removed after its last pass ended
                    continue
                inst = starting
                stepped = inst.engine.step(t)
                if stepped is None:
                    inst.scheduled = False
                    continue
                inst.inflight = stepped
                it = stepped.iteration
                self._push(it.start_s + it.duration_ms / 1e3, _END, name)
            elif kind == _ARRIVAL:
                policy.on_arrival(self, requests[next_arrival])
                res.end_s = max(res.end_s, t)
                next_arrival += 1
                if next_arrival < total:
                    self._push(requests[next_arrival].arrival_s, _ARRIVAL)
            else:
                finished = len(res.completions) + len(res.rejected)
                more = next_arrival < total or finished < total
                if kind == _TICK:
                    assert tick_s is not None
                    res.ticks += 1
                    policy.on_tick(self)
                    if more:
                        self._push(t + tick_s, _TICK)
                elif more:  # after the last request, `finish` closes the last bin
                    res.timeline.close_bin(t, self._energy_at_j(t), len(self._inst))
                    self._push(t + sample_s, _SAMPLE)
        if len(res.completions) + len(res.rejected) != total:  # pragma: no cover - a bug
            raise RuntimeError(f"simulation ended with {total - len(res.completions)} "
                               f"requests neither served nor rejected")
        return res

    def finish(self, horizon_s: float | None = None) -> float:
        """Idle every GPU up to `horizon_s` (default: the run's last event) and return the
        energy (J) of all GPUs since the start, idle included."""
        end = self.result.end_s if horizon_s is None else max(horizon_s, self.result.end_s)
        for inst in self._inst.values():
            inst.gpu.idle_until(end)
        total_j = self._energy_at_j(end)
        tl = self.result.timeline
        if not tl.t_s or tl.t_s[-1] < end:
            tl.close_bin(end, total_j, len(self._inst))
        return total_j

    def gpu_energy_mj(self) -> list[float]:
        """Every GPU's energy counter now (mJ), instance by instance, removed ones first."""
        return [inst.gpu.energy_mj(i) for inst in (*self._removed, *self._inst.values())
                for i in inst.gpu_indices]

    def gpu_seconds(self, horizon_s: float) -> float:
        """Seconds each GPU existed (drew power), summed, up to `horizon_s`."""
        return sum(((horizon_s if inst.removed_s is None else inst.removed_s) - inst.added_s)
                   * len(inst.gpu_indices) for inst in (*self._removed, *self._inst.values()))

    def gpu_count(self) -> int:
        """GPUs of every instance that ever existed."""
        return sum(len(inst.gpu_indices) for inst in (*self._removed, *self._inst.values()))

    def instance_seconds(self, horizon_s: float) -> float:
        """Seconds each instance existed (drew power), summed, up to `horizon_s`."""
        return sum((horizon_s if inst.removed_s is None else inst.removed_s) - inst.added_s
                   for inst in (*self._removed, *self._inst.values()))

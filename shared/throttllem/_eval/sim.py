"""The discrete-event simulation behind `throttllem evaluate`: engine twins in simulated time.

No bus and no wall clock. Three kinds of event, kept in one heap of next-event times:

- arrivals, read from the (time-scaled) trace window in order, one pushed at a time;
- iteration ends: an engine instance runs one pass (`EngineTwin.step`) when it starts; its
  effects (tokens, completions) become visible at the pass's end, where the next pass starts;
  only the instance whose pass ends next is stepped;
- controller ticks, every `tick_s` simulated seconds, for policies that ask for them.

Events at the same instant run in this order: pass ends (completions free capacity), arrivals,
ticks, then pass starts (so that several admissions at one instant share the next pass, as
the live engine drains its inbox before stepping).

The policy (`throttllem._eval.policies`) sees the same things the live forecaster sees
(arrivals, `engine.iteration`, `request.completed`) and acts through `admit` and `set_clock`,
calling exactly the core functions the live services call. Clocks are applied directly with
`GpuTwin.set_locked_clocks` (min = max, as the actuator does): the actuator's lease is moot
here, since a simulated controller never dies, so it is not modelled.

Energy is each GPU twin's energy counter, idle included, integrated from 0 to the run's
horizon (`Simulation.finish`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from throttllem._core.report import ClockAccumulator
from throttllem._errors import RequestRejectedError
from throttllem._events import RequestArrived, RequestCompleted
from throttllem._twin.engine import EngineTwin, IterationOutcome
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import SetupProfile

if TYPE_CHECKING:
    from throttllem._eval.policies import SimPolicy

# Order of simultaneous events.
_END, _ARRIVAL, _TICK, _START = 0, 1, 2, 3


@dataclass(slots=True)
class _Instance:
    name: str
    gpu: GpuTwin
    engine: EngineTwin
    gpu_indices: tuple[int, ...]
    scheduled: bool = False  # a pass start or end is in the heap
    inflight: IterationOutcome | None = None
    clock_mhz: int | None = None  # locked clock, None: GPU default


@dataclass(slots=True)
class SimResult:
    """What one policy's run produced; energy is read by `Simulation.finish`."""

    completions: list[RequestCompleted] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    clocks: ClockAccumulator = field(default_factory=ClockAccumulator)
    submitted: int = 0
    end_s: float = 0.0  # the last event of the run (a completion, usually)
    iterations: int = 0
    ticks: int = 0


class Simulation:
    """N engine twins (each on its own GpuTwin) driven by one policy in simulated time."""

    def __init__(self, profile: SetupProfile, instances: Sequence[str],
                 policy: SimPolicy) -> None:
        if not instances:
            raise ValueError("a simulation needs at least one instance")
        self.profile = profile
        self.policy = policy
        self._inst: dict[str, _Instance] = {}
        for name in instances:
            gpu = GpuTwin(profile)
            engine = EngineTwin(profile, name, gpu)
            self._inst[name] = _Instance(name, gpu, engine,
                                         tuple(range(profile.engine.tp_degree)))
        self._heap: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self.now_s = 0.0
        self.result = SimResult()

    # ------------------------------------------------------------------ what policies use

    @property
    def instances(self) -> list[str]:
        return list(self._inst)

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

    def set_clock(self, instance: str, clock_mhz: int | None) -> None:
        """Lock every GPU of the instance at `clock_mhz` (None: default clocks), as the
        actuator does; takes effect from the instance's next pass."""
        inst = self._inst[instance]
        if clock_mhz == inst.clock_mhz:
            return
        for i in inst.gpu_indices:
            if clock_mhz is None:
                inst.gpu.reset_locked_clocks(i)
            else:
                inst.gpu.set_locked_clocks(i, clock_mhz, clock_mhz)
        inst.clock_mhz = clock_mhz

    def clock_mhz(self, instance: str) -> int | None:
        return self._inst[instance].clock_mhz

    # ------------------------------------------------------------------ the loop

    def _push(self, t: float, kind: int, instance: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, instance))

    def run(self, requests: Sequence[RequestArrived]) -> SimResult:
        """Serve `requests` (sorted by arrival) to the end: every request completes or is
        rejected. Returns the result (energy: call `finish`)."""
        res = self.result
        res.submitted = len(requests)
        policy = self.policy
        tick_s = policy.tick_s
        next_arrival = 0
        if requests:
            self._push(requests[0].arrival_s, _ARRIVAL)
        if tick_s is not None:
            self._push(0.0, _TICK)
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
                res.iterations += 1
                policy.on_iteration(self, it)
                if outcome.completed:
                    res.completions.extend(outcome.completed)
                    res.end_s = t
                    for completed in outcome.completed:
                        policy.on_completed(self, completed)
                self._push(t, _START, name)
            elif kind == _START:
                inst = self._inst[name]
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
            else:  # tick
                assert tick_s is not None
                res.ticks += 1
                policy.on_tick(self)
                finished = len(res.completions) + len(res.rejected)
                if next_arrival < total or finished < total:
                    self._push(t + tick_s, _TICK)
        if len(res.completions) + len(res.rejected) != total:  # pragma: no cover - a bug
            raise RuntimeError(f"simulation ended with {total - len(res.completions)} "
                               f"requests neither served nor rejected")
        return res

    def finish(self, horizon_s: float | None = None) -> float:
        """Idle every GPU up to `horizon_s` (default: the run's last event) and return the
        energy (J) of all GPUs since the start, idle included."""
        end = self.result.end_s if horizon_s is None else max(horizon_s, self.result.end_s)
        total_mj = 0.0
        for inst in self._inst.values():
            inst.gpu.idle_until(end)
            total_mj += sum(inst.gpu.energy_mj(i) for i in range(inst.gpu.gpu_count()))
        return total_mj / 1e3

    def gpu_energy_mj(self) -> list[float]:
        """Every GPU's energy counter now (mJ), instance by instance."""
        return [inst.gpu.energy_mj(i) for inst in self._inst.values()
                for i in range(inst.gpu.gpu_count())]

    def gpu_count(self) -> int:
        return sum(inst.gpu.gpu_count() for inst in self._inst.values())


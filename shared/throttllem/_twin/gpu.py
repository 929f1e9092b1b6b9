"""The GPU twin: the NVML surface (clocks, locks, power, energy counter) of simulated GPUs.

It implements `GpuBackend`, so the actuator and the telemetry collector cannot tell it from
NVML. It only moves forward in simulated time when told to: `run_iteration` (the engine twin
runs a forward pass) or `idle_until` (nothing ran until then). It never reads the wall clock;
`read` reports the state as of the last advance, so a sampler in simulated time calls
`idle_until(now_s)` first.

Behaviour, per GPU:
- busy: runs at the locked maximum (or the default clock when unlocked), lowered to the
  highest supported clock whose modelled power fits under the cap (the power limit wins over
  a locked floor, as on real cards); time and power from `clockmodel`;
- idle: draws the unlocked idle power (`[gpu] idle_power_w`) when no clock is locked, and the
  profile's locked idle power at the locked minimum when one is (`[clocking] locked_idle_w`;
  "flat": the unlocked figure whatever the lock); reports the locked minimum as its SM clock,
  or the idle clock when unlocked;
- a clock change (lock or release) takes `[clocking] switch_latency_s` to complete: the old
  clock holds until then, so a pass that starts earlier runs at the old clock; NVML's view of
  the lock (`locked_clocks_mhz`) is the one asked for, as on a real card;
- the energy counter (mJ, monotone) starts at 0 when the twin is built.
Tensor parallelism: an iteration on several GPUs lasts as long as the slowest (they meet at
every all-reduce); faster ones idle for the rest of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from throttllem._errors import ClockOutOfRangeError, GpuError, GpuNotFoundError
from throttllem._gpu.backend import GpuReading
from throttllem._twin.clockmodel import ScalarClockModel
from throttllem._twin.profile import SetupProfile, locked_idle_power_w

# Simulated times closer than this are the same instant (float noise of summed durations).
_TIME_EPS_S = 1e-9


class GpuIterationResult(NamedTuple):
    """One iteration across the GPUs it ran on: energy and power summed over them."""

    duration_s: float
    energy_mj: float
    clock_mhz: float
    power_w: float


@dataclass(slots=True)
class _GpuState:
    now_s: float
    energy_mj: float = 0.0
    lock: tuple[int, int] | None = None
    # A change asked for and not yet in effect: (when it takes effect, the new lock).
    pending: tuple[float, tuple[int, int] | None] | None = None
    power_w: float = 0.0
    clock_mhz: float = 0.0
    util_pct: float = 0.0
    mem_util_pct: float = 0.0


class GpuTwin:
    """Simulated GPUs of one setup (`count` of them, default the profile's TP degree)."""

    name: str = "twin"

    def __init__(self, profile: SetupProfile, *, count: int | None = None,
                 start_s: float = 0.0, uuid_prefix: str = "GPU-twin",
                 switch_latency_s: float | None = None) -> None:
        """`switch_latency_s` overrides the profile's (0: a lock takes effect at once, as for
        a profiler that waits for each lock to settle before it measures)."""
        n = profile.engine.tp_degree if count is None else count
        if n < 1:
            raise ValueError("a GpuTwin needs at least one GPU")
        self.profile = profile
        self._clocks = profile.gpu.supported_clocks_mhz
        self._clock_set = frozenset(self._clocks)
        self._uuid_prefix = uuid_prefix
        self._switch_s = (profile.clocking.switch_latency_s if switch_latency_s is None
                          else switch_latency_s)
        if self._switch_s < 0:
            raise ValueError("switch_latency_s must be >= 0")
        self._idle_points = profile.clocking.locked_idle_points
        self._idle_w_at: dict[tuple[int, int], float] = {}  # lock -> idle watts
        self._scalar = ScalarClockModel(profile)  # the clock model, per-clock terms kept
        self._gpus = [_GpuState(now_s=start_s) for _ in range(n)]
        for i in range(n):
            self._set_idle_reading(i)

    # ------------------------------------------------------------------ GpuBackend

    def gpu_count(self) -> int:
        return len(self._gpus)

    def read(self, index: int) -> GpuReading:
        s = self._state(index)
        return GpuReading(power_w=s.power_w, energy_mj=s.energy_mj, sm_clock_mhz=s.clock_mhz,
                          mem_clock_mhz=float(self.profile.gpu.mem_clock_mhz),
                          gpu_util_pct=s.util_pct, mem_util_pct=s.mem_util_pct,
                          uuid=f"{self._uuid_prefix}-{index}",
                          name=f"{self.profile.gpu.name} (twin)")

    def supported_clocks_mhz(self, index: int) -> tuple[int, ...]:
        self._state(index)
        return self._clocks

    def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int, *,
                          at_s: float | None = None) -> None:
        """Lock the SM clock into [min, max]; both must be supported clocks, min ≤ max.
        `at_s`: when it is asked for (default: the GPU's latest simulated time); it takes
        effect `switch_latency_s` later."""
        self._state(index)
        for value in (min_mhz, max_mhz):
            if value not in self._clock_set:
                raise ClockOutOfRangeError(
                    f"{value} MHz is not a supported SM clock of {self.profile.gpu.name} "
                    f"(twin GPU {index}); supported: {self._range_text()}")
        if min_mhz > max_mhz:
            raise ClockOutOfRangeError(
                f"locked clock range is empty: min {min_mhz} MHz > max {max_mhz} MHz "
                f"(supported: {self._range_text()})")
        self._change(index, (int(min_mhz), int(max_mhz)), at_s)

    def reset_locked_clocks(self, index: int, *, at_s: float | None = None) -> None:
        self._state(index)
        self._change(index, None, at_s)

    def _change(self, index: int, lock: tuple[int, int] | None, at_s: float | None) -> None:
        s = self._gpus[index]
        if self._switch_s == 0.0:
            s.lock, s.pending = lock, None
        else:
            when = s.now_s if at_s is None else at_s
            self._commit(s, when)
            # A change asked for while another is in flight replaces it; either way the
            # clock in effect now holds for one switch latency.
            s.pending = (when + self._switch_s, lock)
        if s.util_pct == 0.0:
            self._set_idle_reading(index)

    @staticmethod
    def _commit(s: _GpuState, t: float) -> None:
        if s.pending is not None and t >= s.pending[0] - _TIME_EPS_S:
            s.lock, s.pending = s.pending[1], None

    def _lock_at(self, s: _GpuState, t: float) -> tuple[int, int] | None:
        if s.pending is not None and t >= s.pending[0] - _TIME_EPS_S:
            return s.pending[1]
        return s.lock

    def idle_power_w(self, index: int, at_s: float | None = None) -> float:
        """What the GPU draws idle at `at_s` (default: its latest time), given the lock then."""
        s = self._state(index)
        return self._idle_w(self._lock_at(s, s.now_s if at_s is None else at_s))

    def _idle_w(self, lock: tuple[int, int] | None) -> float:
        if lock is None or self._idle_points is None:
            return self.profile.gpu.idle_power_w
        watts = self._idle_w_at.get(lock)
        if watts is None:
            watts = locked_idle_power_w(self._idle_points, float(lock[0]))
            self._idle_w_at[lock] = watts
        return watts

    # ------------------------------------------------------------------ twin-only

    def locked_clocks_mhz(self, index: int) -> tuple[int, int] | None:
        """The lock asked for last (what NVML reports), whether or not it is in effect yet."""
        s = self._state(index)
        return s.pending[1] if s.pending is not None else s.lock

    def switch_done_s(self, index: int) -> float | None:
        """When the clock change in flight takes effect; None: none is in flight."""
        s = self._state(index)
        return None if s.pending is None else s.pending[0]

    def requested_clock_mhz(self, index: int, at_s: float | None = None) -> int:
        """The clock a busy GPU asks for at `at_s` (default: its latest time): the locked
        maximum in effect then, else the default clock."""
        s = self._state(index)
        lock = self._lock_at(s, s.now_s if at_s is None else at_s)
        return lock[1] if lock is not None else self.profile.gpu.default_clock_mhz

    def now_s(self, index: int = 0) -> float:
        return self._state(index).now_s

    def energy_mj(self, index: int = 0) -> float:
        return self._state(index).energy_mj

    def idle_until(self, now_s: float, indices: Iterable[int] | None = None) -> None:
        """Advance idle GPUs to `now_s`, integrating idle power; earlier times are a no-op."""
        for i in self._indices(indices):
            s = self._gpus[i]
            if now_s > s.now_s + _TIME_EPS_S:
                if s.pending is not None and s.now_s < s.pending[0] < now_s:
                    # the switch completes during the idle span: old lock's power before it
                    s.energy_mj += self._idle_w(s.lock) * (s.pending[0] - s.now_s) * 1e3
                    s.now_s = s.pending[0]
                    self._commit(s, s.now_s)
                s.energy_mj += self._idle_w(self._lock_at(s, s.now_s)) * (now_s - s.now_s) * 1e3
                s.now_s = now_s
                self._commit(s, now_s)
                self._set_idle_reading(i)

    def run_iteration(self, start_s: float, *, batch: int, kv_tokens: int, prefill_tokens: int,
                      prefill_attn_tokens2: float = 0.0,
                      indices: Iterable[int] | None = None) -> GpuIterationResult:
        """Run one forward pass starting at `start_s` on the given GPUs (default: all).

        Each GPU idles up to `start_s`, then runs at its effective clock; the pass lasts as long
        as the slowest GPU. Returns the duration, the energy of the pass summed over the GPUs,
        the lowest effective clock and the mean total power over the pass.
        """
        idx = self._indices(indices)
        for i in idx:
            if start_s < self._gpus[i].now_s - 1e-6:
                raise GpuError(f"twin GPU {i} is busy until {self._gpus[i].now_s:.6f} s; an "
                               f"iteration cannot start at {start_s:.6f} s")
        self.idle_until(start_s, idx)
        for i in idx:  # a switch due by now is in effect for this whole pass
            self._commit(self._gpus[i], start_s)
        runs = []
        for i in idx:
            clock, it = self._scalar.effective(
                batch=float(batch), kv_tokens=float(kv_tokens),
                prefill_tokens=float(prefill_tokens),
                requested_clock_mhz=float(self.requested_clock_mhz(i, start_s)),
                prefill_attn_tokens2=float(prefill_attn_tokens2))
            runs.append((i, clock, it))
        duration = max(it.time_s for _, _, it in runs)
        total_mj = 0.0
        for i, clock, it in runs:
            s = self._gpus[i]
            idle_w = self._idle_w(s.lock)
            energy = (it.power_w * it.time_s + idle_w * (duration - it.time_s)) * 1e3
            s.energy_mj += energy
            s.now_s = start_s + duration
            s.power_w = energy / 1e3 / duration
            s.clock_mhz = float(clock)
            # Clamped: the slowest GPU's share is 1 up to float noise, and a reading says ≤ 100.
            s.util_pct = min(100.0, 100.0 * it.time_s / duration)
            s.mem_util_pct = min(100.0, 100.0 * it.hbm_share * it.time_s / duration)
            total_mj += energy
        return GpuIterationResult(duration_s=duration, energy_mj=total_mj,
                                  clock_mhz=float(min(c for _, c, _ in runs)),
                                  power_w=total_mj / 1e3 / duration)

    # ------------------------------------------------------------------ helpers

    def _state(self, index: int) -> _GpuState:
        if not 0 <= index < len(self._gpus):
            raise GpuNotFoundError(f"no twin GPU at index {index} (this twin has "
                                   f"{len(self._gpus)})")
        return self._gpus[index]

    def _indices(self, indices: Iterable[int] | None) -> Sequence[int]:
        if indices is None:
            return range(len(self._gpus))
        idx = tuple(indices)
        for i in idx:
            self._state(i)
        return idx

    def _set_idle_reading(self, index: int) -> None:
        s = self._gpus[index]
        lock = self._lock_at(s, s.now_s)
        s.power_w = self._idle_w(lock)
        s.clock_mhz = float(lock[0] if lock is not None else self.profile.gpu.idle_clock_mhz)
        s.util_pct = 0.0
        s.mem_util_pct = 0.0

    def _range_text(self) -> str:
        g = self.profile.gpu
        return f"{g.clock_min_mhz}–{g.clock_max_mhz} MHz in steps of {g.clock_step_mhz} MHz"

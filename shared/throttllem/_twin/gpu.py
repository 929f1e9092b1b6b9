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
- idle: draws the profile's idle power (assumption: the same whatever the lock), and reports
  the locked minimum as its SM clock, or the idle clock when unlocked;
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
from throttllem._twin.clockmodel import effective_clock_scalar
from throttllem._twin.profile import SetupProfile

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
    power_w: float = 0.0
    clock_mhz: float = 0.0
    util_pct: float = 0.0
    mem_util_pct: float = 0.0


class GpuTwin:
    """Simulated GPUs of one setup (`count` of them, default the profile's TP degree)."""

    name: str = "twin"

    def __init__(self, profile: SetupProfile, *, count: int | None = None,
                 start_s: float = 0.0, uuid_prefix: str = "GPU-twin") -> None:
        n = profile.engine.tp_degree if count is None else count
        if n < 1:
            raise ValueError("a GpuTwin needs at least one GPU")
        self.profile = profile
        self._clocks = profile.gpu.supported_clocks_mhz
        self._clock_set = frozenset(self._clocks)
        self._uuid_prefix = uuid_prefix
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

    def set_locked_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        """Lock the SM clock into [min, max]; both must be supported clocks, min ≤ max."""
        s = self._state(index)
        for value in (min_mhz, max_mhz):
            if value not in self._clock_set:
                raise ClockOutOfRangeError(
                    f"{value} MHz is not a supported SM clock of {self.profile.gpu.name} "
                    f"(twin GPU {index}); supported: {self._range_text()}")
        if min_mhz > max_mhz:
            raise ClockOutOfRangeError(
                f"locked clock range is empty: min {min_mhz} MHz > max {max_mhz} MHz "
                f"(supported: {self._range_text()})")
        s.lock = (int(min_mhz), int(max_mhz))
        if s.util_pct == 0.0:
            self._set_idle_reading(index)

    def reset_locked_clocks(self, index: int) -> None:
        s = self._state(index)
        s.lock = None
        if s.util_pct == 0.0:
            self._set_idle_reading(index)

    # ------------------------------------------------------------------ twin-only

    def locked_clocks_mhz(self, index: int) -> tuple[int, int] | None:
        return self._state(index).lock

    def requested_clock_mhz(self, index: int) -> int:
        """The clock a busy GPU asks for: the locked maximum, else the default clock."""
        lock = self._state(index).lock
        return lock[1] if lock is not None else self.profile.gpu.default_clock_mhz

    def now_s(self, index: int = 0) -> float:
        return self._state(index).now_s

    def energy_mj(self, index: int = 0) -> float:
        return self._state(index).energy_mj

    def idle_until(self, now_s: float, indices: Iterable[int] | None = None) -> None:
        """Advance idle GPUs to `now_s`, integrating idle power; earlier times are a no-op."""
        idle_w = self.profile.gpu.idle_power_w
        for i in self._indices(indices):
            s = self._gpus[i]
            if now_s > s.now_s + _TIME_EPS_S:
                s.energy_mj += idle_w * (now_s - s.now_s) * 1e3
                s.now_s = now_s
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
        runs = []
        for i in idx:
            clock, it = effective_clock_scalar(
                self.profile, batch=float(batch), kv_tokens=float(kv_tokens),
                prefill_tokens=float(prefill_tokens),
                requested_clock_mhz=float(self.requested_clock_mhz(i)),
                prefill_attn_tokens2=float(prefill_attn_tokens2))
            runs.append((i, clock, it))
        duration = max(it.time_s for _, _, it in runs)
        idle_w = self.profile.gpu.idle_power_w
        total_mj = 0.0
        for i, clock, it in runs:
            s = self._gpus[i]
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
        s.power_w = self.profile.gpu.idle_power_w
        s.clock_mhz = float(s.lock[0] if s.lock is not None else self.profile.gpu.idle_clock_mhz)
        s.util_pct = 0.0
        s.mem_util_pct = 0.0

    def _range_text(self) -> str:
        g = self.profile.gpu
        return f"{g.clock_min_mhz}–{g.clock_max_mhz} MHz in steps of {g.clock_step_mhz} MHz"

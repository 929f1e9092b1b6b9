"""NVML for the GPU lab: read-only, through the one NVML backend (`throttllem._gpu.nvml`).

A pass must never wait for NVML: two reads (SM clock, energy counter) cost about 5 ms on the
lent machine, as much as a decode pass. So `NvmlSampler` reads both in a thread every
`period_s` and a pass takes the latest clock and the last period's board power. The backend
is opened with ``dry_run=True``: the lab never calls an NVML setter.

For a serving engine, `PassEnergyMeter` charges each pass the energy counter's increase over
the pass (`CounterTimeline`: the counter read by the sampler, interpolated between reads and
extrapolated by the last period's power past the latest read), chaining back-to-back passes
so that their energies add up to the counter's increase over the busy period.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from throttllem._errors import GpuError
from throttllem._gpu.nvml import NvmlBackend, NvmlLib, probe


def open_nvml(*, lib: NvmlLib | None = None) -> NvmlBackend:
    """The lab's NVML backend: reads only (dry-run, so no setter can ever be called)."""
    return NvmlBackend(dry_run=True, lib=lib)


def nvml_index_of_cuda_device(nvml: NvmlBackend, torch: Any, device: int) -> int:
    """The NVML index of CUDA device `device`, matched by UUID (NVML counts in PCI order and
    ignores CUDA_VISIBLE_DEVICES); the CUDA index itself when the UUID is not found."""
    try:
        return nvml.index_of_uuid(str(torch.cuda.get_device_properties(device).uuid))
    except GpuError:
        return device


def describe_gpu(index: int, *, lib: NvmlLib | None = None) -> dict[str, Any]:
    """What the run's metadata records about the card (name, driver, clocks, power limit);
    an NVML failure is recorded, never raised: metadata must not fail a measurement."""
    try:
        return probe(index, lib=lib)
    except GpuError as e:
        return {"index": index, "describe_error": str(e)}


class CounterTimeline:
    """Timestamped reads of a monotonic counter (the NVML energy counter, mJ), and its value
    at any instant: linear between two reads, extrapolated at the last period's rate after
    the latest read (never below it), the first read before the first. Keeps the last
    `keep` reads (a pass asks about the recent past only)."""

    def __init__(self, keep: int = 512) -> None:
        if keep < 2:
            raise ValueError("a counter timeline keeps at least 2 reads")
        self._t: deque[float] = deque(maxlen=keep)
        self._v: deque[float] = deque(maxlen=keep)

    def __len__(self) -> int:
        return len(self._t)

    def add(self, t: float, value: float) -> None:
        """One read at wall time `t`; reads out of order or going backwards (a driver
        reload resets the counter) restart the timeline."""
        if self._t and (t <= self._t[-1] or value < self._v[-1]):
            if t <= self._t[-1] and value >= self._v[-1]:
                return  # a duplicate instant: keep the first read
            self._t.clear()
            self._v.clear()
        self._t.append(t)
        self._v.append(value)

    def at(self, t: float) -> float:
        """The counter at wall time `t` (NaN before any read)."""
        n = len(self._t)
        if n == 0:
            return math.nan
        ts, vs = self._t, self._v
        if t <= ts[0]:
            return vs[0]
        if t >= ts[-1]:
            if n == 1:
                return vs[-1]
            rate = (vs[-1] - vs[-2]) / (ts[-1] - ts[-2])
            return vs[-1] + rate * (t - ts[-1])
        k = bisect.bisect_right(ts, t)  # ts[k-1] <= t < ts[k]
        t0, t1, v0, v1 = ts[k - 1], ts[k], vs[k - 1], vs[k]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


class PassEnergyMeter:
    """Energy per pass from a counter timeline (`energy_at(t)`, mJ at wall time `t`).

    `charge(start, end)` is the counter's increase from the end of the previous charged pass
    (or `start`, after `break_chain()` or at first) to `end`: passes run back to back share
    their boundaries, so their charges add up to the counter's increase over the whole busy
    period (host time between passes included); energy drawn while the engine idles (after
    `break_chain()`) is charged to no pass. Never negative."""

    def __init__(self, energy_at: Callable[[float], float]) -> None:
        self._energy_at = energy_at
        self._chain: tuple[float, float] | None = None  # (wall t, counter value) charged up to

    def break_chain(self) -> None:
        """The engine went idle: the next pass starts a new busy period."""
        self._chain = None

    def charge(self, start: float, end: float) -> float:
        e0 = float(self._energy_at(start)) if self._chain is None else self._chain[1]
        e1 = max(float(self._energy_at(end)), e0)
        if not (math.isfinite(e0) and math.isfinite(e1)):
            raise GpuError("no energy counter reading to charge a pass with")
        self._chain = (end, e1)
        return e1 - e0


class NvmlSampler:
    """Reads the SM clock and the energy counter of one GPU every `period_s` in a thread.

    `latest()` is the last (clock MHz, board power W over the last period); `clocks_mhz`
    holds every clock read, for the median clock of a measurement window. The first reads
    happen in the constructor, so a GPU without these counters fails at once; later failed
    reads are counted (`failed_reads`) and skipped.
    """

    def __init__(self, nvml: NvmlBackend, index: int, period_s: float = 0.02, *,
                 keep_clocks: bool = True) -> None:
        """`keep_clocks=False` (a long-running engine): `clocks_mhz` keeps the first read
        only, so memory stays flat."""
        self.nvml = nvml
        self.keep_clocks = keep_clocks
        self.index = index
        self.period_s = period_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        clock, energy = nvml.sm_clock_mhz(index), nvml.energy_mj(index)
        self._last = (time.perf_counter(), clock, energy)
        self._power = math.nan
        self.timeline = CounterTimeline()
        self.timeline.add(self._last[0], energy)
        self.clocks_mhz: list[float] = [clock]
        self.reads = 1
        self.failed_reads = 0
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                clock = self.nvml.sm_clock_mhz(self.index)
                before = time.perf_counter()
                energy = self.nvml.energy_mj(self.index)
                after = time.perf_counter()
            except GpuError:
                self.failed_reads += 1
                continue
            # A read takes ~2 ms on the lent machine: stamp it mid-call.
            self.record((before + after) / 2, clock, energy)

    def record(self, now_s: float, clock_mhz: float, energy_mj: float) -> None:
        """Take one reading (the thread's; public so the arithmetic is testable alone)."""
        with self._lock:
            t0, _, e0 = self._last
            if now_s > t0 and energy_mj >= e0:
                self._power = (energy_mj - e0) / 1e3 / (now_s - t0)
            self._last = (now_s, clock_mhz, energy_mj)
            self.timeline.add(now_s, energy_mj)
            if self.keep_clocks:
                self.clocks_mhz.append(clock_mhz)
            self.reads += 1

    def latest(self) -> tuple[float, float]:
        """(SM clock MHz, board power W over the last period; NaN before a second read)."""
        with self._lock:
            return self._last[1], self._power

    def energy_mj(self) -> float:
        """The energy counter at the last read."""
        with self._lock:
            return self._last[2]

    def energy_at(self, t: float) -> float:
        """The energy counter (mJ) at `time.perf_counter()` instant `t`, from the reads
        around it (`CounterTimeline.at`)."""
        with self._lock:
            return self.timeline.at(t)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def __enter__(self) -> NvmlSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

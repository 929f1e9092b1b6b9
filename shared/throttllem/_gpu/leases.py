"""Clock locks that end on their own: the fail-safe where the lock lives, not in the actuator.

A lock taken through a `LockLeases` holds for the `hold_s` its locker passed and ends (the GPU
goes back to its default clocks) unless the locker renews it in time. So a locker that dies —
even by `kill -9`, with no chance to reset — leaves a GPU slow for at most `hold_s` plus one
enforcement period. The engine twin's GPU server enforces these holds for the twin; for a real
NVML node, where the driver keeps a lock for ever, `gpu-watchdog` (below) plays that part from
the actuator's hold file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import structlog

from throttllem._errors import ConfigError, GpuError
from throttllem._events import DEFAULT_LOCK_HOLD_S, MAX_LOCK_HOLD_S
from throttllem._gpu.backend import GpuBackend

log = structlog.get_logger("throttllem.gpu.leases")

DEFAULT_HOLD_S: Final = DEFAULT_LOCK_HOLD_S
MAX_HOLD_S: Final = MAX_LOCK_HOLD_S
# Seconds between two checks of the holds: the reset comes at most this late.
ENFORCE_PERIOD_S: Final = 0.1


def check_hold(hold_s: float) -> float:
    if not 0.0 < hold_s <= MAX_HOLD_S:
        raise ConfigError(f"a lock hold must be in (0, {MAX_HOLD_S:g}] s, not {hold_s}")
    return float(hold_s)


class LockLeases:
    """Locks on a local backend that each hold for a bounded time unless renewed.

    `now` is a monotonic clock in seconds (injected in tests); the backend's own calls are
    synchronous, like NVML.
    """

    def __init__(self, backend: GpuBackend, *, now: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self._now = now
        self._until: dict[int, float] = {}
        self.expired = 0  # locks reset because nobody renewed them

    def lock(self, index: int, min_mhz: int, max_mhz: int, hold_s: float) -> None:
        """Lock (or renew the lock of) GPU `index` until `hold_s` from now."""
        hold_s = check_hold(hold_s)
        self.backend.set_locked_clocks(index, min_mhz, max_mhz)
        self._until[index] = self._now() + hold_s

    def reset(self, index: int) -> None:
        self.backend.reset_locked_clocks(index)
        self._until.pop(index, None)

    def held_until(self, index: int) -> float | None:
        return self._until.get(index)

    def expire(self) -> list[int]:
        """Reset every lock whose hold has run out; the indices reset. A reset that fails is
        retried at the next call (the hold stays recorded as expired)."""
        now = self._now()
        done: list[int] = []
        for index, until in sorted(self._until.items()):
            if now < until:
                continue
            try:
                self.backend.reset_locked_clocks(index)
            except GpuError as e:
                log.error("gpu.hold_reset_failed", index=index, error=str(e))
                continue
            del self._until[index]
            self.expired += 1
            done.append(index)
            log.warning("gpu.hold_expired", index=index, late_s=round(now - until, 3),
                        why="the locker did not renew its lock: back to default clocks")
        return done

    async def enforce(self, period_s: float = ENFORCE_PERIOD_S) -> None:
        """Expire holds for ever (run in the task group of whoever serves the GPU)."""
        while True:
            await anyio.sleep(period_s)
            self.expire()


# --------------------------------------------------------------------------- real nodes


@dataclass(frozen=True, slots=True)
class Hold:
    """What the actuator last wrote to its hold file: its GPUs are locked until a wall
    instant (Unix s), or not locked at all."""

    gpus: tuple[int, ...]
    locked: bool
    until_unix_s: float
    pid: int = 0


def write_hold(path: Path, hold: Hold) -> None:
    """Replace the hold file atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"gpus": list(hold.gpus), "locked": hold.locked,
                               "until_unix_s": hold.until_unix_s, "pid": hold.pid}))
    os.replace(tmp, path)


def read_hold(path: Path) -> Hold | None:
    """The hold in `path`, or None when there is none; a file that is not a hold is an error
    (a watchdog must not guess)."""
    try:
        raw = json.loads(path.read_text())
        return Hold(gpus=tuple(int(i) for i in raw["gpus"]), locked=bool(raw["locked"]),
                    until_unix_s=float(raw["until_unix_s"]), pid=int(raw.get("pid", 0)))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an actuator hold file: {e}") from e


def gpus_to_reset(hold: Hold | None, now_unix_s: float, grace_s: float = 0.0) -> tuple[int, ...]:
    """The GPUs a watchdog must reset now: those of a lock whose hold ran out `grace_s` ago."""
    if hold is None or not hold.locked or now_unix_s < hold.until_unix_s + grace_s:
        return ()
    return hold.gpus


class GpuWatchdog:
    """Node-level fail-safe for NVML: resets the GPUs of a lock that the actuator stopped
    renewing (the actuator died, hung, or lost its node), then marks the hold as ended."""

    def __init__(self, backend: GpuBackend, hold_file: Path, *, grace_s: float = 1.0,
                 now: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.hold_file = hold_file
        self.grace_s = grace_s
        self._now = now
        self.resets = 0

    def check(self) -> tuple[int, ...]:
        """One pass: the GPUs reset (empty when the hold is fresh, ended or absent)."""
        hold = read_hold(self.hold_file)
        gpus = gpus_to_reset(hold, self._now(), self.grace_s)
        if not gpus or hold is None:
            return ()
        failed = _reset_all(self.backend, gpus)
        if failed:  # keep the hold: the next pass tries again
            return tuple(i for i in gpus if i not in failed)
        # Mark it ended unless the actuator renewed it meanwhile (a fresh file wins).
        if read_hold(self.hold_file) == hold:
            write_hold(self.hold_file, Hold(gpus=hold.gpus, locked=False,
                                            until_unix_s=hold.until_unix_s, pid=hold.pid))
        self.resets += 1
        log.warning("gpu.watchdog_reset", gpus=list(gpus), pid=hold.pid,
                    late_s=round(self._now() - hold.until_unix_s, 3),
                    why="the actuator stopped renewing its lock: back to default clocks")
        return gpus

    async def run(self, period_s: float = 0.5) -> None:
        log.info("gpu.watchdog_started", hold_file=str(self.hold_file), grace_s=self.grace_s)
        while True:
            self.check()
            await anyio.sleep(period_s)


def _reset_all(backend: GpuBackend, gpus: Sequence[int]) -> set[int]:
    failed: set[int] = set()
    for index in gpus:
        try:
            backend.reset_locked_clocks(index)
        except GpuError as e:
            failed.add(index)
            log.error("gpu.watchdog_reset_failed", index=index, error=str(e))
    return failed

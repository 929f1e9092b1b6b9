"""The clock fail-safe outlives the actuator: a lock ends where it lives when nobody renews
it, a (re)started actuator resets first, and an NVML node's watchdog resets the clocks of an
actuator that stopped renewing its hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pynvml
import pytest
from nats.aio.msg import Msg

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._errors import ConfigError, GpuError
from throttllem._events import FreqTarget
from throttllem._gpu.leases import (
    GpuWatchdog,
    Hold,
    LockLeases,
    gpus_to_reset,
    read_hold,
    write_hold,
)
from throttllem._gpu.nvml import NvmlBackend
from throttllem._gpu.remote import RemoteGpu, ThreadedGpu
from throttllem._runtime import Clock
from throttllem._services.actuator import ActuatorService
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import freq_target, twin_gpu
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import load_profile
from throttllem.testing import FakeNvml

PROFILE = load_profile(DEFAULT_SETUP)
SLOW_MHZ = 1005  # a supported clock that is neither the idle nor the default one


class ManualTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_lock_nobody_renews_ends_where_it_lives() -> None:
    gpu, now = GpuTwin(PROFILE, count=2), ManualTime()
    leases = LockLeases(gpu, now=now)
    leases.lock(0, SLOW_MHZ, SLOW_MHZ, hold_s=2.0)
    leases.lock(1, SLOW_MHZ, SLOW_MHZ, hold_s=2.0)
    now.t += 1.5
    leases.lock(1, SLOW_MHZ, SLOW_MHZ, hold_s=2.0)  # renewed: holds until 103.5
    assert leases.expire() == []
    now.t += 0.5
    assert leases.expire() == [0]
    assert gpu.locked_clocks_mhz(0) is None
    assert gpu.locked_clocks_mhz(1) == (SLOW_MHZ, SLOW_MHZ)
    now.t += 1.5
    assert leases.expire() == [1]
    assert gpu.locked_clocks_mhz(1) is None
    assert leases.expired == 2
    leases.lock(0, SLOW_MHZ, SLOW_MHZ, hold_s=2.0)
    leases.reset(0)  # a reset ends the hold: nothing left to expire
    now.t += 10
    assert leases.expire() == []
    for bad in (0.0, -1.0, 61.0):
        with pytest.raises(ConfigError, match="lock hold"):
            leases.lock(0, SLOW_MHZ, SLOW_MHZ, hold_s=bad)


def test_the_watchdog_resets_an_nvml_lock_whose_hold_ran_out(tmp_path: Path) -> None:
    fake = FakeNvml(count=2, allow_set=True)
    backend = NvmlBackend(lib=fake)
    hold_file = tmp_path / "hold.json"
    now = ManualTime()
    watchdog = GpuWatchdog(backend, hold_file, grace_s=1.0, now=now)
    assert watchdog.check() == ()  # no hold file: no actuator ever locked anything
    write_hold(hold_file, Hold(gpus=(0, 1), locked=True, until_unix_s=now.t + 3.0, pid=42))
    now.t += 3.5  # past the hold, within the grace
    assert watchdog.check() == ()
    assert fake.called("nvmlDeviceResetGpuLockedClocks") == []
    now.t += 1.0
    assert watchdog.check() == (0, 1)
    assert len(fake.called("nvmlDeviceResetGpuLockedClocks")) == 2
    assert read_hold(hold_file) == Hold(gpus=(0, 1), locked=False, until_unix_s=103.0, pid=42)
    assert watchdog.check() == ()  # once: the hold is marked ended
    assert watchdog.resets == 1
    hold_file.write_text("not json")
    with pytest.raises(ConfigError, match="not an actuator hold file"):
        watchdog.check()


def test_a_reset_that_fails_is_retried_by_the_watchdog(tmp_path: Path) -> None:
    fake = FakeNvml(allow_set=True, fail={"nvmlDeviceResetGpuLockedClocks":
                                          pynvml.NVML_ERROR_NO_PERMISSION})
    hold_file = tmp_path / "hold.json"
    write_hold(hold_file, Hold(gpus=(0,), locked=True, until_unix_s=0.0))
    watchdog = GpuWatchdog(NvmlBackend(lib=fake), hold_file, grace_s=0.0)
    assert watchdog.check() == ()
    assert read_hold(hold_file) == Hold(gpus=(0,), locked=True, until_unix_s=0.0)
    fake.fail.clear()
    assert watchdog.check() == (0,)
    assert gpus_to_reset(read_hold(hold_file), time.time()) == ()


# --------------------------------------------------------------------------- processes


def spawn(args: list[str], url: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "throttllem", "run", *args, "--nats", url],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def sm_clock(gpu: RemoteGpu) -> float | None:
    """The idle twin GPU's SM clock: the locked minimum, or the idle clock when unlocked."""
    try:
        return (await gpu.read(0)).sm_clock_mhz
    except GpuError:
        return None  # the engine (where the GPU lives) is not answering yet


async def wait_clock(gpu: RemoteGpu, mhz: float, within_s: float) -> float:
    """Seconds until the GPU reads `mhz` (fails past `within_s`: the bound is the feature)."""
    start = time.monotonic()
    with anyio.fail_after(within_s):
        while await sm_clock(gpu) != mhz:
            await anyio.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.anyio
@pytest.mark.slow
async def test_no_lock_outlives_a_dead_controller_or_a_dead_actuator(
        nats: EmbeddedNatsServer, tmp_path: Path,
        processes: list[subprocess.Popen[bytes]]) -> None:
    hold_s, lease_s = 2.0, 2.0
    idle = float(PROFILE.gpu.idle_clock_mhz)
    actuator_args = ["actuator", "--gpu", "twin", "--instance", "i0", "--lock-hold-s", str(hold_s)]
    processes.append(spawn(["engine", "--instance", "i0"], nats.url, tmp_path / "engine.log"))
    bus = await Bus.connect(nats.url, name="test")
    try:
        gpu = RemoteGpu(bus, twin_gpu("i0"), lock_hold_s=60.0)
        await wait_clock(gpu, idle, 60.0)

        # A lock left behind by an actuator that died: the next one resets it before anything.
        await gpu.set_locked_clocks(0, SLOW_MHZ, SLOW_MHZ)
        await wait_clock(gpu, SLOW_MHZ, 5.0)  # a clock switch takes the twin's switch latency
        actuator_log = tmp_path / "actuator.log"
        processes.append(spawn(actuator_args, nats.url, actuator_log))
        start_reset_s = await wait_clock(gpu, idle, 60.0)
        assert "actuator.startup_reset" in actuator_log.read_text()

        async def target() -> None:
            await bus.publish(freq_target("i0"), FreqTarget(
                instance="i0", clock_mhz=SLOW_MHZ, lease_s=lease_s, decided_s=time.time()))

        # The controller dies: its last lease runs out, the actuator resets.
        last_target = time.monotonic()
        await target()
        await wait_clock(gpu, SLOW_MHZ, 10.0)
        await wait_clock(gpu, idle, lease_s + 5.0)
        controller_dead_s = time.monotonic() - last_target

        # The actuator dies (kill -9, no reset) under a live controller: the lock ends where
        # it lives once the actuator stops renewing it.
        async with anyio.create_task_group() as tg:
            async def live_controller() -> None:
                while True:
                    await target()
                    await anyio.sleep(lease_s / 3)

            tg.start_soon(live_controller)
            await wait_clock(gpu, SLOW_MHZ, 10.0)
            await anyio.sleep(hold_s)  # past a hold: the lock is alive only by renewals
            assert await sm_clock(gpu) == SLOW_MHZ
            processes[1].send_signal(signal.SIGKILL)
            actuator_dead_s = await wait_clock(gpu, idle, hold_s + 5.0)
            # Restarted under the live controller, an actuator resets and locks again.
            processes.append(spawn(actuator_args, nats.url, tmp_path / "actuator2.log"))
            await wait_clock(gpu, SLOW_MHZ, 60.0)
            tg.cancel_scope.cancel()
        print(f"\nclock reset delay: controller dead {controller_dead_s:.2f} s after its last "
              f"target (lease {lease_s} s); actuator killed -9 {actuator_dead_s:.2f} s (hold "
              f"{hold_s} s); leftover lock reset {start_reset_s:.2f} s after an actuator "
              f"process was spawned")
    finally:
        await bus.close()



@pytest.mark.anyio
@pytest.mark.slow
async def test_an_nvml_actuator_resets_on_start_and_keeps_its_hold_for_the_watchdog(
        nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    fake = FakeNvml(count=2, allow_set=True)
    hold_file = tmp_path / "hold.json"
    actuator = ActuatorService(instance="i0", gpus=[0, 1], gpu=ThreadedGpu(NvmlBackend(lib=fake)),
                               tick_s=0.05, lock_hold_s=1.0, hold_file=hold_file)
    bus = await Bus.connect(nats.url, name="actuator")
    controller = await Bus.connect(nats.url, name="controller")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(actuator.run, bus, Clock(epoch_wall_s=time.time()))
            assert len(fake.called("nvmlDeviceResetGpuLockedClocks")) == 2  # before any target
            assert fake.called("nvmlDeviceSetGpuLockedClocks") == []
            await controller.publish(freq_target("i0"), FreqTarget(
                instance="i0", clock_mhz=1200, lease_s=30.0, decided_s=0.0))
            with anyio.fail_after(5):
                while (hold := read_hold(hold_file)) is None or not hold.locked:
                    await anyio.sleep(0.02)
            assert hold.gpus == (0, 1)
            assert gpus_to_reset(hold, time.time()) == ()  # fresh: the watchdog keeps off
            first_until = hold.until_unix_s
            with anyio.fail_after(5):  # renewed while held
                while (hold := read_hold(hold_file)) is None or hold.until_unix_s <= first_until:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    finally:
        await bus.close()
        await controller.close()
    hold = read_hold(hold_file)
    assert hold is not None
    assert not hold.locked  # a clean shutdown reset: nothing for the watchdog to do
    assert len(fake.called("nvmlDeviceResetGpuLockedClocks")) == 4


@pytest.mark.anyio
async def test_a_twin_gpu_answer_that_does_not_decode_is_a_failed_read(
        nats: EmbeddedNatsServer) -> None:
    """A collector or actuator sees a bad answer as a GpuError it already handles (counted,
    retried), never as a crash of its service."""
    bus = await Bus.connect(nats.url, name="gpu-client")

    async def bad_answer(msg: Msg) -> None:
        await msg.respond(b'{"type": "twin.gpu.answer", "reading": {"gpu_util_pct": 101}}')

    try:
        await bus.nc.subscribe(f"{twin_gpu('i0')}.read", cb=bad_answer)
        with pytest.raises(GpuError, match="answered badly"):
            await RemoteGpu(bus, twin_gpu("i0")).read(0)
    finally:
        await bus.close()

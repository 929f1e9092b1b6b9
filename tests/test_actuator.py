"""The frequency actuator: pure lease logic, and the service over a real nats-server against
a twin GPU (and NVML in dry-run through the narrow seam)."""

from __future__ import annotations

import time

import anyio
import pytest

from throttllem import ClockOutOfRangeError
from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.actuation import (
    Action,
    LeaseState,
    after_failure,
    on_target,
    on_tick,
    validate_clock,
)
from throttllem._events import FREQ_CODEC, FreqApplied, FreqEvent, FreqTarget
from throttllem._gpu.nvml import NvmlBackend
from throttllem._gpu.remote import ThreadedGpu, serve_gpu
from throttllem._runtime import Clock
from throttllem._services.actuator import ActuatorService
from throttllem._subjects import freq_applied, freq_target, twin_gpu
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import load_profile
from throttllem.testing import FakeNvml

SUPPORTED = tuple(range(345, 1981, 15))


def target(clock_mhz: float | None, *, lease_s: float = 2.0) -> FreqTarget:
    return FreqTarget(instance="i0", clock_mhz=clock_mhz, lease_s=lease_s, decided_s=0.0)


def test_lease_locks_then_expires_to_default() -> None:
    state, decision = on_target(LeaseState(), target(1200), 10.0, SUPPORTED)
    assert (decision.action, decision.clock_mhz, state.expires_s) == (Action.LOCK, 1200, 12.0)
    state, decision = on_target(state, target(1200), 11.0, SUPPORTED)
    assert decision.action is Action.NONE  # same clock: renew the lease, touch nothing
    assert state.expires_s == 13.0
    state, decision = on_tick(state, 12.9)
    assert decision.action is Action.NONE
    state, decision = on_tick(state, 13.0)
    assert decision.action is Action.RESET
    assert state == LeaseState()
    assert "lease expired" in decision.reason


def test_unsupported_clocks_are_refused_not_rounded() -> None:
    assert validate_clock(1200.0, SUPPORTED) == 1200
    for bad in (1201.0, 1200.5, 100.0, 2100.0):
        with pytest.raises(ClockOutOfRangeError, match="not a supported SM clock"):
            validate_clock(bad, SUPPORTED)
    with pytest.raises(ClockOutOfRangeError, match="lease must be positive"):
        on_target(LeaseState(), target(1200, lease_s=0), 0.0, SUPPORTED)


async def run_actuator(nats_url: str, body: object, **kwargs: object) -> tuple[
        GpuTwin, ActuatorService, list[FreqApplied]]:
    """An actuator for instance i0 against a twin GPU served over NATS; `body(bus)` drives it."""
    gpu = GpuTwin(load_profile("h100-llama3-8b-tp1"))
    clock = Clock(epoch_wall_s=time.time())
    engine_bus = await Bus.connect(nats_url, name="engine")
    await serve_gpu(engine_bus, twin_gpu("i0"), gpu)
    actuator = ActuatorService(instance="i0", backend="twin", tick_s=0.05, **kwargs)  # type: ignore[arg-type]
    bus = await Bus.connect(nats_url, name="actuator")
    controller = await Bus.connect(nats_url, name="controller")
    applied: list[FreqApplied] = []

    async def on_applied(event: FreqEvent) -> None:
        assert isinstance(event, FreqApplied)
        applied.append(event)

    try:
        await controller.subscribe(freq_applied("i0"), FREQ_CODEC, on_applied)
        async with anyio.create_task_group() as tg:
            await tg.start(actuator.run, bus, clock)
            await body(controller, applied, gpu)  # type: ignore[operator]
            tg.cancel_scope.cancel()
        await anyio.sleep(0.2)
    finally:  # a failing body must not leak its sockets into the next test's warnings
        for b in (bus, controller, engine_bus):
            await b.close()
    return gpu, actuator, applied


async def wait_for(applied: list[FreqApplied], n: int) -> None:
    with anyio.fail_after(5):
        while len(applied) < n:
            await anyio.sleep(0.01)


@pytest.mark.anyio
@pytest.mark.slow
async def test_actuator_applies_targets_and_fails_safe_when_the_controller_dies(
        nats: EmbeddedNatsServer) -> None:
    async def body(controller: Bus, applied: list[FreqApplied], gpu: GpuTwin) -> None:
        await controller.publish(freq_target("i0"), target(1200, lease_s=0.5))
        await wait_for(applied, 1)
        assert gpu.locked_clocks_mhz(0) == (1200, 1200)
        await controller.publish(freq_target("i0"), target(1234))  # not a supported clock
        await wait_for(applied, 2)
        assert gpu.locked_clocks_mhz(0) == (1200, 1200), "a refused target changes nothing"
        # The controller goes silent: the lease (0.5 s) runs out and clocks go back to default.
        await wait_for(applied, 3)
        assert gpu.locked_clocks_mhz(0) is None

    _, actuator, applied = await run_actuator(nats.url, body)
    assert [a.clock_mhz for a in applied[:3]] == [1200, 1234, None]
    assert applied[0].error is None
    assert applied[1].error is not None
    assert applied[1].error.startswith("refused")
    assert actuator.state == LeaseState()


@pytest.mark.anyio
@pytest.mark.slow
async def test_actuator_resets_clocks_on_shutdown(nats: EmbeddedNatsServer) -> None:
    async def body(controller: Bus, applied: list[FreqApplied], gpu: GpuTwin) -> None:
        await controller.publish(freq_target("i0"), target(900, lease_s=60))
        await wait_for(applied, 1)
        assert gpu.locked_clocks_mhz(0) == (900, 900)

    gpu, _, applied = await run_actuator(nats.url, body)
    assert gpu.locked_clocks_mhz(0) is None, "stopping left the GPU slow"
    assert applied[-1].clock_mhz is None


@pytest.mark.anyio
@pytest.mark.slow
async def test_nvml_dry_run_logs_the_exact_calls_for_every_gpu_of_the_instance(
        nats: EmbeddedNatsServer) -> None:
    fake = FakeNvml(count=2)  # setters raise if called: dry-run must never call them
    nvml = ThreadedGpu(NvmlBackend(dry_run=True, lib=fake))
    actuator = ActuatorService(instance="i0", gpus=[0, 1], dry_run=True, gpu=nvml, tick_s=0.05)
    bus = await Bus.connect(nats.url, name="actuator")
    controller = await Bus.connect(nats.url, name="controller")
    async with anyio.create_task_group() as tg:
        await tg.start(actuator.run, bus, Clock(epoch_wall_s=time.time()))
        await controller.publish(freq_target("i0"), target(1410, lease_s=60))
        with anyio.fail_after(5):
            while not actuator.applied:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    await bus.close()
    await controller.close()
    calls = nvml.backend.dry_run_calls  # type: ignore[attr-defined]
    assert calls[:2] == [
        "nvmlDeviceSetGpuLockedClocks(handle=<index 0>, minGpuClockMHz=1410, maxGpuClockMHz=1410)",
        "nvmlDeviceSetGpuLockedClocks(handle=<index 1>, minGpuClockMHz=1410, maxGpuClockMHz=1410)",
    ]
    assert calls[2:] == ["nvmlDeviceResetGpuLockedClocks(handle=<index 0>)",
                         "nvmlDeviceResetGpuLockedClocks(handle=<index 1>)"]  # on shutdown
    assert not fake.called("nvmlDeviceSetGpuLockedClocks")
    assert all(a.dry_run for a in actuator.applied)


def test_a_failed_change_is_followed_by_reset_retries() -> None:
    state = after_failure(10.0, retry_s=5.0)
    assert state.reset_pending
    same, decision = on_tick(state, 12.0)
    assert decision.action is Action.NONE  # not before the retry time
    assert same == state
    cleared, decision = on_tick(state, 15.0)
    assert decision.action is Action.RESET
    assert cleared == LeaseState()
    # A default target while clocks are unknown resets too, rather than doing nothing.
    _, decision = on_target(state, target(None), 11.0, SUPPORTED)
    assert decision.action is Action.RESET
    # A fresh lock that succeeds replaces the pending reset.
    locked, decision = on_target(state, target(1200), 11.0, SUPPORTED)
    assert decision.action is Action.LOCK
    assert not locked.reset_pending


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_reset_that_fails_is_retried_until_the_gpu_is_fast_again(
        nats: EmbeddedNatsServer) -> None:
    import pynvml  # noqa: PLC0415

    fake = FakeNvml(allow_set=True)
    nvml = ThreadedGpu(NvmlBackend(lib=fake))
    actuator = ActuatorService(instance="i0", gpu=nvml, tick_s=0.05, reset_retry_s=0.2)
    bus = await Bus.connect(nats.url, name="actuator")
    controller = await Bus.connect(nats.url, name="controller")
    async with anyio.create_task_group() as tg:
        await tg.start(actuator.run, bus, Clock(epoch_wall_s=time.time()))
        await controller.publish(freq_target("i0"), target(1410, lease_s=0.3))
        with anyio.fail_after(5):
            while not actuator.applied:
                await anyio.sleep(0.01)
        # The lease runs out, but the reset fails (a driver hiccup, say): clocks stay locked.
        fake.fail["nvmlDeviceResetGpuLockedClocks"] = pynvml.NVML_ERROR_UNKNOWN
        with anyio.fail_after(5):
            while not any(a.error for a in actuator.applied):
                await anyio.sleep(0.01)
        assert actuator.state.reset_pending
        del fake.fail["nvmlDeviceResetGpuLockedClocks"]
        with anyio.fail_after(5):  # retried after reset_retry_s, and now it holds
            while actuator.state.reset_pending or actuator.applied[-1].error:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    await bus.close()
    await controller.close()
    resets = fake.called("nvmlDeviceResetGpuLockedClocks")
    assert len(resets) >= 2  # the failed one and the retry that held
    assert actuator.applied[-1].clock_mhz is None
    assert actuator.applied[-1].error is None

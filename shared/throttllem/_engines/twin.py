"""The twin engine adapter: one simulated engine instance (and its GPUs) on the bus.

The engine shell (`throttllem._engines.shell`) keeps the engine contract
(`throttllem._engines.contract`) around an `EngineTwin` whose passes run on a `GpuTwin` in
event time, paced to the shared clock. The adapter also answers NVML-shaped calls for its
twin GPU on `twin.gpu.<instance>.read` (the collector) and `.control` (the actuator) (twin
only, not part of the contract).
"""

from __future__ import annotations

import anyio
import anyio.abc

from throttllem._bus import Bus
from throttllem._engines.contract import ENGINE_SERVICE, EngineAdapter
from throttllem._engines.shell import EngineShell, PassDriver
from throttllem._errors import ConfigError
from throttllem._events import EngineIteration, RequestCompleted
from throttllem._gpu.leases import LockLeases
from throttllem._gpu.remote import serve_gpu
from throttllem._runtime import Clock
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import token, twin_gpu
from throttllem._twin.engine import EngineTwin, IterationOutcome
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import load_profile


class _SimulatedPasses:
    """The twin's `PassDriver`: passes computed at once on the simulated GPU, in the
    engine's own time, which trails the clock by the slack."""

    simulated_time = True

    def __init__(self, engine: EngineTwin, gpu: GpuTwin, slack_wall_s: float) -> None:
        self.engine = engine
        self.gpu = gpu
        self.lag_wall_s = slack_wall_s

    async def run_pass(self, now_s: float) -> IterationOutcome | None:
        return self.engine.step(now_s)

    def idle(self, now_s: float) -> None:
        self.gpu.idle_until(now_s)

    def passed(self, iteration: EngineIteration) -> None:
        pass

    def completed(self, done: RequestCompleted) -> RequestCompleted:
        return done  # the engine freed its KV; its energy is the twin's attribution

    def aborted(self, request_id: str) -> None:
        pass  # the engine freed its KV


class EngineTwinService:
    name = ENGINE_SERVICE

    def __init__(self, *, instance: str, setup: str = DEFAULT_SETUP,
                 slack_wall_s: float = 0.05) -> None:
        """`slack_wall_s`: how far (wall seconds) the engine's time trails the shared clock, so
        that an admission delayed on the bus by less than that still starts at its own decision
        time; without it, bus latency would be magnified by --speed. Keep it near the bus
        latency: the controller sees the engine's state this much late, and a larger slack
        makes it plan for a busier engine than there is (it raises clocks for nothing)."""
        if slack_wall_s < 0:
            raise ConfigError("--slack must be non-negative")
        self.slack_wall_s = slack_wall_s
        self.instance = token(instance)
        self.profile = load_profile(setup)
        self.gpu = GpuTwin(self.profile)
        # Locks taken over the bus hold only while their actuator renews them (wall seconds).
        self.gpu_leases = LockLeases(self.gpu)
        self.engine = EngineTwin(self.profile, self.instance, self.gpu)
        driver: PassDriver = _SimulatedPasses(self.engine, self.gpu, slack_wall_s)
        self.shell = EngineShell(self.instance, driver)

    def health_metrics(self) -> dict[str, float]:
        """Heartbeat metrics: requests in the batch, accepted ones not in it yet, passes."""
        return self.shell.health_metrics()

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await serve_gpu(bus, twin_gpu(self.instance), self.gpu, self.gpu_leases)
        await self.shell.run(bus, clock, task_status=task_status,
                             also=[self.gpu_leases.enforce],  # a lock dies with its actuator
                             log_fields={"setup": self.profile.name})


_KEEPS_THE_CONTRACT: type[EngineAdapter] = EngineTwinService  # checked by mypy

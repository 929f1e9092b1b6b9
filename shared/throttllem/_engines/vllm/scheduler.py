"""vLLM schedulers that publish every engine step as `engine.iteration.<instance>`.

Start vLLM with ``--scheduler-cls throttllem._engines.vllm.scheduler.iteration_scheduler``
and the environment ``THROTTLLEM_INSTANCE=<name>`` (and ``THROTTLLEM_NATS_URL``). vLLM only
calls what it is given, so the factory picks ``AsyncIterationScheduler`` where async
scheduling is on (vLLM's GPU default) and ``IterationScheduler`` where it is off (CPU).

Why a scheduler and not a stat-logger plugin: a stat logger runs in the API server and sees
only aggregates per step (`SchedulerStats.iteration_details`: request and token counts), never
which requests took part, and the controller counts every running request's tokens by id.
The scheduler sees exactly that: `SchedulerOutput.num_scheduled_tokens` maps each engine
request id to the tokens it processes in the step, and the KV block pool is at hand. The cost
is that vLLM does not freeze this interface, so the adapter is pinned to one vLLM release.

The step is timed from the end of `schedule()` to `update_from_output()` (the model pass and
sampling); with async scheduling, overlapping steps are serialized so that durations add up
to wall time. Publishing is handed to a background thread (`EventPublisher`): the engine
loop never waits on NATS, and survives it being down.
"""

from __future__ import annotations

import os
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from throttllem._engines.vllm.iteration import iteration_event
from throttllem._engines.vllm.publisher import EventPublisher, log, settings_from_env
from throttllem._subjects import engine_iteration


class _IterationPublishing:
    """Mixin over vLLM's Scheduler: record each step's shape at `schedule()`, publish it at
    `update_from_output()`."""

    # Provided by vLLM's Scheduler (annotations only: the MRO finds vLLM's).
    kv_cache_manager: Any
    scheduler_config: Any
    get_request_counts: Any

    # Cooperative overrides: the mixin comes first in the MRO, so `super()` is vLLM's
    # Scheduler or AsyncScheduler, whichever the concrete class below names.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_publishing()

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        self._record_schedule(output)
        return output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(  # type: ignore[misc]
            scheduler_output, model_runner_output)
        self._publish_step(scheduler_output)
        return outputs

    def shutdown(self) -> None:
        self._tllm_publisher.close()
        super().shutdown()  # type: ignore[misc]

    def _init_publishing(self) -> None:
        url, instance = settings_from_env()
        self._tllm_instance = instance
        self._tllm_subject = engine_iteration(instance)
        self._tllm_publisher = EventPublisher(url, name=f"vllm-{instance}")
        self._tllm_seq = 0
        self._tllm_busy_until = 0.0  # monotonic end of the last published step
        self._tllm_randomized = not os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION")
        # id(scheduler_output) -> (monotonic end of schedule(), KV blocks used, queue length)
        self._tllm_pending: dict[int, tuple[float, int, int]] = {}
        if self.scheduler_config.enable_chunked_prefill:
            log.warning("vllm.chunked_prefill_on", instance=instance,
                        consequence="a step that prefills only part of a prompt lists that "
                        "request although it generates no token in it; start vLLM with "
                        "--no-enable-chunked-prefill and --max-num-batched-tokens >= the "
                        "context length for exact per-request token counts")
        log.info("vllm.publishing", instance=instance, subject=self._tllm_subject, nats=url)

    def _record_schedule(self, output: Any) -> None:
        if output.total_num_scheduled_tokens <= 0:
            return
        pool = self.kv_cache_manager.block_pool
        total = max(pool.num_gpu_blocks - 1, 0)  # one null block is never usable
        used = total - pool.get_num_free_blocks()
        _running, waiting = self.get_request_counts()
        if len(self._tllm_pending) > 64:  # steps that never came back (a failed pass)
            self._tllm_pending.clear()
        self._tllm_pending[id(output)] = (time.monotonic(), used, waiting)

    def _publish_step(self, output: Any) -> None:
        pending = self._tllm_pending.pop(id(output), None)
        if pending is None:
            return
        scheduled_at, kv_used, queue_len = pending
        end = time.monotonic()
        start = max(scheduled_at, self._tllm_busy_until)
        self._tllm_busy_until = end
        new_ids = {r.req_id for r in output.scheduled_new_reqs}
        cached = output.scheduled_cached_reqs
        prefill_ids = {r for r in output.num_scheduled_tokens
                       if r in new_ids or cached.is_context_phase(r)}
        event = iteration_event(
            instance=self._tllm_instance, seq=self._tllm_seq,
            start_s=time.time() - (end - start), duration_ms=(end - start) * 1e3,
            scheduled_tokens=output.num_scheduled_tokens, prefill_ids=prefill_ids,
            kv_blocks_used=kv_used,
            kv_blocks_total=max(self.kv_cache_manager.block_pool.num_gpu_blocks - 1, 0),
            queue_len=queue_len, randomized_ids=self._tllm_randomized)
        self._tllm_seq += 1
        self._tllm_publisher.submit(self._tllm_subject, event)


class IterationScheduler(_IterationPublishing, Scheduler):  # type: ignore[misc]
    """vLLM's scheduler, publishing each step (synchronous scheduling)."""


class AsyncIterationScheduler(_IterationPublishing, AsyncScheduler):  # type: ignore[misc]
    """vLLM's async scheduler (the GPU default), publishing each step."""


def iteration_scheduler(**kwargs: Any) -> IterationScheduler | AsyncIterationScheduler:
    """What ``--scheduler-cls`` names: vLLM's scheduler of the configured kind, publishing."""
    if kwargs["vllm_config"].scheduler_config.async_scheduling:
        return AsyncIterationScheduler(**kwargs)
    return IterationScheduler(**kwargs)

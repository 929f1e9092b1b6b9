"""Micro-batching for model inference inside a service.

Two ways in, one worker:

- ``await batcher.submit(item)`` returns the item's result (or raises the item's error);
- ``batcher.submit_nowait(item, on_done)`` queues the item and returns at once; after the
  batch the worker awaits ``on_done(result_or_error)``. No task and no event per item: the
  request/reply hot path (a NATS callback answering from ``on_done``) costs no extra hop.

The worker takes whatever has queued up *without waiting for more* (so an idle service adds
no latency, and a busy one batches naturally: everything that arrived while the previous batch
ran forms the next one), runs the batch function once (inline or in a worker thread), hands
each item its result, and yields once so that the replies go out before the next batch runs.

Errors are per item, never per batch:

- the batch function returns, for each item, its result *or an Exception instance* (an item
  it rejects, e.g. a request it cannot serve); only that item gets the error;
- if the batch function raises instead, the batch is run again one item at a time, so that
  only the items that also fail alone get an error and their neighbours still succeed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import structlog

log = structlog.get_logger("throttllem.batching")

In = TypeVar("In")
Out = TypeVar("Out")


class BatcherStoppedError(RuntimeError):
    """The batcher's worker is not running (stopped, or never started)."""


class _Slot(Generic[In, Out]):
    __slots__ = ("done", "error", "item", "on_done", "result")

    def __init__(self, item: In,
                 on_done: Callable[[Out | Exception], Awaitable[None]] | None) -> None:
        self.item = item
        self.on_done = on_done
        self.done: anyio.Event | None = None if on_done is not None else anyio.Event()
        self.result: Out | None = None
        self.error: Exception | None = None


class MicroBatcher(Generic[In, Out]):
    """``fn(items) -> [result or Exception per item]``; see the module docstring."""

    def __init__(self, fn: Callable[[list[In]], Sequence[Out | Exception]], *,
                 max_size: int = 256, in_thread: bool = True) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self._fn = fn
        self.max_size = max_size
        self._in_thread = in_thread
        self._queue: deque[_Slot[In, Out]] = deque()
        self._wakeup = anyio.Event()
        self._running = False
        self.batches = 0
        self.items = 0
        self.max_batch = 0
        self.item_errors = 0
        self.isolated_batches = 0  # batches whose function raised and were re-run item by item

    # ---- submitting

    def _put(self, slot: _Slot[In, Out]) -> None:
        if not self._running:
            raise BatcherStoppedError("the micro-batcher is not running")
        self._queue.append(slot)
        self._wakeup.set()

    async def submit(self, item: In) -> Out:
        """The item's result; raises the item's error."""
        slot: _Slot[In, Out] = _Slot(item, None)
        self._put(slot)
        assert slot.done is not None
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def submit_nowait(self, item: In,
                      on_done: Callable[[Out | Exception], Awaitable[None]]) -> None:
        """Queue the item; the worker awaits ``on_done(result or error)`` after its batch.

        ``on_done`` runs in the worker, one after the other: keep it short (publish a reply).
        An exception it raises is logged and otherwise ignored.
        """
        self._put(_Slot(item, on_done))

    # ---- the worker

    async def _call(self, items: list[In]) -> list[Out | Exception]:
        if self._in_thread:
            results = await anyio.to_thread.run_sync(self._fn, items)
        else:
            results = self._fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for "
                               f"{len(items)} items")
        return list(results)

    async def _results(self, items: list[In]) -> list[Out | Exception]:
        try:
            return await self._call(items)
        except Exception as e:
            if len(items) == 1:
                return [e]
        # One item (or more) made the whole call fail: find out which, one at a time.
        self.isolated_batches += 1
        out: list[Out | Exception] = []
        for item in items:
            try:
                out.extend(await self._call([item]))
            except Exception as e:
                out.append(e)
        return out

    async def _deliver(self, slot: _Slot[In, Out], result: Out | Exception) -> None:
        if isinstance(result, Exception):
            self.item_errors += 1
        if slot.on_done is not None:
            try:
                await slot.on_done(result)
            except Exception:
                log.exception("batcher.on_done_failed")
            return
        if isinstance(result, Exception):
            slot.error = result
        else:
            slot.result = result
        assert slot.done is not None
        slot.done.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        self._wakeup = anyio.Event()
        self._running = True
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                batch = [self._queue.popleft()
                         for _ in range(min(self.max_size, len(self._queue)))]
                results = await self._results([s.item for s in batch])
                for slot, result in zip(batch, results, strict=True):
                    await self._deliver(slot, result)
                self.batches += 1
                self.items += len(batch)
                self.max_batch = max(self.max_batch, len(batch))
                # Let the replies go out (and new requests come in) before the next batch.
                await anyio.lowlevel.checkpoint()
        finally:
            # Whatever is still queued gets an answer (e.g. an rpc.error reply at once rather
            # than a caller's timeout).
            self._running = False
            stopped = BatcherStoppedError("the micro-batcher stopped")
            with anyio.CancelScope(shield=True):
                while self._queue:
                    await self._deliver(self._queue.popleft(), stopped)

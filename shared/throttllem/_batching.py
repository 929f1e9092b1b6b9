"""Micro-batching for model inference inside a service.

Callers `await batcher.submit(item)`; one worker takes whatever has queued up *without
waiting for more* (so an idle service adds no latency, and a busy one batches naturally),
runs the batch function once in a worker thread, and hands each caller its result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import anyio
import anyio.abc
import anyio.to_thread

In = TypeVar("In")
Out = TypeVar("Out")


class _Slot(Generic[In, Out]):
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: In) -> None:
        self.item = item
        self.done = anyio.Event()
        self.result: Out | None = None
        self.error: BaseException | None = None


class MicroBatcher(Generic[In, Out]):
    def __init__(self, fn: Callable[[list[In]], Sequence[Out]], *, max_size: int = 256,
                 in_thread: bool = True) -> None:
        self._fn = fn
        self.max_size = max_size
        self._in_thread = in_thread
        self._send, self._recv = anyio.create_memory_object_stream[_Slot[In, Out]](math.inf)
        self.batches = 0
        self.items = 0

    async def submit(self, item: In) -> Out:
        slot: _Slot[In, Out] = _Slot(item)
        await self._send.send(slot)
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        with self._send, self._recv:
            task_status.started()
            async for first in self._recv:
                batch = [first]
                while len(batch) < self.max_size:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except anyio.WouldBlock:
                        break
                items = [s.item for s in batch]
                try:
                    if self._in_thread:
                        results = await anyio.to_thread.run_sync(self._fn, items)
                    else:
                        results = self._fn(items)
                    if len(results) != len(batch):
                        raise RuntimeError(
                            f"batch function returned {len(results)} results for {len(batch)}")
                    for slot, result in zip(batch, results, strict=True):
                        slot.result = result
                except Exception as e:  # every caller of this batch gets the error
                    for slot in batch:
                        slot.error = e
                for slot in batch:
                    slot.done.set()
                self.batches += 1
                self.items += len(batch)

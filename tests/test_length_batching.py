"""The micro-batcher behind the length predictor: batches form under load, and a bad item
fails alone (never its whole batch)."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest

from throttllem._batching import BatcherStoppedError, MicroBatcher
from throttllem.testing import capture_logs

pytestmark = pytest.mark.anyio


class Doubler:
    """Doubles ints; rejects negative ones per item; raises for the whole batch on 13."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, items: list[int]) -> Sequence[int | Exception]:
        self.calls.append(list(items))
        if 13 in items:
            raise RuntimeError("unlucky batch")
        return [ValueError(f"negative: {i}") if i < 0 else 2 * i for i in items]


async def submit_all(batcher: MicroBatcher[int, int], items: list[int]
                     ) -> dict[int, int | BaseException]:
    """Submit every item at once (each from its own task), collect results or errors."""
    out: dict[int, int | BaseException] = {}

    async def one(item: int) -> None:
        try:
            out[item] = await batcher.submit(item)
        except Exception as e:
            out[item] = e

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)
    return out


@pytest.mark.parametrize("in_thread", [False, True])
async def test_items_submitted_together_form_one_batch(in_thread: bool) -> None:
    fn = Doubler()
    batcher = MicroBatcher(fn, max_size=4, in_thread=in_thread)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        got = await submit_all(batcher, list(range(10)))
        tg.cancel_scope.cancel()
    assert got == {i: 2 * i for i in range(10)}
    assert [len(c) for c in fn.calls] == [4, 4, 2]  # bounded by max_size, nothing waits alone
    assert (batcher.batches, batcher.items, batcher.max_batch) == (3, 10, 4)


async def test_an_item_the_function_rejects_fails_alone() -> None:
    fn = Doubler()
    batcher = MicroBatcher(fn, in_thread=False)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        got = await submit_all(batcher, [1, -5, 2, 3])
        tg.cancel_scope.cancel()
    assert fn.calls == [[1, -5, 2, 3]], "one batch, with the bad item in it"
    assert isinstance(got[-5], ValueError)
    assert str(got[-5]) == "negative: -5"
    assert {k: v for k, v in got.items() if k != -5} == {1: 2, 2: 4, 3: 6}
    assert batcher.item_errors == 1


async def test_a_batch_that_raises_is_rerun_item_by_item() -> None:
    fn = Doubler()
    batcher = MicroBatcher(fn, in_thread=False)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        got = await submit_all(batcher, [1, 13, 2])
        tg.cancel_scope.cancel()
    assert fn.calls == [[1, 13, 2], [1], [13], [2]]
    assert isinstance(got[13], RuntimeError)
    assert got[1] == 2
    assert got[2] == 4
    assert batcher.isolated_batches == 1
    assert batcher.item_errors == 1


async def test_a_wrong_number_of_results_is_an_error_not_a_mixup() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [0] * (len(items) + 1),
                                                   in_thread=False)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        got = await submit_all(batcher, [1, 2])
        tg.cancel_scope.cancel()
    assert all(isinstance(v, RuntimeError) and "2 results for 1" in str(v)
               for v in got.values())


async def test_submit_nowait_calls_back_with_result_or_error() -> None:
    fn = Doubler()
    batcher = MicroBatcher(fn, in_thread=False)
    done: dict[int, int | Exception] = {}
    finished = anyio.Event()

    def on_done_for(item: int):  # type: ignore[no-untyped-def]
        async def on_done(result: int | Exception) -> None:
            done[item] = result
            if item == 99:
                raise RuntimeError("a failing callback")
            if len(done) == 4:
                finished.set()
        return on_done

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            for item in (99, 1, -1, 2):  # queued without suspending: one batch
                batcher.submit_nowait(item, on_done_for(item))
            with anyio.fail_after(5):
                await finished.wait()
            # The worker survived the failing callback and still serves.
            assert await batcher.submit(5) == 10
            tg.cancel_scope.cancel()
    assert fn.calls[0] == [99, 1, -1, 2]
    assert done[1] == 2
    assert done[2] == 4
    assert done[99] == 198
    assert isinstance(done[-1], ValueError)
    assert [e["event"] for e in logs] == ["batcher.on_done_failed"]


async def test_submitting_to_a_batcher_that_is_not_running_fails_at_once() -> None:
    batcher = MicroBatcher(Doubler(), in_thread=False)
    with pytest.raises(BatcherStoppedError):
        await batcher.submit(1)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        tg.cancel_scope.cancel()
    with pytest.raises(BatcherStoppedError):
        batcher.submit_nowait(1, lambda result: anyio.lowlevel.checkpoint())


async def test_items_still_queued_when_the_worker_stops_get_an_error() -> None:
    batcher = MicroBatcher(Doubler(), max_size=1, in_thread=False)
    done: dict[int, int | Exception] = {}

    async with anyio.create_task_group() as tg:
        async def on_done_first(result: int | Exception) -> None:
            done[1] = result
            tg.cancel_scope.cancel()  # the service stops while item 2 waits for its batch

        async def on_done_second(result: int | Exception) -> None:
            done[2] = result

        await tg.start(batcher.run)
        batcher.submit_nowait(1, on_done_first)
        batcher.submit_nowait(2, on_done_second)
        await anyio.sleep_forever()
    assert done[1] == 2
    assert isinstance(done[2], BatcherStoppedError)

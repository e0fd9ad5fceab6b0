"""The generic dynamic Batcher: batching, order, overload, deadlines, cancellation, OOM split."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from engine.core.batcher import Batcher
from engine.core.compute import ComputeThread
from engine.core.errors import DeadlineExceededError, ModelExecutionError, OverloadedError

COMPUTE = ComputeThread("test-compute")


def make(batch_fn: Callable[[list[str]], list[str]], **kwargs: Any) -> Batcher[str, str]:
    options = {"max_batch_size": 8, "max_wait_ms": 20, "max_queue": 64, **kwargs}
    return Batcher("test", batch_fn, COMPUTE, size_of=len, **options)


async def test_concurrent_items_share_batches_and_keep_their_order() -> None:
    seen: list[list[str]] = []

    def upper(batch: list[str]) -> list[str]:
        seen.append(batch)
        return [text.upper() for text in batch]

    batcher = make(upper)
    words = ["ccc", "a", "bb", "dddd"] * 4
    results = await asyncio.gather(*(batcher.submit_many([w]) for w in words))
    assert [r[0] for r in results] == [w.upper() for w in words]
    assert await batcher.submit_many(["x", "yy", "zzz"]) == ["X", "YY", "ZZZ"]
    assert len(seen) < len(words)
    assert all(len(batch) <= 8 for batch in seen)
    assert all(batch == sorted(batch, key=len) for batch in seen)  # sorted by size: less padding
    assert batcher.pending == 0
    batcher.shutdown()


async def test_full_queue_is_429_with_retry_after_and_takes_nothing() -> None:
    gate = threading.Event()

    def blocked(batch: list[str]) -> list[str]:
        gate.wait(5)
        return batch

    batcher = make(blocked, max_queue=4, max_batch_size=2, max_wait_ms=0)
    first = asyncio.ensure_future(batcher.submit_many(["a", "b"]))
    await asyncio.sleep(0.05)  # the first batch is now computing
    queued = asyncio.ensure_future(batcher.submit_many(["c", "d", "e", "f"]))
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError) as caught:
        await batcher.submit_many(["g"])
    assert caught.value.retry_after >= 1
    gate.set()
    assert await first == ["a", "b"]
    assert await queued == ["c", "d", "e", "f"]
    batcher.shutdown()


async def test_item_past_its_deadline_in_the_queue_is_504() -> None:
    def slow(batch: list[str]) -> list[str]:
        time.sleep(0.3)
        return batch

    batcher = make(slow, max_batch_size=1, max_wait_ms=0, timeout_s=0.1)
    first = asyncio.ensure_future(batcher.submit_many(["a"]))
    await asyncio.sleep(0.02)
    with pytest.raises(DeadlineExceededError):
        await batcher.submit_many(["b"])
    assert await first == ["a"]
    batcher.shutdown()


async def test_cancelled_caller_leaves_the_queue() -> None:
    computed: list[str] = []
    gate = threading.Event()

    def record(batch: list[str]) -> list[str]:
        gate.wait(5)
        computed.extend(batch)
        return batch

    batcher = make(record, max_batch_size=1, max_wait_ms=0)
    first = asyncio.ensure_future(batcher.submit_many(["keep"]))
    await asyncio.sleep(0.02)
    doomed = asyncio.ensure_future(batcher.submit_many(["drop1", "drop2"]))
    await asyncio.sleep(0.02)
    doomed.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == ["keep"]
    assert await batcher.submit_many(["after"]) == ["after"]
    assert computed == ["keep", "after"]
    assert batcher.pending == 0
    batcher.shutdown()


async def test_out_of_memory_splits_the_batch_instead_of_failing_everyone() -> None:
    sizes: list[int] = []

    def picky(batch: list[str]) -> list[str]:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise MemoryError("batch too large")
        return batch

    batcher = make(picky, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.submit_many([str(i)]) for i in range(8)))
    assert [r[0] for r in results] == [str(i) for i in range(8)]
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # halved until it fits
    batcher.shutdown()


async def test_other_errors_reach_every_caller_of_the_batch() -> None:
    def broken(batch: list[str]) -> list[str]:
        raise ValueError("bad weights")

    batcher = make(broken)
    # A 500 naming the model and what it raised (not a bare "Internal error").
    with pytest.raises(ModelExecutionError, match="'test' failed: ValueError: bad weights"):
        await batcher.submit_many(["a", "b"])
    batcher.shutdown()


async def test_stream_yields_results_in_order_and_closing_withdraws_the_rest() -> None:
    release = threading.Event()

    def slow_upper(batch: list[str]) -> list[str]:
        release.wait(5)
        return [text.upper() for text in batch]

    batcher = make(slow_upper, max_batch_size=1, max_wait_ms=0)
    release.set()
    assert [r async for r in batcher.stream(["a", "b", "c"])] == ["A", "B", "C"]
    release.clear()
    stream = batcher.stream(["d", "e", "f", "g"])
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    release.set()
    assert await first == "D"
    await stream.aclose()
    await asyncio.sleep(0.05)
    assert batcher.pending == 0

"""One generic dynamic batcher for every capability that batches well (embeddings, speech;
rerank, moderation and images later).

Callers submit items and await a future each. On the engine's shared compute thread, a step
takes the queue as it finds it: once a batch is full or its oldest item has waited
`max_wait_ms`, it orders the items by size so a batch pads
little, runs `max_batch_size` at a time through the batch function, and resolves each future
with its own result. A full queue answers `OverloadedError` (429 + Retry-After), an item whose
deadline passes while queued gets `DeadlineExceededError` (504), and a caller that goes away
takes its item out before it is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from engine.core import metrics
from engine.core.compute import ComputeThread
from engine.core.errors import (
    DeadlineExceededError,
    EmberError,
    ModelUnavailableError,
    OverloadedError,
    is_out_of_memory,
    model_failure,
)

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(order=True)
class _Item(Generic[In]):
    size: int
    seq: int
    payload: Any = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    deadline: float = field(compare=False)
    enqueued: float = field(compare=False, default_factory=time.monotonic)


_Outcome = tuple[_Item[In], Any, BaseException | None]  # item, result, error


class Batcher(Generic[In, Out]):
    """`await batcher.submit_many(items)` → results in the same order.

    `batch_fn(payloads)` runs on the batcher's own thread and returns one result per payload.
    `size_of(payload)` orders items so similar sizes share a batch (e.g. token counts).
    """

    def __init__(
        self,
        name: str,
        batch_fn: Callable[[list[In]], Sequence[Out]],
        compute: ComputeThread,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        size_of: Callable[[In], int] = lambda _: 0,
        timeout_s: float = 0,
    ):
        self.name = name
        self._batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self._size_of = size_of
        self._timeout_s = timeout_s
        self._queue: list[_Item[In]] = []
        self._compute = compute
        self._cond = compute.cond
        self._seq = 0
        self.batches_run = 0
        self._in_flight = 0
        self._current: list[_Item[In]] = []  # the batch being computed
        compute.add(self)

    @property
    def pending(self) -> int:
        """Items queued or being computed."""
        return len(self._queue) + self._in_flight

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not yet computing)."""
        return len(self._queue)

    @property
    def load_fraction(self) -> float:
        return len(self._queue) / self.max_queue

    def _enqueue(self, payloads: Sequence[In]) -> list[_Item[In]]:
        """All or nothing: if the queue cannot take every item, none is queued (429)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self._timeout_s if self._timeout_s else float("inf")
        items = []
        with self._cond:
            if len(self._queue) + len(payloads) > self.max_queue:
                raise OverloadedError(
                    f"{self.name!r} has {len(self._queue)} inputs queued; {len(payloads)} more "
                    f"would pass its limit of {self.max_queue}. Retry shortly.",
                    retry_after=max(1.0, self.max_wait_s * 2),
                )
            for payload in payloads:
                self._seq += 1
                item: _Item[In] = _Item(
                    self._size_of(payload), self._seq, payload, loop.create_future(), loop, deadline
                )
                self._queue.append(item)
                items.append(item)
            self._cond.notify()
        return items

    async def submit_many(self, payloads: Sequence[In]) -> list[Out]:
        """Every result at once, in order."""
        items = self._enqueue(payloads)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            self._withdraw(items)
            raise

    async def submit_all(self, payloads: Sequence[In]) -> list[Out]:
        """Every result, in order, however many: more items than the queue holds go in slices
        of half the queue (submitted whole they would be refused with 429 however long the
        caller waited)."""
        if len(payloads) <= self.max_queue:
            return await self.submit_many(payloads)
        step = max(1, self.max_queue // 2)
        results: list[Out] = []
        for start in range(0, len(payloads), step):
            results += await self.submit_many(payloads[start:start + step])
        return results

    async def stream(self, payloads: Sequence[In]) -> AsyncGenerator[Out, None]:
        """Each result in order as soon as it and those before it are done (speech streams
        sentence by sentence). Closing the iterator early withdraws what is still queued."""
        items = self._enqueue(payloads)
        try:
            for item in items:
                yield await item.future
        finally:
            self._withdraw(items)

    def _withdraw(self, items: list[_Item[In]]) -> None:
        """A caller that went away (or failed) takes its remaining items out of the queue."""
        with self._cond:
            gone = {id(item) for item in items}
            self._queue = [item for item in self._queue if id(item) not in gone]
        for item in items:
            if not item.future.done():
                item.future.cancel()
            elif not item.future.cancelled():
                item.future.exception()  # seen: asyncio would log it as never retrieved

    def shutdown(self, error: EmberError | None = None) -> None:
        """Leave the compute thread; what is still queued fails with `error`."""
        self._compute.remove(self)
        with self._cond:
            left, self._queue = self._queue, []
        gone = error or ModelUnavailableError(f"{self.name!r} was unloaded")
        for item in left:
            self._resolve(item, error=gone)

    # -- the compute thread ------------------------------------------------------------------

    def ready_in(self, now: float) -> float | None:
        """Ready when a batch is full or its oldest item has waited `max_wait_ms`."""
        if not self._queue:
            return None
        if len(self._queue) >= self.max_batch_size:
            return 0
        return max(0.0, self._queue[0].enqueued + self.max_wait_s - now)

    def _choose_batch(self) -> list[_Item[In]]:
        """Under `_cond`: the oldest item, plus the items closest in size among the next few
        batches' worth, sorted by size, so a batch pads little (as `encode` does when it sorts
        a whole input) while the head of the queue always goes."""
        window = self._queue[: self.max_batch_size * 4]
        oldest = window[0]
        nearest = sorted(window[1:], key=lambda item: (abs(item.size - oldest.size), item.seq))
        batch = sorted([oldest, *nearest[: self.max_batch_size - 1]])
        chosen = {id(item) for item in batch}
        self._queue = [item for item in self._queue if id(item) not in chosen]
        return batch

    def abandon(self, error: Exception) -> None:
        """Another thread, while a batch is stuck: its callers and those queued get `error`."""
        with self._cond:
            held = [*self._current, *self._queue]
        for item in held:
            self._resolve(item, error=error)

    def step(self) -> None:
        with self._cond:
            batch = self._choose_batch()
            self._in_flight = len(batch)
            self._current = batch
        now = time.monotonic()
        outcomes: list[_Outcome[In]] = []
        live = []
        for item in batch:
            if item.future.done():  # cancelled by its caller, or abandoned
                continue
            if now > item.deadline:
                outcomes.append((item, None, DeadlineExceededError(
                    f"{self.name!r}: the request waited past its deadline in the queue")))
                continue
            live.append(item)
        if live:
            metrics.BATCH_SIZE.labels(self.name).observe(len(live))
            with metrics.BATCH_SECONDS.labels(self.name).time():
                outcomes += self._run_batch(live)
        # Not pending any more before any caller hears back, so a caller never sees itself.
        self._in_flight = 0
        self._current = []
        for item, result, error in outcomes:
            self._resolve(item, result=result, error=error)

    def _run_batch(self, items: list[_Item[In]]) -> list[_Outcome[In]]:
        try:
            results = self._batch_fn([item.payload for item in items])
            self.batches_run += 1
        except Exception as exc:
            if not is_out_of_memory(exc) or len(items) == 1:  # each caller gets the error
                log.exception("%s: batch of %d failed", self.name, len(items))
                error = model_failure(self.name, exc)
                return [(item, None, error) for item in items]
            log.warning("%s: out of memory on a batch of %d; splitting", self.name, len(items))
            half = len(items) // 2
            return self._run_batch(items[:half]) + self._run_batch(items[half:])
        return [(item, result, None) for item, result in zip(items, results, strict=True)]

    @staticmethod
    def _resolve(
        item: _Item[In], *, result: Any = None, error: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if item.future.done():
                return
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone; nobody waits
            item.loop.call_soon_threadsafe(settle)

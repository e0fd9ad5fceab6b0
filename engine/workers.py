"""Compute runs on threads, never on the event loop. A `SerialWorker` is one model's compute
thread with a bounded queue: full → OverloadedError (429 + Retry-After)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from engine.errors import OverloadedError

T = TypeVar("T")


class SerialWorker:
    """Runs one job at a time for one model, in submission order.

    `pending` counts jobs queued or running; it is only touched from the event loop thread
    (submit) and from done-callbacks scheduled back onto it, so it needs no lock.
    """

    def __init__(self, name: str, max_queue: int):
        self.name = name
        self.max_queue = max_queue
        self.pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ember-{name}")

    @property
    def load_fraction(self) -> float:
        return self.pending / self.max_queue

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self.pending >= self.max_queue:
            raise OverloadedError(
                f"{self.name!r} has {self.pending} requests queued (limit {self.max_queue}); "
                "retry shortly",
                retry_after=1.0,
            )
        loop = asyncio.get_running_loop()
        self.pending += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._job_done))
        return future

    def _job_done(self) -> None:
        self.pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

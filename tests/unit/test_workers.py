from __future__ import annotations

import asyncio
import threading

import pytest

from engine.errors import OverloadedError
from engine.workers import SerialWorker


async def test_full_queue_is_refused_and_drains() -> None:
    gate = threading.Event()
    worker = SerialWorker("m", max_queue=2)
    first = worker.submit(gate.wait, 5)
    second = worker.submit(lambda: "done")
    with pytest.raises(OverloadedError) as caught:
        worker.submit(lambda: "too many")
    assert caught.value.retry_after >= 1
    assert worker.load_fraction == 1.0
    gate.set()
    await asyncio.wrap_future(second)  # its slot is freed before its result arrives
    assert await worker.run(lambda: 42) == 42
    assert first.result() is True and second.result() == "done"
    assert worker.pending == 0
    worker.shutdown()

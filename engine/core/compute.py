"""One long-lived compute thread per engine, shared by every model's runner.

Why one: each thread that runs torch ops keeps its own OpenMP worker pool. With more pooled
OpenMP threads than cores, libgomp drops its spin-wait and wakes workers through the kernel for
every matmul, which made batch-1 decode ~1.4x slower on a 2-core machine. So all inference runs
here, runners taking turns a step at a time (a chat decode step, an embedding batch), and loads
run on short-lived threads whose pools die with them.

Runners share `cond` as their lock: submitters append to a runner's queue under it and notify.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tokenizing a short input takes tens of microseconds, less than a hop to a worker thread and
# back; only inputs above this many characters are tokenized off the event loop.
INLINE_TOKENIZE_CHARS = 4096


async def off_loop_if_large(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size <= INLINE_TOKENIZE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


class Steppable(Protocol):
    name: str

    def ready_in(self, now: float) -> float | None:
        """Under `cond`: None = no work; 0 = a step is ready; > 0 = seconds until one is."""

    def step(self) -> None:
        """Outside `cond`: do one bounded piece of work (must not raise)."""

    def abandon(self, error: Exception) -> None:
        """From another thread, while a step of this runner is stuck: end every request it
        holds with `error` (they must not hang with it); its bookkeeping catches up when
        the step returns."""


class ComputeThread:
    def __init__(self, name: str = "ember-compute"):
        self.cond = threading.Condition()
        self._runners: list[Steppable] = []
        self._closed = False
        self._next = 0
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._stepping: tuple[Steppable, float] | None = None  # the step running, and since
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def add(self, runner: Steppable) -> None:
        with self.cond:
            self._runners.append(runner)
            self.cond.notify()

    def remove(self, runner: Steppable) -> None:
        with self.cond:
            self._runners = [r for r in self._runners if r is not runner]

    def between_steps(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the compute thread once the step in progress (if any) has ended, so it
        never races a step (a runner shutting down, a model about to be unloaded)."""
        future: Future[Any] = Future()
        with self.cond:
            if self._closed or not self._thread.is_alive():
                closed = True
            else:
                closed = False
                self._calls.append((fn, future))
                self.cond.notify()
        if closed:  # no thread to race: run it here
            self._run_calls([(fn, future)])
        return future

    def stuck(self, limit_s: float) -> tuple[Steppable, float] | None:
        """The runner whose step has run longer than `limit_s`, and for how long."""
        stepping = self._stepping
        if stepping is None:
            return None
        runner, since = stepping
        running = time.monotonic() - since
        return (runner, running) if running > limit_s else None

    def close(self) -> None:
        with self.cond:
            self._closed = True
            self.cond.notify()
        self._thread.join(timeout=10)

    @staticmethod
    def _run_calls(calls: list[tuple[Callable[[], Any], Future[Any]]]) -> None:
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _pick(self) -> Steppable | None:
        """Under `cond`: the next runner with a ready step, round-robin; waits until one is
        (or until a call is queued, which the loop runs first)."""
        while not self._closed and not self._calls:
            now = time.monotonic()
            soonest: float | None = None
            count = len(self._runners)
            for offset in range(count):
                runner = self._runners[(self._next + offset) % count]
                wait = runner.ready_in(now)
                if wait == 0:
                    self._next = (self._next + offset + 1) % count
                    return runner
                if wait is not None:
                    soonest = wait if soonest is None else min(soonest, wait)
            self.cond.wait(soonest)
        return None

    def _loop(self) -> None:
        while True:
            with self.cond:
                runner = self._pick()
                calls, self._calls = list(self._calls), deque()
                closed = self._closed
            self._run_calls(calls)
            if runner is None:
                if closed:
                    return
                continue
            self._stepping = (runner, time.monotonic())
            try:
                runner.step()
            except Exception:  # a runner's bug must not stop every model
                log.exception("%s: step failed", runner.name)
            finally:
                self._stepping = None

"""Helpers the gateway dialects (server/infrai, server/quantcdn) share: naming fields the
dialect's way in engine errors, and deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import TypeVar

from engine.core.errors import DeadlineExceededError, EmberError

T = TypeVar("T")


@contextmanager
def renamed_params(names: dict[str, str]) -> Iterator[None]:
    """Engine errors name OpenAI's fields (`prompt`, `n`, `size`); a dialect renames them to
    its own."""
    try:
        yield
    except EmberError as error:
        if error.param in names:
            error.param = names[error.param]
        raise


def deadline_error(timeout_s: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"The reply took longer than timeout_seconds ({timeout_s:g} s); the work was stopped.",
        param="timeout_seconds",
    )


async def within(events: AsyncIterator[T], timeout_s: float) -> AsyncIterator[T]:
    """`events` cut off `timeout_s` after the first pull (closing them stops the engine's
    work); running out of time raises DeadlineExceededError."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aclosing(events):  # type: ignore[type-var]
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise deadline_error(timeout_s) from exc
            yield event


@asynccontextmanager
async def deadline(timeout_s: float) -> AsyncIterator[None]:
    """The block must finish within `timeout_s`; past it, its work is cancelled and the caller
    gets a 504 naming timeout_seconds."""
    scope = asyncio.timeout(timeout_s)
    try:
        async with scope:
            yield
    except TimeoutError as exc:
        if scope.expired():
            raise deadline_error(timeout_s) from exc
        raise

"""Server-sent events: prime a stream so errors become normal 4xx responses, then send
`data: {...}` frames, an error frame if the engine fails mid-stream, and `data: [DONE]`."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse

from engine.core.access import current_caller
from engine.core.errors import EmberError
from server.responses import dumps

log = logging.getLogger("ember.http")
T = TypeVar("T")


async def prime(events: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pull the first event now: tokenization, limit checks and queue admission happen before
    it, so their errors reach the caller as a normal error response, not a broken stream.
    The caller's key holds one of its concurrent streams until the stream ends."""
    holding = contextlib.ExitStack()
    try:
        if (caller := current_caller.get()) is not None:
            holding.enter_context(caller.stream("stream"))
        first = await anext(events)
    except BaseException:
        holding.close()
        await events.aclose()  # type: ignore[attr-defined]
        raise

    async def chained() -> AsyncIterator[T]:
        with holding:
            async with aclosing(events):  # type: ignore[type-var]
                yield first
                async for event in events:
                    yield event

    stream = chained()
    weakref.finalize(stream, holding.close)  # also when the stream is never iterated
    return stream


def sse_response(
    frames: AsyncIterator[dict[str, Any]], envelope: Callable[[EmberError], dict[str, Any]]
) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        # aclosing: a client that disconnects cancels this generator, and closing `frames`
        # propagates down to the engine, which stops decoding at its next step.
        async with aclosing(frames):  # type: ignore[type-var]
            try:
                async for frame in frames:
                    yield b"data: " + dumps(frame) + b"\n\n"
            except EmberError as error:
                log.warning("stream ended with %s: %s", error.code, error.message)
                yield b"data: " + dumps(envelope(error)) + b"\n\n"
            except Exception as exc:  # a bug mid-stream still ends it with a frame saying so
                log.exception("stream failed")
                yield b"data: " + dumps(envelope(EmberError(f"Internal error: {exc}"))) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

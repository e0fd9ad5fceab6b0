"""A client that leaves stops its work, streamed or not.

A streamed reply notices a departed client when Starlette's `StreamingResponse` hears
`http.disconnect` and closes the body iterator. A non-streamed reply has nothing reading the
request's ASGI `receive` channel while its handler awaits the engine, so an abandoned request
would decode to the end. Here the handler's work runs as a task while a second task waits on
`receive` for `http.disconnect`; if the client goes first, the work is cancelled: the
`CancelledError` goes down into the engine call, whose `finally` blocks free the work (the chat
scheduler drops the request at its next step; a batcher withdraws the queued items).

`cancel_on_disconnect` decorates a route whose body FastAPI parses (a JSON body model): by the
time the handler runs, the body has been read, so the listener can only see
`http.disconnect`. A route that reads its body itself (a multipart form) calls
`unless_disconnected` after reading it; listening earlier would swallow body messages.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from fastapi import Request, Response
from starlette.types import Receive

log = logging.getLogger("ember.http")

P = ParamSpec("P")
T = TypeVar("T")

# nginx's "client closed request": never seen by the client, but it is what the access log and
# the request metrics record for work that was abandoned.
CLIENT_CLOSED_REQUEST = 499


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns once the client has gone. Only call it after the body has been read: any body
    message it received would be lost to the handler."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """`work`'s result, or, if the client disconnects first, `work` cancelled (and waited for,
    so the engine has let go of it) and an empty 499 that nobody will read."""
    handler = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({handler, listener}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request was cancelled itself (server shutdown): both go
        handler.cancel()
        listener.cancel()
        raise
    listener.cancel()
    if handler in done:  # finished, even if the client left at the same moment
        return handler.result()
    if listener.exception() is not None:  # could not listen: the work goes on, unwatched
        log.warning("%s %s: cannot watch for a disconnect: %r", request.method,
                    request.url.path, listener.exception())
        return await handler
    handler.cancel()
    await asyncio.wait({handler})
    if not handler.cancelled() and handler.exception() is not None:
        log.debug("%s %s: failed while being cancelled: %r", request.method,
                  request.url.path, handler.exception())
    log.info("%s %s: client disconnected; cancelled", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _request_of(kwargs: dict[str, Any]) -> Request:
    for value in kwargs.values():
        if isinstance(value, Request):
            return value
    raise TypeError("a handler decorated with cancel_on_disconnect must take a `Request`")


def cancel_on_disconnect(
    handler: Callable[P, Awaitable[T]],
) -> Callable[P, Awaitable[T | Response]]:
    """Route decorator (below `@router.post`): the handler is cancelled when its client
    disconnects. The handler must take a `Request` parameter and leave its body to FastAPI."""
    parameters = inspect.signature(handler).parameters.values()
    if not any(p.annotation in (Request, "Request") for p in parameters):
        raise TypeError(f"{handler.__qualname__} needs a `request: Request` parameter to be "
                        "cancelled on disconnect")

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | Response:
        # FastAPI passes every parameter by keyword.
        return await unless_disconnected(_request_of(kwargs), handler(*args, **kwargs))

    return wrapper

"""The app factory: one engine, every dialect's router, error envelopes, limits, metrics."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.core import logs, metrics
from engine.core.access import AccessPolicy
from engine.core.errors import AuthenticationError, EmberError, PayloadTooLargeError
from engine.core.limits import json_depth
from engine.core.settings import Settings, load_settings
from engine.service import Engine
from server.deps import KEY_HINT, presented_key
from server.errors import JsonTooDeepError, envelope_for, install_error_handlers, log
from server.infrai.routes import router as infrai_router
from server.openai.generations import router as generations_router
from server.openai.retrieval import router as retrieval_router
from server.openai.routes import router as openai_router
from server.openapi import install_openapi
from server.quantcdn.routes import router as quantcdn_router


async def send_error(scope: Scope, send: Send, error: EmberError) -> None:
    """An error response from a middleware (before or around routing), in the path's
    dialect envelope."""
    body = json.dumps(envelope_for(scope["path"])(error)).encode()
    await send({"type": "http.response.start", "status": error.status_code,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while streaming in, and
    JSON bodies nested deeper than `max_depth` with 400 (before anything parses them: a deep
    enough nesting exhausts the parser's recursion)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int):
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, int(declared))
            return
        received = 0
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        json_chunks: list[bytes] | None = [] if b"json" in content_type else None

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing to the error handlers.
                raise StarletteHTTPException(413, self._message(received))
            if json_chunks is not None and message["type"] == "http.request":
                json_chunks.append(chunk)
                if not message.get("more_body", False):
                    depth = json_depth(b"".join(json_chunks))
                    if depth > self.max_depth:
                        raise JsonTooDeepError(400, (
                            f"The JSON body nests {depth} levels deep; the limit is "
                            f"{self.max_depth} (setting max_json_depth)."))
            return message

        await self.app(scope, counting_receive, send)

    def _message(self, size: int) -> str:
        return (f"The request body is {size} bytes or more; the limit is {self.max_bytes} bytes "
                "(setting max_body_bytes).")

    async def _refuse(self, scope: Scope, send: Send, size: int) -> None:
        error = PayloadTooLargeError(self._message(size))
        log.warning("%s %s → 413: %s", scope["method"], scope["path"], error.message)
        await send_error(scope, send, error)


class MetricsMiddleware:
    """Counts requests by route template and status; times them to the response head."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.REQUESTS.labels(route, str(message["status"])).inc()
                metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, timed_send)


# Operational routes that expose the server itself; behind the API key when one is set
# (setting guard_metrics_and_docs). /health and /ready stay open for probes.
GUARDED_PATHS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class OperationalGuardMiddleware:
    """Refuses /metrics and the API docs without a key, in the OpenAI envelope."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GUARDED_PATHS:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            if self.policy.authenticate(presented_key(headers)) is None:
                error = AuthenticationError(f"Missing or incorrect API key: {KEY_HINT}.")
                log.warning("%s %s → 401: no valid API key", scope["method"], scope["path"])
                await send_error(scope, send, error)
                return
        await self.app(scope, receive, send)


REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # what is echoed; anything else: a new id
access_log = logging.getLogger("ember.access")


class RequestContextMiddleware:
    """Every response carries `x-request-id`: the caller's own (when it is a sane token),
    else a new one. The id is in every log line written for the request and in its error
    bodies; one access-log line is written when the request ends, also when the client left
    before a response (status 499)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        token = logs.request_id.set(request_id.decode())
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        started = time.perf_counter()
        status = 499  # nginx's "client closed request": no response head was sent

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s "%s %s" %d %.1fms', client[0], scope["method"], scope["path"],
                            status, (time.perf_counter() - started) * 1000)
            logs.request_id.reset(token)


class UnhandledErrorMiddleware:
    """A bug in a route answers 500 in the dialect's envelope and keeps the connection open.
    (Starlette's own last-resort handler re-raises, and uvicorn then drops the keep-alive
    connection, so the client's next request on it fails with a reset.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:  # the head is out: all that is left is to end the response
                await send({"type": "http.response.body", "body": b""})
                return
            await send_error(scope, send, EmberError(f"Internal error: {type(exc).__name__}"))


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or (engine.settings if engine else load_settings())
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="ember", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(generations_router)
    app.include_router(retrieval_router)
    app.include_router(infrai_router)
    app.include_router(quantcdn_router)
    install_openapi(app)  # the published schema says what the routes answer

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        preload = {name: engine.models.status(name).state for name in engine.preload_ids()}
        ok = engine.preloaded and all(state == "ready" for state in preload.values())
        return JSONResponse({"status": "ready" if ok else "loading", "models": preload},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        for status in engine.models.list():
            metrics.QUEUE_DEPTH.labels(status.id).set(status.queued_requests)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       max_depth=settings.max_json_depth)
    app.add_middleware(MetricsMiddleware)
    policy = engine.access
    if policy.enabled and settings.guard_metrics_and_docs:
        app.add_middleware(OperationalGuardMiddleware, policy=policy)
    if settings.cors_origins:  # outside the key check: a preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["x-request-id", "retry-after"])
    app.add_middleware(RequestContextMiddleware)  # outermost: every response has an id
    if policy.enabled:
        log.info("API keys: %d accepted; every model route needs one%s", len(policy),
                 ", and /metrics and the docs" if settings.guard_metrics_and_docs else "")
    else:
        log.warning("no API key set (api_key, api_keys): every route is open to anyone who "
                    "can reach this server")
    return app

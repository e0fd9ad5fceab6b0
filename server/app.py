"""The app factory: one engine, every dialect's router, error envelopes, limits, metrics."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import metrics
from engine.errors import AuthenticationError, PayloadTooLargeError
from engine.service import Engine
from engine.settings import Settings, load_settings
from server.deps import key_accepted, presented_key
from server.errors import envelope_for, install_error_handlers, log
from server.infrai.routes import router as infrai_router
from server.openai.generations import router as generations_router
from server.openai.retrieval import router as retrieval_router
from server.openai.routes import router as openai_router
from server.quantcdn.routes import router as quantcdn_router


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, int(declared))
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing to the error handlers.
                raise StarletteHTTPException(413, self._message(received))
            return message

        await self.app(scope, counting_receive, send)

    def _message(self, size: int) -> str:
        return (f"The request body is {size} bytes or more; the limit is {self.max_bytes} bytes "
                "(setting max_body_bytes).")

    async def _refuse(self, scope: Scope, send: Send, size: int) -> None:
        error = PayloadTooLargeError(self._message(size))
        log.warning("%s %s → 413: %s", scope["method"], scope["path"], error.message)
        body = json.dumps(envelope_for(scope["path"])(error)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


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

    def __init__(self, app: ASGIApp, accepted: list[str]):
        self.app = app
        self.accepted = accepted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GUARDED_PATHS:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            if not key_accepted(presented_key(headers), self.accepted):
                error = AuthenticationError("Missing or incorrect API key: send it as "
                                            "`Authorization: Bearer <key>` or "
                                            "`x-api-key: <key>`.")
                log.warning("%s %s → 401: no valid API key", scope["method"], scope["path"])
                body = json.dumps(envelope_for(scope["path"])(error)).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # what is echoed; anything else: a new id


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the caller's own (when it is a sane token),
    else a new one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, with_id)


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

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        preload = {name: engine.manager.status_of(name).state for name in engine.preload_ids()}
        ok = engine.preloaded and all(state == "ready" for state in preload.values())
        return JSONResponse({"status": "ready" if ok else "loading", "models": preload},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        for status in engine.manager.status():
            metrics.QUEUE_DEPTH.labels(status.id).set(status.queued_requests)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    accepted = settings.accepted_keys()
    if accepted and settings.guard_metrics_and_docs:
        app.add_middleware(OperationalGuardMiddleware, accepted=accepted)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response gets one, 4xx too
    if accepted:
        log.info("API keys: %d accepted; every model route needs one%s", len(accepted),
                 ", and /metrics and the docs" if settings.guard_metrics_and_docs else "")
    else:
        log.warning("no API key set (api_key, api_keys): every route is open to anyone who "
                    "can reach this server")
    return app

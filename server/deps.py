"""Request dependencies shared by every dialect's routes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request

from engine.core.access import Caller, current_caller
from engine.core.errors import AuthenticationError, PermissionDeniedError
from engine.service import Engine

# Dependencies are `async def`: FastAPI runs plain `def` ones on a thread pool, a thread hop per
# request that cost more than the work they do.


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>` or `x-api-key: <key>`."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


KEY_HINT = "send it as `Authorization: Bearer <key>` or `x-api-key: <key>`"


def authenticate(request: Request) -> Caller | None:
    """The request's caller; None when the server runs without keys; 401 for a missing or
    unknown key."""
    policy = request.app.state.engine.access
    if not policy.enabled:
        return None
    caller = policy.authenticate(presented_key(request.headers))
    if caller is None:
        raise AuthenticationError(f"Missing or incorrect API key: {KEY_HINT}.")
    return caller


def admit(caller: Caller, request: Request) -> None:
    """Within the key's route scope and its per-minute limits; then `current_caller` for the
    engine's own checks (model scope, tokens, streams)."""
    path = request.url.path
    if not caller.may_use_route(path):
        raise PermissionDeniedError(f"API key {caller.name!r} may not use {path}.")
    caller.admit_request(route_template(request))
    current_caller.set(caller)


async def require_api_key(request: Request) -> None:
    """With API keys set, every API route needs one, within the key's route scope and its
    per-minute request and token limits."""
    caller = authenticate(request)
    if caller is not None:
        admit(caller, request)


def route_template(request: Request) -> str:
    """The route's path template (/v1/files/{file_id}), a bounded metrics label."""
    return str(getattr(request.scope.get("route"), "path", request.url.path))


EngineDep = Annotated[Engine, Depends(get_engine)]


def public_base_url(request: Request, engine: Engine) -> str:
    """Where clients reach this server: `public_url` behind a proxy, else the request's own."""
    return (engine.settings.public_url or str(request.base_url)).rstrip("/")


def file_url(request: Request, engine: Engine, file_id: str) -> str:
    """The URL a generated file is served at."""
    return f"{public_base_url(request, engine)}/v1/files/{file_id}/content"

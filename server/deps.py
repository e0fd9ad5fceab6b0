"""Request dependencies shared by every dialect's routes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from engine.errors import AuthenticationError
from engine.service import Engine

# Dependencies are `async def`: FastAPI runs plain `def` ones on a thread pool, a thread hop per
# request that cost more than the work they do.


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def require_api_key(request: Request) -> None:
    """When `api_key` is set, every API route needs `Authorization: Bearer <key>`."""
    expected = request.app.state.engine.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise AuthenticationError("Missing or incorrect API key in the Authorization header.")


EngineDep = Annotated[Engine, Depends(get_engine)]


def public_base_url(request: Request, engine: Engine) -> str:
    """Where clients reach this server: `public_url` behind a proxy, else the request's own."""
    return (engine.settings.public_url or str(request.base_url)).rstrip("/")


def file_url(request: Request, engine: Engine, file_id: str) -> str:
    """The URL a generated file is served at."""
    return f"{public_base_url(request, engine)}/v1/files/{file_id}/content"

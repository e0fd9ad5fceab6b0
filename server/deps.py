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

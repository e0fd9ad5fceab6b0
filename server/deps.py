"""Request dependencies shared by every dialect's routes."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request

from engine.errors import AuthenticationError
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


def key_accepted(presented: str | None, accepted: list[str]) -> bool:
    """Compared with every key in constant time, so timing tells nothing of which is close."""
    if presented is None:
        return False
    matches = [secrets.compare_digest(presented.encode(), key.encode()) for key in accepted]
    return any(matches)


async def require_api_key(request: Request) -> None:
    """With API keys set (api_key, api_keys), every API route needs one of them."""
    accepted = request.app.state.engine.settings.accepted_keys()
    if accepted and not key_accepted(presented_key(request.headers), accepted):
        raise AuthenticationError("Missing or incorrect API key: send it as "
                                  "`Authorization: Bearer <key>` or `x-api-key: <key>`.")


EngineDep = Annotated[Engine, Depends(get_engine)]


def public_base_url(request: Request, engine: Engine) -> str:
    """Where clients reach this server: `public_url` behind a proxy, else the request's own."""
    return (engine.settings.public_url or str(request.base_url)).rstrip("/")


def file_url(request: Request, engine: Engine, file_id: str) -> str:
    """The URL a generated file is served at."""
    return f"{public_base_url(request, engine)}/v1/files/{file_id}/content"

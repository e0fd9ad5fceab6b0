"""Organisation-scoped API keys for `/api/v3/organizations/{organisation}/ai/*`.

With neither `api_key` nor `organization_keys` set, the routes are open. Otherwise a request
needs `Authorization: Bearer <key>`: the server-wide `api_key` is valid for every organisation;
a key listed under `organization_keys[organisation]` for that organisation only. A key of
another organisation is a 403; a missing or unknown key is a 401.
"""

from __future__ import annotations

import secrets

from fastapi import Request

from engine.errors import AuthenticationError
from server.quantcdn.errors import PermissionDeniedError


def _matches(token: str, keys: list[str]) -> bool:
    # Every key is compared (no early exit), in constant time each.
    found = False
    for key in keys:
        found |= secrets.compare_digest(token.encode(), key.encode())
    return found


async def require_organisation_key(organisation: str, request: Request) -> None:
    settings = request.app.state.engine.settings
    org_keys: dict[str, list[str]] = settings.organization_keys
    server_wide = settings.accepted_keys()
    if not server_wide and not org_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing API key: send Authorization: Bearer <key>.")
    if _matches(token, server_wide + org_keys.get(organisation, [])):
        return
    others = [key for org, keys in org_keys.items() if org != organisation for key in keys]
    if _matches(token, others):
        raise PermissionDeniedError(
            f"This API key is not valid for organisation {organisation!r}.",
            param="organisation",
        )
    raise AuthenticationError("Incorrect API key in the Authorization header.")

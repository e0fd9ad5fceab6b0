"""Organisation-scoped API keys for `/api/v3/organizations/{organisation}/ai/*`.

With no keys at all, the routes are open. Otherwise a request needs a key (`Authorization:
Bearer <key>` or `x-api-key`): a server-wide key (api_key, api_keys, the keys file) is valid
for every organisation its scope allows; a key listed under `organization_keys[organisation]`
for that organisation only. A key of another organisation is a 403; a missing or unknown key
is a 401.
"""

from __future__ import annotations

from fastapi import Request

from engine.core.access import matching_index
from engine.core.errors import AuthenticationError, PermissionDeniedError
from server.deps import KEY_HINT, admit, presented_key


def _matches(token: str, keys: list[str]) -> bool:
    return matching_index((token.encode(), key.encode()) for key in keys) is not None


async def require_organisation_key(organisation: str, request: Request) -> None:
    engine = request.app.state.engine
    org_keys: dict[str, list[str]] = engine.settings.organization_keys
    if not engine.access.enabled and not org_keys:
        return
    token = presented_key(request.headers)
    if token is None:
        raise AuthenticationError(f"Missing API key: {KEY_HINT}.")
    caller = engine.access.authenticate(token)
    if caller is not None:
        if not caller.may_use_organization(organisation):
            raise PermissionDeniedError(
                f"API key {caller.name!r} is not valid for organisation {organisation!r}.",
                param="organisation")
        admit(caller, request)
        return
    if _matches(token, org_keys.get(organisation, [])):
        return
    others = [key for org, keys in org_keys.items() if org != organisation for key in keys]
    if _matches(token, others):
        raise PermissionDeniedError(
            f"This API key is not valid for organisation {organisation!r}.",
            param="organisation",
        )
    raise AuthenticationError("Incorrect API key.")

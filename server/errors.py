"""Maps the engine's one error hierarchy (and malformed requests) onto each dialect's error
envelope, in this one place. Every 4xx is logged with its reason."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.core import logs
from engine.core.errors import EmberError, InvalidRequestError, NotFoundError, PayloadTooLargeError

log = logging.getLogger("ember.http")

Envelope = Callable[[EmberError], dict[str, Any]]


class JsonTooDeepError(StarletteHTTPException):
    """Raised while the body streams in (so it passes FastAPI's body parsing as it is)."""


def openai_envelope(error: EmberError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
            "request_id": logs.request_id.get(),
        }
    }


# Path prefix → envelope: OpenAI's is the default, each other dialect registers its own when
# imported (register_envelope). Longest prefix wins.
ENVELOPES: dict[str, Envelope] = {"/": openai_envelope}
# Envelope → (component name, JSON schema) of a registered dialect, for the published document.
ENVELOPE_SCHEMAS: dict[Envelope, tuple[str, dict[str, Any]]] = {}


def register_envelope(path_prefix: str, envelope: Envelope, schema_name: str,
                      schema: dict[str, Any]) -> None:
    """Errors on paths under `path_prefix` are answered in `envelope`; the published
    document names its body `schema_name`."""
    ENVELOPES[path_prefix] = envelope
    ENVELOPE_SCHEMAS[envelope] = (schema_name, schema)


def envelope_for(path: str) -> Envelope:
    prefix = max((p for p in ENVELOPES if path.startswith(p)), key=len)
    return ENVELOPES[prefix]


def error_response(request: Request, error: EmberError) -> JSONResponse:
    level = logging.ERROR if error.status_code >= 500 else logging.WARNING
    log.log(level, "%s %s → %d %s: %s", request.method, request.url.path, error.status_code,
            error.code, error.message)
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return JSONResponse(
        envelope_for(request.url.path)(error), status_code=error.status_code, headers=headers
    )


# pydantic puts the tried type of a union member into `loc` ("str", "list[int]", a model's
# class name); such tags are not fields.
_UNION_TAG = re.compile(
    r"^([a-z]+|[A-Z]\w*)\[.*\]$|^(str|int|float|bool|dict|list|none)$|^[A-Z]\w*$"
)


def _field_path(loc: tuple[Any, ...]) -> tuple[str, list[str]]:
    """('body', 'messages', 0, 'role') → ('messages[0].role', []); a union member's tag ends
    the path and is returned as the type that was tried."""
    path = ""
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path") else loc
    for part in parts:
        if isinstance(part, str) and _UNION_TAG.match(part):
            return path, [part]
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path, []


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("The request body is not valid JSON.", code="invalid_json")
    field, tried = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and not field:
        return InvalidRequestError("The request body is empty: send a JSON object.",
                                   code="missing_body")
    if first.get("type") == "missing" and not tried:
        return InvalidRequestError(f"Missing required parameter: '{field}'.", param=field,
                                   code="missing_required_parameter")
    got = first.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    if tried:  # every member of a union failed: say which types are accepted
        accepted = []
        for error in errors:
            other, kinds = _field_path(tuple(error.get("loc", ())))
            if other == field:
                accepted += [k for k in kinds if k not in accepted]
        message = f"expected one of: {', '.join(accepted)}"
    else:
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return InvalidRequestError(f"Invalid value for '{field or 'body'}': {message} (got {shown}).",
                               param=field or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EmberError)
    async def _ember(request: Request, exc: EmberError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: EmberError
        if exc.status_code == 404:
            error = NotFoundError(f"No route {request.method} {request.url.path}")
        elif exc.status_code == 413:
            error = PayloadTooLargeError(str(exc.detail))
        else:
            error = EmberError(str(exc.detail))
            error.status_code = exc.status_code
            error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
            # Starlette raises these for bodies it cannot parse (a broken multipart form).
            error.code = "invalid_body" if exc.status_code == 400 else f"http_{exc.status_code}"
            if isinstance(exc, JsonTooDeepError):
                error.code = "json_too_deep"
        return error_response(request, error)

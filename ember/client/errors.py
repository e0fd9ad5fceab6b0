"""Exceptions the ember client raises. Every HTTP error carries the server's status and its
OpenAI-style envelope (`message`, `type`, `param`, `code`); transport failures are
`APIConnectionError` (or `APITimeoutError`)."""

from __future__ import annotations

from typing import Any

import httpx


class EmberError(Exception):
    """Base of every exception the client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(EmberError):
    """The server could not be reached, or the connection broke before a response came."""

    def __init__(self, message: str = "Could not connect to the ember server.", *,
                 request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """No response within the client's `timeout`."""

    def __init__(self, message: str = "The request to the ember server timed out.", *,
                 request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIError(EmberError):
    """The server answered with an error status (or sent an error frame mid-stream)."""

    def __init__(self, message: str, *, status_code: int, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 body: Any = None, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.response = response

    def __str__(self) -> str:
        details = ", ".join(
            f"{name}={value!r}" for name, value in
            (("type", self.type), ("param", self.param), ("code", self.code)) if value
        )
        return f"{self.status_code}: {self.message}" + (f" ({details})" if details else "")


class BadRequestError(APIError):
    """400: a field is missing or has a value the server cannot accept (`param` names it)."""


class AuthenticationError(APIError):
    """401: the server has an API key set and this client sent none or a wrong one."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: unknown model (the message lists the available ids), job or file."""


class ConflictError(APIError):
    """409: the request clashes with the current state (a job's file before it completed, an
    Idempotency-Key reused for a different request, unloading a model that is serving)."""


class PayloadTooLargeError(APIError):
    """413: the body is over the server's `max_body_bytes`."""


class UnprocessableEntityError(APIError):
    """422."""


class RateLimitError(APIError):
    """429: the model's queue is full; retried automatically after `Retry-After`."""


class InternalServerError(APIError):
    """5xx."""


class ServiceUnavailableError(InternalServerError):
    """503: the model is not installed (the message says how: `ember pull ID`), failed to
    load, or the server is still loading."""


class GatewayTimeoutError(InternalServerError):
    """504: the request waited in the model's queue longer than `request_timeout_s`."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def error_class(status_code: int) -> type[APIError]:
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    return InternalServerError if status_code >= 500 else APIError


def error_from_body(status_code: int, body: Any,
                    response: httpx.Response | None = None) -> APIError:
    """The typed error for an OpenAI-style `{"error": {...}}` body (or any other body)."""
    envelope = body.get("error") if isinstance(body, dict) else None
    if isinstance(envelope, dict):
        message = str(envelope.get("message") or f"HTTP {status_code}")
        return error_class(status_code)(
            message, status_code=status_code, type=envelope.get("type"),
            param=envelope.get("param"), code=envelope.get("code"), body=body,
            response=response,
        )
    message = body if isinstance(body, str) and body else f"HTTP {status_code}"
    return error_class(status_code)(message, status_code=status_code, body=body,
                                    response=response)


def error_from_response(response: httpx.Response) -> APIError:
    """Call after the body is read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text.strip()
    return error_from_body(response.status_code, body, response)

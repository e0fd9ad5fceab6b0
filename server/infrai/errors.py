"""The `/v1/ai/*` error envelope, and the one error this dialect adds (501 for what is
announced but not built yet)."""

from __future__ import annotations

from typing import Any

from engine.core import logs
from engine.core.errors import EmberError
from server.errors import register_envelope
from server.openapi import NULLABLE_STRING, STRING, closed_object

RETRYABLE = (429, 503, 504)


def infrai_envelope(error: EmberError) -> dict[str, Any]:
    """`{"error": {code, message, param, status, retryable}}`: the status is repeated in the
    body, and `retryable` says whether the same request may succeed later (queue full,
    model loading, deadline)."""
    return {
        "error": {
            "code": error.code or error.error_type,
            "message": error.message,
            "param": error.param,
            "status": error.status_code,
            "retryable": error.status_code in RETRYABLE,
            "request_id": logs.request_id.get(),
        }
    }


register_envelope("/v1/ai/", infrai_envelope, "GatewayError", closed_object({
    "error": closed_object({
        "code": STRING, "message": STRING, "param": NULLABLE_STRING,
        "status": {"type": "integer"}, "retryable": {"type": "boolean"},
        "request_id": STRING})}))


class NotImplementedYetError(EmberError):
    status_code = 501
    error_type = "not_implemented"
    code = "not_implemented"


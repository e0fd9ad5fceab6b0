"""The QuantCDN error envelope."""

from __future__ import annotations

from typing import Any

from engine.core import logs
from engine.core.errors import EmberError
from server.errors import register_envelope
from server.openapi import NULLABLE_STRING, STRING, closed_object


def quant_envelope(error: EmberError) -> dict[str, Any]:
    """QuantCDN's own error body (`{"error": true, "message": ...}`, its V2Error), with the
    field at fault and a code added."""
    return {"error": True, "message": error.message, "code": error.code, "param": error.param,
            "request_id": logs.request_id.get()}


register_envelope("/api/v3/organizations/", quant_envelope, "QuantError", closed_object({
    "error": {"const": True}, "message": STRING, "code": NULLABLE_STRING,
    "param": NULLABLE_STRING, "request_id": STRING}))

"""The QuantCDN error envelope."""

from __future__ import annotations

from typing import Any

from engine.core import logs
from engine.core.errors import EmberError


def quant_envelope(error: EmberError) -> dict[str, Any]:
    """QuantCDN's own error body (`{"error": true, "message": ...}`, its V2Error), with the
    field at fault and a code added."""
    return {"error": True, "message": error.message, "code": error.code, "param": error.param,
            "request_id": logs.request_id.get()}

"""The QuantCDN error envelope and the one error this dialect adds (403 for a key of another
organisation)."""

from __future__ import annotations

from typing import Any

from engine.errors import EmberError


def quant_envelope(error: EmberError) -> dict[str, Any]:
    """QuantCDN's own error body (`{"error": true, "message": ...}`, its V2Error), with the
    field at fault and a code added."""
    return {"error": True, "message": error.message, "code": error.code, "param": error.param}


class PermissionDeniedError(EmberError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"

"""One canonical digest of a JSON-able value: the key of the response cache, and what tells an
idempotent retry from a different request reusing its key."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(payload: Any) -> str:
    """SHA-256 of a JSON-able value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

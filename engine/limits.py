"""Per-request size checks every capability shares, so each limit reads the same."""

from __future__ import annotations

from engine.errors import InvalidRequestError


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

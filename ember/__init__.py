"""ember: a local inference engine behind OpenAI-compatible and gateway APIs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ember.client import AsyncEmber, Ember

__all__ = ["AsyncEmber", "Ember", "__version__"]


def __getattr__(name: str) -> Any:
    # The client is imported on first use, so `import ember` (and the CLI) stays cheap.
    if name in ("Ember", "AsyncEmber"):
        from ember import client

        return getattr(client, name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")

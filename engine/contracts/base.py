"""What every model backend is, whatever its task: built from a registry entry and a
`LoadContext`, then `load`, `warmup`, its task's batched call, `unload`. Each task's own
contract (engine/contracts/<task>.py) extends `Backend`; the model manager leases a backend as
its task's contract, never as `Any`. Each adapter declares its `options` model, checked when
the engine starts, so a bad registry entry fails then, not on its first request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class LoadContext:
    """What the engine decided for this load: where, in which precision, and where to cache."""

    device: str
    dtype: Any  # a torch.dtype (contracts import no torch)
    models_dir: Path
    # Chat backends: KV tokens summed over every sequence, sequences at once, CPU threads
    # (0 = every core). From the entry's limits and the settings.
    kv_cache_tokens: int = 32768
    max_sequences: int = 32
    threads: int = 0


class AdapterOptions(BaseModel):
    """A registry entry's `options:` block, as one adapter reads it. Unknown keys are an
    error: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@runtime_checkable
class Backend(Protocol):
    """The part of every task's contract the model manager drives. An adapter is built as
    `cls(entry, context)` (which checks the entry's `options:` against `options_model`), then
    `load`ed and `warmup`ed on a worker thread; `memory_bytes` counts it against the memory
    budget while it is loaded; `unload` frees it."""

    options_model: ClassVar[type[AdapterOptions]]

    def load(self) -> None:
        """Read the weights (from the local cache only) onto `LoadContext.device`. Raises
        ModelLoadError (or ModelUnavailableError: not installed) naming the model."""
        ...

    def warmup(self) -> None:
        """Run one tiny request, so the first caller does not pay for lazy initialization."""
        ...

    def memory_bytes(self) -> int:
        """Bytes the loaded model holds (weights, and any fixed cache it allocated)."""
        ...

    def unload(self) -> None:
        """Drop the model and give its memory back (device memory included)."""
        ...


@runtime_checkable
class BatchBackend(Backend, Protocol):
    """A backend the dynamic batcher (engine/core/batcher.py) drives: items prepared on
    request threads, from any number of requests, run in one call on the compute thread.
    Each task's contract says what its items and outputs are."""

    def batch(self, items: list[Any]) -> Sequence[Any]:
        """One output per item, in order."""
        ...

    def size_of(self, item: Any) -> int:
        """The item's size (tokens, characters, ...): the batcher groups similar sizes, so
        a batch pads little."""
        ...

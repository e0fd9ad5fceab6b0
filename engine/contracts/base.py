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
    """The part of every task's contract the model manager drives."""

    options_model: ClassVar[type[AdapterOptions]]

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def memory_bytes(self) -> int: ...

    def unload(self) -> None: ...


@runtime_checkable
class BatchBackend(Backend, Protocol):
    """A backend the dynamic batcher drives: items from any number of requests, one call."""

    def batch(self, items: Sequence[Any]) -> list[Any]: ...

    def size_of(self, item: Any) -> int: ...

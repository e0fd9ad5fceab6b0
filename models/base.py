"""The small contract every adapter implements: construct from an entry, `load`, `warmup`,
the task's batched call, `unload`."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.devices import release_device_memory
from engine.registry import ModelEntry


@dataclass(frozen=True)
class LoadContext:
    """What the engine decided for this load: where, in which precision, and where to cache."""

    device: str
    dtype: torch.dtype
    models_dir: Path


class ModelAdapter:
    """Base adapter. Subclasses set `self.model` in `load` and add their task's call."""

    def __init__(self, entry: ModelEntry, context: LoadContext):
        self.entry = entry
        self.context = context
        self.model: Any = None

    def load(self) -> None:
        raise NotImplementedError

    def warmup(self) -> None:
        """Run one tiny request so the first user request does not pay for lazy init."""

    def memory_bytes(self) -> int:
        """Bytes the weights occupy; used for the memory budget."""
        module = self.model
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            return sum(t.numel() * t.element_size() for t in tensors)
        return 0

    def unload(self) -> None:
        self.model = None
        gc.collect()
        release_device_memory(self.context.device)

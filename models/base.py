"""The small contract every adapter implements: construct from an entry, `load`, `warmup`,
the task's batched call, `unload`."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from engine.devices import release_device_memory
from engine.registry import ModelEntry


@dataclass(frozen=True)
class LoadContext:
    """What the engine decided for this load: where, in which precision, and where to cache."""

    device: str
    dtype: torch.dtype
    models_dir: Path
    # Chat backends: KV tokens summed over every sequence, sequences at once, CPU threads
    # (0 = every core). From the entry's limits and the settings.
    kv_cache_tokens: int = 32768
    max_sequences: int = 32
    threads: int = 0


def thread_safe_encoder(tokenizer: Any) -> Tokenizer:
    """A private copy of a fast tokenizer's Rust tokenizer with padding and truncation off.

    The transformers wrapper re-configures padding/truncation on its shared Rust tokenizer per
    call, so encoding on request threads while the compute thread encodes a batch races
    ("expected sequence of length 31 ... got 32"). This copy is never re-configured, and
    encoding with it only reads it.
    """
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_padding()
    encoder.no_truncation()
    return encoder


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
        """Bytes the weights occupy; used for the memory budget. A torch module, or a
        diffusers pipeline (its `components` hold the modules)."""
        components = getattr(self.model, "components", None)
        modules = [self.model] if components is None else list(components.values())
        tensors = [t for m in modules if isinstance(m, torch.nn.Module)
                   for t in (*m.parameters(), *m.buffers())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def unload(self) -> None:
        self.model = None
        gc.collect()
        release_device_memory(self.context.device)

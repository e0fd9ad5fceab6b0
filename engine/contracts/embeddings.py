"""Embeddings: the request and result types, and the contract an embedding model implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from engine.contracts.base import BatchBackend


@dataclass
class EmbeddingRequest:
    model: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass
class EmbeddingResult:
    model: str
    vectors: Any  # numpy float32 array, shape (n, dims)
    prompt_tokens: int


@runtime_checkable
class Embedder(BatchBackend, Protocol):
    """Texts or token ids to L2-normalized vectors. `tokenize` runs on the request path (it
    raises a 400 for an input over the model's context); `batch` embeds token-id lists."""

    def tokenize(self, request: EmbeddingRequest) -> list[list[int]]: ...

    def check_dimensions(self, dimensions: int | None) -> None: ...

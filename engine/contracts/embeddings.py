"""Embeddings: the request and result types, and the contract an embedding model implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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



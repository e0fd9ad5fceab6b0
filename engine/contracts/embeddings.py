"""Embeddings: the request and result types, and the contract an embedding model implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field

from engine.contracts.base import AdapterOptions, BatchBackend


@dataclass
class EmbeddingRequest:
    model: str | None  # None: the task's default model
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None
    # True: `dimensions` at or above the model's own size gives the model's own vectors
    # (QuantCDN's client always sends one) instead of a 400.
    dimensions_at_most: bool = False

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass
class EmbeddingResult:
    model: str
    vectors: Any  # numpy float32 array, shape (n, dims)
    prompt_tokens: int
    served_by: str = ""  # the id of the registry entry that ran it


@runtime_checkable
class Embedder(BatchBackend, Protocol):
    """Texts or token ids to L2-normalized vectors. `tokenize` runs on the request path (it
    raises a 400 for an input over the model's context); `batch` embeds token-id lists."""

    def tokenize(self, request: EmbeddingRequest) -> list[list[int]]:
        """Token ids per input, the model's special tokens included (InvalidRequestError for
        an id outside the vocabulary, ContextLengthExceededError for an input too long)."""
        ...

    def check_dimensions(self, dimensions: int | None) -> None:
        """InvalidRequestError unless `dimensions` is None or 1 .. the model's."""
        ...

    def batch(self, items: list[list[int]]) -> Sequence[np.ndarray]:
        """A float32 unit vector at the model's full dimension per input, in order."""
        ...

    def size_of(self, item: list[int]) -> int: ...


EncoderBackend = Literal["auto", "torch", "bf16", "onnx", "onnx-int8"]


class EncoderOptions(AdapterOptions):
    """Where an encoder (an embedding model, a bi-encoder reranker) runs: fp32 `torch`,
    `bf16` torch (GPUs; CPUs with AVX512-BF16 or AMX), ONNX Runtime as `onnx` (fp32) or
    `onnx-int8`, or `auto`: the fastest of those that this hardware runs natively and whose
    vectors keep a cosine of at least `min_cosine` with fp32 torch on a fixed probe set. A
    variant that fails falls back (logged) to fp32 torch."""

    backend: EncoderBackend = "torch"
    min_cosine: float = Field(0.99, ge=0.0, le=1.0)


class EmbeddingOptions(EncoderOptions):
    """sentence-transformers embedding models (models.embeddings)."""

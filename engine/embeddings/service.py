"""Embeddings: the one implementation every dialect calls. Inputs are checked before the
model is looked up, tokenized by the model (off the event loop when large), and embedded by
the model's dynamic batcher, so single-text requests arriving together share one batch.
`dimensions` shortens vectors here, once, for every dialect."""

from __future__ import annotations

import numpy as np

from engine.contracts.embeddings import Embedder, EmbeddingRequest, EmbeddingResult
from engine.core import metrics
from engine.core.access import current_caller
from engine.core.batcher import Batcher
from engine.core.compute import off_loop_if_large
from engine.core.errors import InvalidRequestError
from engine.core.limits import check_count
from engine.core.manager import ModelManager
from engine.core.settings import Settings


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalize (OpenAI's `dimensions`)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    vectors = vectors[:, :dimensions]
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class EmbeddingService:
    def __init__(self, settings: Settings, manager: ModelManager):
        self.settings = settings
        self.manager = manager

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        count = len(request)
        check_count(count, self.settings.max_embedding_inputs, "input", "max_embedding_inputs")
        for index, text in enumerate(request.texts or []):
            if not text:
                raise InvalidRequestError(f"input[{index}] is an empty string", param="input")
        model = self.manager.registry.model_or_default(request.model, "embedding")
        async with self.manager.lease_as(model, "embedding", Embedder, Batcher) as slot:
            adapter = slot.backend
            if not request.dimensions_at_most:
                adapter.check_dimensions(request.dimensions)
            size = sum(map(len, request.texts or request.token_ids or []))
            inputs = await off_loop_if_large(size, adapter.tokenize, request)
            tokens = sum(map(len, inputs))
            vectors = await slot.runner.submit_all(inputs)
            metrics.PROMPT_TOKENS.labels(slot.entry.id).inc(tokens)
            metrics.EMBEDDED_INPUTS.labels(slot.entry.id).inc(count)
            if (caller := current_caller.get()) is not None:
                caller.charge_tokens(tokens)
            matrix = truncate_dimensions(np.stack(vectors), request.dimensions)
            return EmbeddingResult(model=model, vectors=matrix, prompt_tokens=tokens,
                                   served_by=slot.entry.id)


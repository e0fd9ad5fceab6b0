"""Text embeddings on sentence-transformers checkpoints."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from engine.contracts.base import AdapterOptions
from engine.contracts.embeddings import EmbeddingOptions, EmbeddingRequest
from engine.core.errors import ContextLengthExceededError, InvalidRequestError
from engine.core.sources import resolve_source
from models.base import ModelAdapter, thread_safe_encoder


def sentence_transformers_model(adapter: ModelAdapter, cls: type[Any],
                                errors: tuple[type[Exception], ...]) -> Any:
    """A sentence-transformers model (`SentenceTransformer`, `CrossEncoder`) of the entry, on
    the load's device and in its dtype, safetensors only, in eval mode."""
    context = adapter.context
    model = adapter.pretrained(
        cls, resolve_source(adapter.entry), errors, device=context.device,
        model_kwargs={"dtype": context.dtype, "use_safetensors": True},
    )
    model.eval()
    return model


class SentenceTransformerEmbeddings(ModelAdapter):
    """An `Embedder`. Vectors are L2-normalized (as OpenAI's are); `dimensions` truncates and
    re-normalizes. None of the packaged models is Matryoshka-trained, so short vectors rank
    less well."""

    options_model: ClassVar[type[AdapterOptions]] = EmbeddingOptions
    model: SentenceTransformer

    def load(self) -> None:
        self.model = sentence_transformers_model(self, SentenceTransformer, (OSError,))
        self.tokenizer: Any = self.model.tokenizer
        self._encoder = thread_safe_encoder(self.tokenizer)
        self.dimensions = int(self.model.get_embedding_dimension() or 0)
        self.max_tokens = int(self.model.max_seq_length)
        self._special_prefix, self._special_suffix = self._special_tokens_around_text()
        self._pad_id = int(self.tokenizer.pad_token_id or 0)

    def _special_tokens_around_text(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer wraps any text in ([CLS] … [SEP] for BERT), found
        by encoding one word with and without them, so raw token-id inputs get the same."""
        bare = self._encoder.encode("a", add_special_tokens=False).ids
        wrapped = self._encoder.encode("a", add_special_tokens=True).ids
        for start in range(len(wrapped) - len(bare) + 1):
            if wrapped[start:start + len(bare)] == bare:
                return wrapped[:start], wrapped[start + len(bare):]
        return [], []

    def warmup(self) -> None:
        self.batch(self.tokenize(EmbeddingRequest(model=self.entry.id, texts=["warm up"])))

    def tokenize(self, request: EmbeddingRequest) -> list[list[int]]:
        """Token ids per input, special tokens included, checked against the model's limits
        (over it is a 400: no silent truncation). Texts and token-id inputs share one path
        from here on, and the compute thread never tokenizes."""
        vocab = self._encoder.get_vocab_size()
        if request.texts is not None:
            # One `encode` per text: `encode_batch` fans out to a rayon pool, which costs more
            # than it saves for request-sized inputs and fights the compute thread for cores.
            inputs = [self._encoder.encode(text).ids for text in request.texts]
        else:
            inputs = []
            for index, ids in enumerate(request.token_ids or []):
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise InvalidRequestError(
                        f"input[{index}] holds token id {bad[0]}, outside 0..{vocab - 1}",
                        param="input",
                    )
                inputs.append([*self._special_prefix, *ids, *self._special_suffix])
        for index, ids in enumerate(inputs):
            if len(ids) > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input[{index}] has {len(ids)} tokens; {self.entry.id!r} accepts at most "
                    f"{self.max_tokens} tokens per input.",
                    param="input",
                )
        return inputs

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and not 1 <= dimensions <= self.dimensions:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {self.dimensions} for {self.entry.id!r}; "
                f"got {dimensions}",
                param="dimensions",
            )

    @staticmethod
    def size_of(ids: list[int]) -> int:
        """Sort key for batching: inputs of similar length pad little together."""
        return len(ids)

    @torch.no_grad()
    def batch(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """Unit vectors at full dimension, one per tokenized input, in order."""
        device = self.model.device
        width = max(len(ids) for ids in inputs)
        input_ids = torch.full((len(inputs), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        features = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        output = self.model(features)["sentence_embedding"].float()
        return list(torch.nn.functional.normalize(output, dim=-1).cpu().numpy())


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalize (OpenAI's `dimensions`)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    vectors = vectors[:, :dimensions]
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

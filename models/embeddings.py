"""Text embeddings on sentence-transformers checkpoints."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from engine.errors import ContextLengthExceededError, InvalidRequestError, ModelLoadError
from engine.sources import resolve_source
from engine.types import EmbeddingRequest
from models.base import ModelAdapter, thread_safe_encoder


class SentenceTransformerEmbeddings(ModelAdapter):
    """Vectors are L2-normalized (as OpenAI's are); `dimensions` truncates and re-normalizes.
    None of the packaged models is Matryoshka-trained, so short vectors rank less well."""

    model: SentenceTransformer

    def load(self) -> None:
        path = resolve_source(self.entry)
        try:
            self.model = SentenceTransformer(
                path,
                device=self.context.device,
                trust_remote_code=self.entry.trust_remote_code,
                model_kwargs={"dtype": self.context.dtype},
                local_files_only=True,
            )
        except OSError as exc:
            raise ModelLoadError(f"cannot load {self.entry.id!r} from {path}: {exc}") from exc
        self.model.eval()
        self.tokenizer: Any = self.model.tokenizer
        self._encoder = thread_safe_encoder(self.tokenizer)
        self.dimensions = int(self.model.get_embedding_dimension() or 0)
        self.max_tokens = int(self.model.max_seq_length)
        self._special_prefix, self._special_suffix = self._special_tokens_around_text()

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
        self.batch(["warm up"])

    def count_tokens(self, request: EmbeddingRequest) -> list[int]:
        """Tokens per input, special tokens included; over the model's limit is a 400 (no
        silent truncation)."""
        if request.texts is not None:
            # One `encode` per text: `encode_batch` fans out to a rayon pool, which costs more
            # than it saves for request-sized inputs and fights the compute thread for cores.
            counts = [len(self._encoder.encode(text).ids) for text in request.texts]
        else:
            counts = [len(self._with_special_tokens(ids)) for ids in request.token_ids or []]
        for index, count in enumerate(counts):
            if count > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input[{index}] has {count} tokens; {self.entry.id!r} accepts at most "
                    f"{self.max_tokens} tokens per input.",
                    param="input",
                )
        return counts

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and not 1 <= dimensions <= self.dimensions:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {self.dimensions} for {self.entry.id!r}; "
                f"got {dimensions}",
                param="dimensions",
            )

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        return [*self._special_prefix, *ids, *self._special_suffix]

    @staticmethod
    def size_of(payload: str | list[int]) -> int:
        """Sort key for batching: characters or token ids, either tracks the padded length."""
        return len(payload)

    @torch.no_grad()
    def batch(self, payloads: list[str | list[int]]) -> list[np.ndarray]:
        """Unit vectors at full dimension, one per payload (text or token ids), in order."""
        vectors: list[np.ndarray] = [np.empty(0)] * len(payloads)
        texts = [(i, p) for i, p in enumerate(payloads) if isinstance(p, str)]
        id_lists = [(i, p) for i, p in enumerate(payloads) if not isinstance(p, str)]
        if texts:
            encoded = self.model.encode(
                [text for _, text in texts], batch_size=len(texts),
                convert_to_numpy=True, normalize_embeddings=True,
            )
            for (i, _), vector in zip(texts, encoded, strict=True):
                vectors[i] = np.asarray(vector, dtype=np.float32)
        if id_lists:
            encoded = self._embed_token_ids([ids for _, ids in id_lists])
            for (i, _), vector in zip(id_lists, encoded, strict=True):
                vectors[i] = vector
        return vectors

    def _embed_token_ids(self, batch: list[list[int]]) -> np.ndarray:
        vocab = self.tokenizer.vocab_size
        for index, ids in enumerate(batch):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"input[{index}] holds token id {bad[0]}, outside 0..{vocab - 1}", param="input"
                )
        features = self.tokenizer.pad(
            {"input_ids": [self._with_special_tokens(ids) for ids in batch]}, return_tensors="pt"
        )
        features = {k: v.to(self.model.device) for k, v in features.items()}
        output = self.model(features)["sentence_embedding"].float()
        output = torch.nn.functional.normalize(output, dim=-1)
        return output.cpu().numpy()


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalize (OpenAI's `dimensions`)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    vectors = vectors[:, :dimensions]
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

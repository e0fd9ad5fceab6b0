"""Text embeddings on sentence-transformers checkpoints."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from engine.contracts.base import AdapterOptions
from engine.contracts.embeddings import EmbeddingOptions, EmbeddingRequest, EncoderOptions
from engine.core.errors import ContextLengthExceededError, InvalidRequestError
from engine.core.sources import resolve_source, source_fingerprint
from models.base import ModelAdapter, thread_safe_encoder
from models.encoders import PROBE_TEXTS, Encoder, choose_encoder

log = logging.getLogger(__name__)


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


def pooled(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Sentence vectors from token states, as sentence-transformers' Pooling does, then L2
    normalized."""
    if mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "max":
        vectors = np.where(mask[..., None] > 0, hidden, -np.inf).max(axis=1)
    else:  # mean
        weights = mask[..., None].astype(np.float32)
        vectors = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


POOLING_OFF_TORCH = ("mean", "cls", "max")


class SentenceTransformerEmbeddings(ModelAdapter):
    """An `Embedder`. Vectors are L2-normalized (as OpenAI's are); `dimensions` truncates and
    re-normalizes. None of the packaged models is Matryoshka-trained, so short vectors rank
    less well. The encoder runs where the entry's `backend` says (models/encoders.py)."""

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
        self._choose_backend()

    def _choose_backend(self) -> None:
        options = self.options
        assert isinstance(options, EncoderOptions)  # embedding and bi-encoder rerank options
        modules = [type(module).__name__ for module in self.model]
        pooling = str(getattr(self.model[1], "pooling_mode", "")) if len(modules) > 1 else ""
        requested = options.backend
        # Off torch, ember runs the transformer and pools itself: only that layout.
        plain = modules[:2] == ["Transformer", "Pooling"] and set(modules[2:]) <= {"Normalize"}
        if requested != "torch" and not (plain and pooling in POOLING_OFF_TORCH):
            log.warning("%s: served on fp32 torch: its modules (%s, %s pooling) run on torch "
                        "only", self.entry.id, ", ".join(modules), pooling or "no")
            requested = "torch"
        self._pooling = pooling
        probe = [self._encoder.encode(text).ids[: self.max_tokens] for text in PROBE_TEXTS]
        folder = (self.context.models_dir / "onnx"
                  / f"{self.entry.id}-{source_fingerprint(resolve_source(self.entry))}")
        choice = choose_encoder(
            entry_id=self.entry.id, requested=requested, min_cosine=options.min_cosine,
            # ONNX Runtime takes as many intra-op threads as torch (the torch_threads setting).
            device=self.context.device, threads=torch.get_num_threads(), cache=folder,
            module=lambda: self.model[0].auto_model,
            embed=lambda encoder: np.stack(self._forward(probe, encoder)),
        )
        self.backend_name, self.backend_note = choice.backend, choice.note
        self._runtime = choice.encoder
        if choice.encoder is not None:  # the torch weights are no longer used
            self._weights_bytes = self._encoder_bytes(choice.backend, folder)
            self.model = None
            gc.collect()

    @property
    def served_dtype(self) -> str | None:
        """The precision the weights run in, for /v1/models (None: the load's dtype)."""
        return {"bf16": "bfloat16", "onnx": "float32", "onnx-int8": "int8"}.get(
            self.backend_name)

    def _encoder_bytes(self, backend: str, folder: Path) -> int:
        if backend == "bf16":
            return super().memory_bytes() // 2
        name = "model-int8.onnx" if backend == "onnx-int8" else "model.onnx"
        return (folder / name).stat().st_size

    def memory_bytes(self) -> int:
        return getattr(self, "_weights_bytes", None) or super().memory_bytes()

    def unload(self) -> None:
        self._runtime = None  # an ONNX Runtime session holds its weights
        super().unload()

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

    def batch(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """Unit vectors at full dimension, one per tokenized input, in order. Inputs run in
        groups of similar length: an encoder's cost grows with the batch's longest input, and
        a batch of concurrent requests mixes lengths (grouping gave +25% on MiniLM)."""
        vectors: list[np.ndarray] = [np.empty(0, np.float32)] * len(inputs)
        for group in length_groups(inputs):
            for index, vector in zip(group, self._forward([inputs[i] for i in group],
                                                          self._runtime), strict=True):
                vectors[index] = vector
        return vectors

    @torch.no_grad()
    def _forward(self, inputs: list[list[int]], runtime: Encoder | None) -> list[np.ndarray]:
        width = max(len(ids) for ids in inputs)
        input_ids = np.full((len(inputs), width), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, ids in enumerate(inputs):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        if runtime is not None:
            return list(pooled(runtime(input_ids, attention_mask), attention_mask,
                               self._pooling))
        device = self.model.device
        features = {"input_ids": torch.from_numpy(input_ids).to(device),
                    "attention_mask": torch.from_numpy(attention_mask).to(device)}
        output = self.model(features)["sentence_embedding"].float()
        return list(torch.nn.functional.normalize(output, dim=-1).cpu().numpy())


def length_groups(inputs: list[list[int]], spread: float = 1.3,
                  smallest: int = 4) -> list[list[int]]:
    """Indices of `inputs`, shortest first, cut into groups whose longest input is at most
    `spread` times their shortest (a group holds at least `smallest`, so one odd length does
    not cost a call of its own)."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    groups: list[list[int]] = []
    for index in order:
        if (groups and (len(groups[-1]) < smallest
                        or len(inputs[index]) <= spread * len(inputs[groups[-1][0]]))):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalize (OpenAI's `dimensions`)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    vectors = vectors[:, :dimensions]
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

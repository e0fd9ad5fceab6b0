"""Rerankers: how relevant each document is to a query.

Both adapters implement one small contract, which engine/ranking/service.py drives:
`prepare(query, documents)` (on the request path: tokenize, check limits) → batch items;
`size_of(item)`; `batch(items)` (on the compute thread); `relevance(outputs)` → one score per
document, in order.

- `CrossEncoderRerank`: a sentence-transformers `CrossEncoder` (e.g. BAAI/bge-reranker-base)
  reads query and document together; one batch item per (query, document) pair; the score is
  the model's own activation of its single logit (sigmoid: 0..1).
- `BiEncoderRerank`: an embedding model; the score is the cosine of the query's and the
  document's embeddings (-1..1). Each text is embedded once, so its items are the query and
  the documents rather than pairs (a pair item would embed the query again per document).
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch
from sentence_transformers import CrossEncoder

from engine.contracts.base import AdapterOptions
from engine.contracts.embeddings import EncoderOptions
from engine.contracts.ranking import RerankOptions
from engine.core.errors import ContextLengthExceededError, ModelLoadError
from engine.core.sources import resolve_source, source_fingerprint
from models.base import ModelAdapter
from models.embeddings import SentenceTransformerEmbeddings, sentence_transformers_model
from models.encoders import PROBE_TEXTS, Encoder, choose_encoder
from models.sequence import Encoded, EncoderInputs, token_limit


def too_long(param: str, tokens: int, limit: int, model_id: str, pair: bool = False) -> NoReturn:
    """No silent truncation: an input over the model's limit is a 400 naming it."""
    subject = f"the query and {param} together have" if pair else f"{param} has"
    unit = "query-document pair" if pair else "input"
    raise ContextLengthExceededError(
        f"{subject} {tokens} tokens; {model_id!r} accepts at most {limit} tokens per {unit}.",
        param=param,
    )


class CrossEncoderRerank(ModelAdapter):
    """A `Reranker`: sequence-classification cross-encoders with one relevance logit
    (num_labels=1)."""

    options_model: ClassVar[type[AdapterOptions]] = RerankOptions
    model: CrossEncoder

    def load(self) -> None:
        self.model = sentence_transformers_model(self, CrossEncoder, (OSError, ValueError))
        head = self.model.model
        if head is None or not type(head).__name__.endswith("ForSequenceClassification"):
            raise ModelLoadError(
                f"{self.entry.id!r} is not a sequence-classification cross-encoder "
                f"({type(head).__name__}); only those are served for rerank"
            )
        if self.model.num_labels != 1:
            raise ModelLoadError(
                f"{self.entry.id!r} has {self.model.num_labels} output labels; a reranker needs "
                "one relevance score (num_labels=1)"
            )
        tokenizer = self.model.tokenizer
        self._inputs = EncoderInputs(tokenizer)
        self.max_tokens = token_limit(tokenizer, head.config, self.entry.limits.context_length)
        self._activation = self.model.activation_fn
        self._choose_backend(head)

    def _choose_backend(self, head: torch.nn.Module) -> None:
        """Where the classifier runs (models/encoders.py), checked on the probe texts as
        neighbouring pairs: the cosine of all pairs' logits against fp32 torch."""
        options = self.options
        assert isinstance(options, EncoderOptions)
        probe = [self._inputs.encode(query, document)
                 for query, document in itertools.pairwise(PROBE_TEXTS)]
        probe = [item for item in probe if len(item) <= self.max_tokens]
        folder = (self.context.models_dir / "onnx"
                  / f"{self.entry.id}-{source_fingerprint(resolve_source(self.entry))}")
        choice = choose_encoder(
            entry_id=self.entry.id, requested=options.backend, min_cosine=options.min_cosine,
            device=self.context.device, threads=torch.get_num_threads(), cache=folder,
            module=lambda: head, embed=lambda encoder: self._logits(probe, encoder),
            pairs=True,
        )
        self.backend_name, self.backend_note = choice.backend, choice.note
        self._runtime = choice.encoder

    def warmup(self) -> None:
        self.batch(self.prepare("warm up", ["warm up"]))

    def prepare(self, query: str, documents: list[str]) -> list[Encoded]:
        alone = self._inputs.encode(query)
        if len(alone) > self.max_tokens:
            too_long("query", len(alone), self.max_tokens, self.entry.id)
        pairs = []
        for index, document in enumerate(documents):
            pair = self._inputs.encode(query, document)
            if len(pair) > self.max_tokens:
                too_long(f"documents[{index}]", len(pair), self.max_tokens, self.entry.id,
                         pair=True)
            pairs.append(pair)
        return pairs

    @staticmethod
    def size_of(item: Encoded) -> int:
        return len(item)

    @torch.inference_mode()
    def _logits(self, pairs: list[Encoded], runtime: Encoder | None) -> np.ndarray:
        if runtime is None:
            features = self._inputs.collate(pairs, self.model.device)
            logits: np.ndarray = self.model(features)["scores"].float().cpu().numpy()
            return logits.reshape(len(pairs), -1)
        features = self._inputs.collate(pairs, "cpu")
        arrays = {name: tensor.numpy() for name, tensor in features.items()}
        return runtime(arrays["input_ids"], arrays["attention_mask"],
                       arrays.get("token_type_ids")).reshape(len(pairs), -1)

    @torch.inference_mode()
    def batch(self, pairs: list[Encoded]) -> list[float]:
        logits = torch.from_numpy(self._logits(pairs, self._runtime))
        scores = self._activation(logits) if self._activation else logits
        return [float(score) for score in scores.reshape(len(pairs))]

    def unload(self) -> None:
        self._runtime = None
        super().unload()

    @staticmethod
    def relevance(outputs: list[float]) -> list[float]:
        return outputs


class BiEncoderRerank(SentenceTransformerEmbeddings):
    """A `Reranker` on an embedding model: cosine of query and document vectors. Weaker than
    a cross-encoder (the texts never see each other), but any embedding checkpoint serves."""

    options_model: ClassVar[type[AdapterOptions]] = RerankOptions

    def warmup(self) -> None:
        self.batch(self.prepare("warm up", ["warm up"]))

    def prepare(self, query: str, documents: list[str]) -> list[list[int]]:
        items = [self._encoder.encode(text).ids for text in [query, *documents]]
        for index, ids in enumerate(items):
            if len(ids) > self.max_tokens:
                param = "query" if index == 0 else f"documents[{index - 1}]"
                too_long(param, len(ids), self.max_tokens, self.entry.id)
        return items

    @staticmethod
    def relevance(outputs: list[Any]) -> list[float]:
        query, documents = outputs[0], np.stack(outputs[1:])
        return [float(score) for score in documents @ query]  # unit vectors: cosine

"""Rerank and moderation: request and result types, and the contracts their models implement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from engine.contracts.base import AdapterOptions, BatchBackend
from engine.contracts.embeddings import EncoderOptions

# OpenAI's moderation categories. Every result carries all of them; a category the model does
# not cover scores 0.0 and is never flagged.
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)


@dataclass(frozen=True)
class RerankRequest:
    """Order `documents` by relevance to `query`; `top_n` keeps the best n (None: all);
    `model` None means the default reranker."""

    model: str | None
    query: str
    documents: list[str]
    top_n: int | None = None


@dataclass(frozen=True)
class RankedDocument:
    index: int  # the document's position in the request
    relevance_score: float


@dataclass
class RerankResult:
    model: str  # the name the caller sent, or the default model's id
    results: list[RankedDocument]  # most relevant first
    total_tokens: int
    served_by: str = ""  # the id of the registry entry that ran it


@dataclass(frozen=True)
class ModerationRequest:
    """Classify each text on its own; `model` None means the default moderation model."""

    model: str | None
    texts: list[str]


@dataclass(frozen=True)
class ModerationVerdict:
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


@dataclass
class ModerationResult:
    model: str  # the name the caller sent, or the default model's id
    results: list[ModerationVerdict]
    served_by: str = ""  # the id of the registry entry that ran it


@runtime_checkable
class Reranker(BatchBackend, Protocol):
    """A query against documents: `prepare` encodes the batch items for one request on the
    request path (ContextLengthExceededError naming the input over the model's limit);
    `relevance` turns those items' batched outputs, in order, into one score per document."""

    def prepare(self, query: str, documents: list[str]) -> list[Any]: ...

    def relevance(self, outputs: list[Any]) -> list[float]:
        """One score per document, in the request's order (higher: more relevant)."""
        ...


@runtime_checkable
class Moderator(BatchBackend, Protocol):
    """Texts to scores per OpenAI category it covers; `thresholds` flag them."""

    thresholds: dict[str, float]  # every category of MODERATION_CATEGORIES

    def prepare(self, texts: list[str]) -> list[Any]:
        """One item per text (ContextLengthExceededError for one over the model's limit)."""
        ...

    def batch(self, items: list[Any]) -> Sequence[dict[str, float]]:
        """{category: score in [0, 1]} per item, for the categories the model covers."""
        ...


# -- the adapters' registry options -----------------------------------------------------------


class RerankOptions(EncoderOptions):
    """Rerankers (models.rerank). A bi-encoder runs where `backend` says; a cross-encoder
    runs on torch."""


class ModerationOptions(AdapterOptions):
    """Moderation classifiers (models.moderation). The values are checked against the model's
    labels and MODERATION_CATEGORIES when it loads."""

    # Classifier label -> an OpenAI category, or several (a category several labels map onto
    # takes the highest score); unmapped labels are ignored. None: the adapter's default.
    label_map: dict[str, str | list[str]] | None = None
    # Category -> score at or above which it is flagged (0.5 where not given).
    thresholds: dict[str, float] = Field(default_factory=dict)


class TransformersModerationOptions(ModerationOptions):
    """models.moderation:TransformersModeration: `activation` None is sigmoid for multi-label
    heads, softmax for single-label ones."""

    activation: Literal["sigmoid", "softmax"] | None = None

"""Rerank and moderation: request and result types, and the contracts their models implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from engine.contracts.base import BatchBackend

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


@runtime_checkable
class Reranker(BatchBackend, Protocol):
    """A query against documents: `prepare` encodes one item per document on the request
    path; `relevance` turns the batched outputs into scores in [0, 1]."""

    def prepare(self, query: str, documents: list[str]) -> list[Any]: ...

    def relevance(self, outputs: list[Any]) -> list[float]: ...


@runtime_checkable
class Moderator(BatchBackend, Protocol):
    """Texts to scores per OpenAI category it covers; `thresholds` flag them."""

    thresholds: dict[str, float]

    def prepare(self, texts: list[str]) -> list[Any]: ...

"""Rerank and moderation: the one implementation every dialect calls. Tokenizing runs on a
worker thread; models run on the compute thread through each model's `Batcher`, one item per
document (pair) or text, so items of concurrent requests share batches, grouped by length."""

from __future__ import annotations

import asyncio

from engine.contracts.ranking import (
    MODERATION_CATEGORIES,
    ModerationRequest,
    ModerationResult,
    ModerationVerdict,
    Moderator,
    RankedDocument,
    Reranker,
    RerankRequest,
    RerankResult,
)
from engine.core import metrics
from engine.core.batcher import Batcher
from engine.core.errors import InvalidRequestError
from engine.core.limits import check_count
from engine.core.manager import ModelManager
from engine.core.settings import Settings


class RankingService:
    def __init__(self, settings: Settings, manager: ModelManager):
        self.settings = settings
        self.manager = manager

    async def rerank(self, request: RerankRequest) -> RerankResult:
        name = self.manager.registry.model_or_default(request.model, "rerank")
        if not request.query:
            raise InvalidRequestError("query must not be empty", param="query")
        count = len(request.documents)
        check_count(count, self.settings.max_rerank_documents, "documents", "max_rerank_documents")
        for index, document in enumerate(request.documents):
            if not document:
                raise InvalidRequestError(f"documents[{index}] is empty",
                                          param=f"documents[{index}]")
        if request.top_n is not None and request.top_n < 1:
            raise InvalidRequestError(f"top_n must be at least 1; got {request.top_n}",
                                      param="top_n")
        async with self.manager.lease_as(name, "rerank", Reranker, Batcher) as slot:
            adapter = slot.backend
            items = await asyncio.to_thread(adapter.prepare, request.query, request.documents)
            scores: list[float] = adapter.relevance(await slot.runner.submit_all(items))
            tokens = sum(map(adapter.size_of, items))
        metrics.PROMPT_TOKENS.labels(slot.entry.id).inc(tokens)
        # Ties keep the documents' order, so equal scores rank the same way every time.
        order = sorted(range(count), key=lambda i: (-scores[i], i))[: request.top_n or count]
        ranked = [RankedDocument(index=i, relevance_score=scores[i]) for i in order]
        return RerankResult(model=name, results=ranked, total_tokens=tokens,
                            served_by=slot.entry.id)

    async def moderate(self, request: ModerationRequest) -> ModerationResult:
        name = self.manager.registry.model_or_default(request.model, "moderation")
        check_count(len(request.texts), self.settings.max_embedding_inputs, "input",
                     "max_embedding_inputs")
        for index, text in enumerate(request.texts):
            if not text:
                raise InvalidRequestError(f"input[{index}] is an empty string",
                                          param=f"input[{index}]")
        async with self.manager.lease_as(name, "moderation", Moderator, Batcher) as slot:
            adapter = slot.backend
            items = await asyncio.to_thread(adapter.prepare, request.texts)
            scores = await slot.runner.submit_all(items)
            thresholds = adapter.thresholds
        return ModerationResult(model=name, results=[verdict(s, thresholds) for s in scores],
                                served_by=slot.entry.id)


def verdict(scores: dict[str, float], thresholds: dict[str, float]) -> ModerationVerdict:
    """Every OpenAI category: the model's score where it covers it, else 0.0 and not flagged."""
    category_scores = {c: scores.get(c, 0.0) for c in MODERATION_CATEGORIES}
    categories = {c: c in scores and scores[c] >= thresholds[c] for c in MODERATION_CATEGORIES}
    return ModerationVerdict(flagged=any(categories.values()), categories=categories,
                             category_scores=category_scores)



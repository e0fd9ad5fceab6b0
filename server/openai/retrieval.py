"""Rerank (`/v1/rerank`, Cohere/Jina-style as vLLM and Infinity serve it) and moderation
(`/v1/moderations`, OpenAI's): wire schemas, translation to engine types, thin routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from engine.contracts.ranking import (
    MODERATION_CATEGORIES,
    ModerationRequest,
    ModerationResult,
    RerankRequest,
    RerankResult,
)
from engine.core.errors import InvalidRequestError, UnsupportedFeatureError
from server.cancellation import cancel_on_disconnect
from server.deps import EngineDep, require_api_key
from server.openai.schemas import WireModel
from server.openai.translate import new_id
from server.openapi import AT_LEAST_ONE, NonEmpty, Published
from server.responses import JSON

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


# `{"text": ...}`, other keys ignored (document_texts); the engine refuses an empty text.
TextObject = Annotated[dict[str, Any], Published(
    required=["text"], properties={"text": {"type": "string", "minLength": 1}})]
# OpenAI's multimodal form; the classifiers read text parts only (image parts are a 400).
TextPart = Annotated[dict[str, Any], Published(
    required=["type", "text"],
    properties={"type": {"const": "text"}, "text": {"type": "string", "minLength": 1}})]


class RerankRequestIn(WireModel):
    model: str | None = Field(None, min_length=1)
    query: NonEmpty
    documents: Annotated[list[NonEmpty | TextObject], AT_LEAST_ONE]
    top_n: Annotated[int, Published(minimum=1)] | None = None  # the engine checks, every dialect
    return_documents: bool = False


class ModerationRequestIn(WireModel):
    model: str | None = Field(None, min_length=1)
    input: NonEmpty | Annotated[list[NonEmpty], AT_LEAST_ONE] | Annotated[
        list[TextPart], AT_LEAST_ONE]


# -- translation ---------------------------------------------------------------------------------


def document_texts(documents: list[str | dict[str, Any]]) -> list[str]:
    """Documents as strings or `{"text": ...}` objects (other keys are ignored)."""
    texts = []
    for index, document in enumerate(documents):
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"documents[{index}] must be a string or an object with a string `text`",
                param=f"documents[{index}].text",
            )
        texts.append(text)
    return texts


def rerank_json(
    result: RerankResult, documents: list[str], return_documents: bool
) -> dict[str, Any]:
    results = []
    for ranked in result.results:
        item: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.relevance_score}
        if return_documents:
            item["document"] = {"text": documents[ranked.index]}
        results.append(item)
    return {"id": new_id("rerank"), "model": result.model, "results": results,
            "usage": {"total_tokens": result.total_tokens}}


def moderation_texts(value: str | list[str] | list[dict[str, Any]]) -> list[str]:
    """A string or a list of strings: one result each. A list of content parts (OpenAI's
    multimodal form) is one input: its text parts joined; image parts are refused."""
    if isinstance(value, str):
        return [value]
    strings = [item for item in value if isinstance(item, str)]
    if len(strings) == len(value):
        return strings
    texts = []
    for index, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            raise UnsupportedFeatureError(
                "image inputs cannot be moderated by the text classifiers served here; send "
                "text parts", param=f"input[{index}]",
            )
        else:
            raise InvalidRequestError(
                f"Unsupported content part {kind!r}; expected 'text' with a string `text`",
                param=f"input[{index}]",
            )
    return ["\n".join(texts)]


def moderation_json(result: ModerationResult) -> dict[str, Any]:
    results = [{
        "flagged": verdict.flagged,
        "categories": verdict.categories,
        "category_scores": verdict.category_scores,
        "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
    } for verdict in result.results]
    return {"id": new_id("modr"), "model": result.model, "results": results}


# -- routes --------------------------------------------------------------------------------------


@router.post("/rerank")
@cancel_on_disconnect
async def rerank(body: RerankRequestIn, request: Request, engine: EngineDep) -> Any:
    body.note_unknown(request.url.path)
    documents = document_texts(body.documents)
    result = await engine.ranking.rerank(RerankRequest(
        model=body.model, query=body.query, documents=documents, top_n=body.top_n))
    return JSON(rerank_json(result, documents, body.return_documents))


@router.post("/moderations")
@cancel_on_disconnect
async def moderations(body: ModerationRequestIn, request: Request, engine: EngineDep) -> Any:
    body.note_unknown(request.url.path)
    result = await engine.ranking.moderate(
        ModerationRequest(model=body.model, texts=moderation_texts(body.input)))
    return JSON(moderation_json(result))

"""QuantCDN `/api/v3/organizations/{organisation}/ai/*` routes (seed 002): parse, call the
engine, serialize."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from engine.contracts.chat import (
    ChoiceFinished,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from engine.contracts.embeddings import EmbeddingRequest
from engine.contracts.images import ImageRequest
from engine.core.errors import InvalidRequestError, UnsupportedFeatureError
from engine.generation.tool_calls import join_deltas
from server.cancellation import cancel_on_disconnect
from server.deps import EngineDep
from server.gateway import renamed_params
from server.quantcdn import translate
from server.quantcdn.auth import require_organisation_key
from server.quantcdn.errors import quant_envelope
from server.quantcdn.schemas import ChatIn, EmbeddingsIn, ImageGenerationIn
from server.responses import JSON
from server.streaming import prime, sse_response

router = APIRouter(prefix="/api/v3/organizations/{organisation}/ai",
                   dependencies=[Depends(require_organisation_key)])


@router.post("/chat")
@cancel_on_disconnect
async def chat(body: ChatIn, raw_request: Request, engine: EngineDep) -> Any:
    """Buffered: the whole reply in one response (`stream` in the body changes nothing, as
    the gateway documents)."""
    request = translate.chat_request(body)
    with renamed_params(translate.CHAT_PARAMS):
        result = await engine.generation.generate(request)
    return JSON(translate.chat_response(body, request.request_id, result))


@router.post("/chat/stream")
@cancel_on_disconnect
async def chat_stream(body: ChatIn, raw_request: Request, engine: EngineDep) -> Any:
    """SSE: `{requestId, model, delta}` per piece of text, then `{requestId, model,
    finishReason, usage}`, then `[DONE]`."""
    request = translate.chat_request(body)
    with renamed_params(translate.CHAT_PARAMS):
        events = await prime(engine.generation.stream(request))
    return sse_response(_chat_frames(body, request, events), quant_envelope)


async def _chat_frames(body: ChatIn, request: GenerationRequest,
                       events: AsyncIterator[GenerationEvent]) -> AsyncIterator[dict[str, Any]]:
    head = {"requestId": request.request_id, "model": body.model_id}
    finish = None
    calls: list[ToolCallDelta] = []
    async for event in events:
        if isinstance(event, TextDelta):
            yield {**head, "delta": event.text}
        elif isinstance(event, ToolCallDelta):
            calls.append(event)  # a call goes out whole: toolUse carries parsed input
        elif isinstance(event, ChoiceFinished):
            finish = translate.finish_reason(event.finish_reason)
        elif isinstance(event, Usage):
            tool_use = translate.tool_use_json(join_deltas(calls))
            yield {**head, "finishReason": finish, "usage": translate.usage_json(event),
                   **({"toolUse": tool_use} if tool_use is not None else {})}


@router.post("/embeddings")
@cancel_on_disconnect
async def embeddings(body: EmbeddingsIn, raw_request: Request, engine: EngineDep) -> Any:
    """`dimensions` at or above the model's own size gives the model's own vectors (the
    client sends 1024 unless told otherwise); below it, they are truncated and re-normalized.
    `dimension` reports the size returned."""
    texts = translate.embedding_texts(body.input, body.normalize)
    with renamed_params({"model": "modelId"}):
        result = await engine.embeddings.embed(EmbeddingRequest(
            model=body.model_id, texts=texts, dimensions=body.dimensions,
            dimensions_at_most=True))
    return JSON(translate.embeddings_response(body.model_id, isinstance(body.input, str),
                                              result.vectors, result.prompt_tokens))


@router.post("/image-generation")
@cancel_on_disconnect
async def image_generation(
    body: ImageGenerationIn, raw_request: Request, engine: EngineDep
) -> Any:
    with renamed_params(translate.image_params(body.task_type)):
        job = await _image_request(body)
        result = await engine.images.generate(job)
    images = [base64.b64encode(picture.data).decode() for picture in result.images]
    return JSON({"images": images, "maskImage": None, "error": None})


async def _image_request(body: ImageGenerationIn) -> ImageRequest:
    task = body.task_type
    if task == "TEXT_IMAGE":
        return translate.text_to_image(body)
    if task == "IMAGE_VARIATION":
        return translate.image_variation(body)
    if task == "INPAINTING":
        params = body.in_painting_params
        if params is None:
            raise InvalidRequestError("Missing required parameter: 'inPaintingParams'.",
                                      param="inPaintingParams",
                                      code="missing_required_parameter")
        if params.mask_prompt is not None:
            raise UnsupportedFeatureError(
                "maskPrompt needs a segmentation model, which this server does not have; "
                "send a maskImage (black where to repaint).", param="inPaintingParams.maskPrompt"
            )
        mask = translate.b64_bytes(params.mask_image, "inPaintingParams.maskImage")
        return translate.inpainting(body, await asyncio.to_thread(
            translate.black_mask_to_alpha, mask))
    raise UnsupportedFeatureError(
        f"taskType {task} is not supported by this server: ember has no "
        f"{translate.UNSUPPORTED_TASKS[task]}. Supported: TEXT_IMAGE, IMAGE_VARIATION, "
        "INPAINTING.", param="taskType",
    )

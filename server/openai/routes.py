"""OpenAI `/v1/*` routes: parse, call the engine, serialize. Nothing else."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from engine.contracts.chat import ChoiceFinished, GenerationEvent, TextDelta, ToolCallDelta, Usage
from engine.contracts.speech import TranscriptionInfo, TranscriptSegment
from engine.core.audio_codec import MEDIA_TYPES
from engine.core.manager import ModelStatus
from engine.service import Engine
from engine.speech.service import encoded_speech
from server.cancellation import cancel_on_disconnect, unless_disconnected
from server.deps import EngineDep, require_api_key
from server.errors import openai_envelope
from server.forms import multipart_body
from server.openai import audio, images, translate
from server.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequestIn,
    LoadRequest,
)
from server.responses import JSON
from server.streaming import prime, sse_response
from server.tools_wire import tool_call_delta

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post("/chat/completions")
@cancel_on_disconnect
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep
) -> Any:
    body.note_unknown(request.url.path)
    gen = translate.chat_request(body)
    if not body.stream:
        result = await engine.generation.generate(gen)
        return JSON(translate.chat_response(body.model, gen.request_id, result))
    events = await prime(engine.generation.stream(gen))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    frames = _chat_frames(body.model, gen.request_id, body.n, include_usage, events)
    return sse_response(frames, openai_envelope)


async def _chat_frames(
    name: str, request_id: str, n: int, include_usage: bool,
    events: AsyncIterator[GenerationEvent],
) -> AsyncIterator[dict[str, Any]]:
    head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": name}
    extra = {"usage": None} if include_usage else {}

    def frame(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    for index in range(n):
        yield frame(index, {"role": "assistant", "content": ""})
    async for event in events:
        if isinstance(event, TextDelta):
            yield frame(event.index, {"content": event.text})
        elif isinstance(event, ToolCallDelta):
            yield frame(event.index, tool_call_delta(event))
        elif isinstance(event, ChoiceFinished):
            yield frame(event.index, {}, event.finish_reason)
        elif include_usage and isinstance(event, Usage):
            yield {**head, "choices": [], "usage": translate.usage_json(event)}


@router.post("/completions")
@cancel_on_disconnect
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep
) -> Any:
    body.note_unknown(request.url.path)
    gens = translate.completion_requests(body)
    request_id = gens[0].request_id
    if not body.stream:
        results = await engine.generation.generate_all(gens)
        return JSON(translate.completion_response(body.model, request_id, results))
    events = await prime(engine.generation.stream_all(gens))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    frames = _completion_frames(body, request_id, include_usage, events)
    return sse_response(frames, openai_envelope)


async def _completion_frames(
    body: CompletionRequest, request_id: str, include_usage: bool,
    events: AsyncIterator[tuple[int, GenerationEvent]],
) -> AsyncIterator[dict[str, Any]]:
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    extra = {"usage": None} if include_usage else {}
    total = Usage(0, 0)
    async for prompt_index, event in events:
        if isinstance(event, Usage):
            total = Usage(total.prompt_tokens + event.prompt_tokens,
                          total.completion_tokens + event.completion_tokens)
            continue
        if isinstance(event, ToolCallDelta):
            continue  # completions take no tools
        text = event.text if isinstance(event, TextDelta) else ""
        finish = event.finish_reason if isinstance(event, ChoiceFinished) else None
        choice = {"index": prompt_index * body.n + event.index, "text": text,
                  "logprobs": None, "finish_reason": finish}
        yield {**head, "choices": [choice], **extra}
    if include_usage:
        yield {**head, "choices": [], "usage": translate.usage_json(total)}


@router.post("/embeddings")
@cancel_on_disconnect
async def embeddings(
    body: EmbeddingRequestIn, request: Request, engine: EngineDep
) -> Any:
    body.note_unknown(request.url.path)
    result = await engine.embeddings.embed(translate.embedding_request(body))
    return JSON(translate.embedding_response(body.model, result, body.encoding_format))


# -- audio -------------------------------------------------------------------------------------


@router.post("/audio/transcriptions",
             openapi_extra=multipart_body(audio.TranscriptionForm, ("file",)))
async def transcriptions(request: Request, engine: EngineDep) -> Any:
    return await _transcript(request, engine, "transcribe")


@router.post("/audio/translations",
             openapi_extra=multipart_body(audio.TranscriptionForm, ("file",)))
async def translations(request: Request, engine: EngineDep) -> Any:
    return await _transcript(request, engine, "translate")


async def _transcript(
    request: Request, engine: Engine, task: Literal["transcribe", "translate"]
) -> Any:
    body, job = await audio.read_transcription_form(request, task)
    body.note_unknown(request.url.path)

    async def transcribed() -> Any:
        if body.stream:
            events = await prime(engine.speech.transcribe_stream(job))
            return sse_response(_transcript_frames(events), openai_envelope)
        result = await engine.speech.transcribe(job)
        if body.response_format in ("json", "verbose_json"):
            return JSON(audio.transcript_json(result, body))
        return PlainTextResponse(audio.transcript_text(result, body.response_format))

    # The form is read: from here on, `receive` carries only the client's disconnect.
    return await unless_disconnected(request, transcribed())


async def _transcript_frames(
    events: AsyncIterator[TranscriptSegment | TranscriptionInfo],
) -> AsyncIterator[dict[str, Any]]:
    text = ""
    async for event in events:
        if isinstance(event, TranscriptSegment):
            delta = event.text if text else event.text.lstrip()
            text += delta
            yield {"type": "transcript.text.delta", "delta": delta}
        else:
            yield {"type": "transcript.text.done", "text": text.strip()}


@router.post("/audio/speech")
@cancel_on_disconnect
async def speech(body: audio.SpeechRequestIn, request: Request, engine: EngineDep) -> Any:
    body.note_unknown(request.url.path)
    chunks = await prime(engine.speech.speak(audio.speech_request(body)))
    encoded = encoded_speech(chunks, body.response_format)
    if body.stream_format == "sse":
        return sse_response(_speech_events(encoded), openai_envelope)
    return StreamingResponse(encoded, media_type=MEDIA_TYPES[body.response_format])


async def _speech_events(encoded: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    async with aclosing(encoded):  # type: ignore[type-var]
        async for data in encoded:
            yield {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
    yield {"type": "speech.audio.done"}


@router.get("/audio/voices")
async def voices(engine: EngineDep) -> Any:
    """ember extension: every text-to-speech voice, with the names that map onto it."""
    return {"object": "list", "data": [asdict(v) for v in engine.speech.voices()]}


# -- images ------------------------------------------------------------------------------------


@router.post("/images/generations")
@cancel_on_disconnect
async def image_generations(
    body: images.ImageGenerationIn, request: Request, engine: EngineDep
) -> Any:
    body.note_unknown(request.url.path)
    job = images.image_request(body, "generate", body.prompt)
    result = await engine.images.generate(job, keep=images.keeps_files(body))
    return JSON(images.images_response(result, body, request, engine))


@router.post("/images/edits",
             openapi_extra=multipart_body(images.ImageEditForm, ("image",), ("mask",)))
async def image_edits(request: Request, engine: EngineDep) -> Any:
    return await _image_from_image(request, engine, "edit")


@router.post("/images/variations",
             openapi_extra=multipart_body(images.ImageVariationForm, ("image",)))
async def image_variations(request: Request, engine: EngineDep) -> Any:
    return await _image_from_image(request, engine, "variation")


async def _image_from_image(
    request: Request, engine: Engine, mode: Literal["edit", "variation"]
) -> Any:
    body, job = await images.read_edit_form(request, mode)
    body.note_unknown(request.url.path)

    async def edited() -> Any:
        result = await engine.images.generate(job, keep=images.keeps_files(body))
        return JSON(images.images_response(result, body, request, engine))

    # The form is read: from here on, `receive` carries only the client's disconnect.
    return await unless_disconnected(request, edited())


# -- files -------------------------------------------------------------------------------------


@router.get("/files/{file_id}")
async def file_info(file_id: str, engine: EngineDep) -> Any:
    artifact = engine.files.get(file_id)
    return {"id": artifact.id, "object": "file", "bytes": artifact.bytes,
            "created_at": artifact.created_at, "expires_at": artifact.expires_at,
            "filename": artifact.filename, "purpose": "output", "status": "processed"}


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, engine: EngineDep) -> Any:
    artifact = engine.files.get(file_id)
    return FileResponse(artifact.path, media_type=artifact.media_type,
                        filename=artifact.filename)


# -- models ------------------------------------------------------------------------------------


def _model_json(status: ModelStatus) -> dict[str, Any]:
    return {"id": status.id, "object": "model", "created": 0, "owned_by": "ember",
            **{k: v for k, v in asdict(status).items() if k != "id"}}


@router.get("/models")
async def list_models(engine: EngineDep) -> Any:
    return {"object": "list", "data": [_model_json(s) for s in engine.models.list()]}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, engine: EngineDep) -> Any:
    return _model_json(engine.models.status(model_id))


@router.post("/models/load")
async def load_model(body: LoadRequest, engine: EngineDep) -> Any:
    """ember extension: load a model now rather than on its first request."""
    return _model_json(await engine.models.load(body.model))


@router.post("/models/unload")
async def unload_model(body: LoadRequest, engine: EngineDep) -> Any:
    """ember extension: unload a model and free its memory (409 while it serves requests)."""
    return _model_json(await engine.models.unload(body.model))

"""`/v1/ai/*` routes (seed 001): parse, call the engine, serialize."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from engine.contracts.chat import ChoiceFinished, TextDelta, ToolCallDelta, Usage
from engine.contracts.embeddings import EmbeddingRequest
from engine.contracts.images import ImageRequest
from engine.contracts.speech import SpeechRequest, TranscriptionRequest
from engine.core.audio_codec import MEDIA_TYPES
from engine.core.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from engine.core.sources import resolve_source
from engine.gateway.cache import CachePolicy
from engine.generation import vision
from engine.generation.tool_calls import join_deltas
from engine.jobs import chat as chat_jobs
from engine.media.fetch import AUDIO, decode_data_uri, fetch_media, vet_media_url
from engine.service import Engine
from engine.speech.service import encoded_speech, list_voices
from server.cancellation import cancel_on_disconnect, unless_disconnected
from server.deps import EngineDep, file_url, require_api_key
from server.gateway import deadline, renamed_params, within
from server.infrai import translate
from server.infrai.errors import NotImplementedYetError, infrai_envelope
from server.infrai.schemas import (
    AsrIn,
    ChatIn,
    EmbedIn,
    ImageIn,
    MediaRef,
    RealtimeTokenIn,
    TtsIn,
    VisionIn,
)
from server.responses import JSON
from server.streaming import prime, sse_response
from server.tools_wire import tool_call_delta, tool_calls_json
from server.wire import parse_size

router = APIRouter(prefix="/v1/ai", dependencies=[Depends(require_api_key)])

# seed 001 format -> ember's encoder: ogg is Opus in an Ogg container.
TTS_FORMATS = {"mp3": "mp3", "wav": "wav", "ogg": "opus", "pcm": "pcm"}


# -- chat --------------------------------------------------------------------------------------


@router.post("/chat")
async def chat(body: ChatIn, request: Request, engine: EngineDep) -> Any:
    routed = translate.chat_request(body, engine.router)
    policy = translate.CACHE_POLICIES[body.cache_strategy]
    if body.batch_mode:  # queued as a job, which outlives the request by design
        return await _submit_batch(body, routed, policy, engine)
    return await unless_disconnected(request, _chat_now(body, routed, policy, engine))


async def _chat_now(body: ChatIn, routed: translate.Routed, policy: CachePolicy,
                    engine: Engine) -> Any:
    key = f"ai.chat:{body.idempotency_key}" if body.idempotency_key else None
    digest = translate.body_digest(body, "stream", "timeout_seconds")

    async def once() -> dict[str, Any]:
        return await _chat_once(routed, policy, body.timeout_seconds, engine)

    if body.stream:
        return await _chat_stream(routed, policy, body.timeout_seconds, key, digest, once,
                                  engine)
    if key is None:
        return JSON(await once())
    return JSON(await engine.idempotency.run(key, digest, once))


def _served_by(engine: Engine, routed: translate.Routed) -> str:
    return vision.chat_entry(engine.registry, routed.request).id


async def _chat_once(routed: translate.Routed, policy: CachePolicy, timeout_s: float,
                     engine: Engine) -> dict[str, Any]:
    request = routed.request
    async with deadline(timeout_s):
        result, hit = await engine.response_cache.generate(request, policy, engine.generate)
    meta = translate.metadata(request.request_id, _served_by(engine, routed), hit,
                              routed.routed_by)
    return translate.chat_result(result, meta)


async def _chat_stream(routed: translate.Routed, policy: CachePolicy, timeout_s: float,
                       key: str | None, digest: str, once: Any, engine: Engine) -> Any:
    """SSE chunks `{delta: {content}, finish_reason, index}`; the last one also carries usage
    and metadata. With an idempotency key, a retry while the first runs (or after) gets the
    first reply, replayed."""
    future = None
    if key is not None:
        future, owner = engine.idempotency.claim(key, digest)
        if not owner:
            value = await engine.idempotency.run(key, digest, once)
            return sse_response(_replayed(value), infrai_envelope)
    try:
        hit, events = engine.response_cache.stream(routed.request, policy, engine.stream)
        events = await prime(within(events, timeout_s))
        meta = translate.metadata(routed.request.request_id, _served_by(engine, routed), hit,
                                  routed.routed_by)
    except BaseException as error:
        if key is not None and future is not None:
            engine.idempotency.fail(key, future, error)
        raise

    async def frames() -> AsyncIterator[dict[str, Any]]:
        text, finish = "", None
        calls: list[ToolCallDelta] = []
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    text += event.text
                    yield {"delta": {"content": event.text}, "finish_reason": None, "index": 0}
                elif isinstance(event, ToolCallDelta):
                    calls.append(event)
                    yield {"delta": tool_call_delta(event), "finish_reason": None,
                           "index": 0}
                elif isinstance(event, ChoiceFinished):
                    finish = event.finish_reason
                elif isinstance(event, Usage):  # last: the closing chunk carries the metadata
                    usage = translate.usage_json(event.prompt_tokens, event.completion_tokens)
                    yield translate.with_metadata(
                        {"delta": {}, "finish_reason": finish, "index": 0, "usage": usage}, meta)
                    if future is not None and not future.done():
                        reply: dict[str, Any] = {"content": text, "finish_reason": finish,
                                                 "usage": usage}
                        if calls:
                            reply["tool_calls"] = tool_calls_json(join_deltas(calls))
                        future.set_result(translate.with_metadata(reply, meta))
        except BaseException as error:
            if key is not None and future is not None:
                engine.idempotency.fail(key, future, error)
            raise

    return sse_response(frames(), infrai_envelope)


async def _replayed(result: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    if result["content"]:
        yield {"delta": {"content": result["content"]}, "finish_reason": None, "index": 0}
    for index, call in enumerate(result.get("tool_calls") or []):
        yield {"delta": {"tool_calls": [{"index": index, **call}]}, "finish_reason": None,
               "index": 0}
    closing = {"delta": {}, "finish_reason": result["finish_reason"], "index": 0,
               "usage": result["usage"]}
    yield translate.with_metadata(closing, result["metadata"])


async def _submit_batch(body: ChatIn, routed: translate.Routed, policy: CachePolicy,
                        engine: Engine) -> Any:
    """Queued as a chat job: 202 with its id; GET /v1/ai/jobs/{job_id} has the ChatResult."""
    if body.stream:
        raise InvalidRequestError("a batch_mode request cannot stream; poll its job instead",
                                  param="stream")
    params = chat_jobs.job_params(routed.request, policy, body.timeout_seconds)
    key = f"ai.chat:{body.idempotency_key}" if body.idempotency_key else None
    with renamed_params({"Idempotency-Key": "idempotency_key"}):
        job, created = await engine.jobs.submit("chat", routed.request.model, params, key)
    return JSON(translate.job_json(job), status_code=202 if created else 200)


@router.get("/jobs/{job_id}")
async def chat_job(job_id: str, engine: EngineDep) -> Any:
    job = await engine.jobs.get(job_id)
    if job.kind != "chat":
        raise NotFoundError(f"No batch chat job {job_id!r}", param="job_id")
    return JSON(translate.job_json(job))


# -- embeddings, images, vision ------------------------------------------------------------------


@router.post("/embed")
@cancel_on_disconnect
async def embed(body: EmbedIn, request: Request, engine: EngineDep) -> Any:
    translate.check_vendor(body)
    model = engine.registry.model_or_default(body.model, "embedding")
    texts = [body.input] if isinstance(body.input, str) else body.input
    job = EmbeddingRequest(model=model, texts=texts, dimensions=body.dimensions)

    async def once() -> dict[str, Any]:
        result = await engine.embed(job)
        meta = translate.metadata(translate.new_request_id(),
                                  engine.registry.resolve(model).id)
        return {"embeddings": result.vectors, "model": model,
                "dimensions": int(result.vectors.shape[1]),
                "usage": {"prompt_tokens": result.prompt_tokens,
                          "total_tokens": result.prompt_tokens},
                "metadata": meta}

    if body.idempotency_key is None:
        return JSON(await once())
    key = f"ai.embed:{body.idempotency_key}"
    return JSON(await engine.idempotency.run(key, translate.body_digest(body), once))


@router.post("/image")
@cancel_on_disconnect
async def image(body: ImageIn, request: Request, engine: EngineDep) -> Any:
    translate.check_vendor(body)
    width, height = parse_size(body.size)  # a bad size is a 400 before any model is picked
    model = body.model or engine.router.pick("image", "general", body.prefer)
    result = await engine.generate_images(ImageRequest(
        model=model, prompt=body.prompt, n=body.n, width=width, height=height,
    ))
    images = []
    for picture in result.images:
        artifact = await asyncio.to_thread(engine.artifacts.put, picture.data,
                                           picture.media_type, picture.suffix)
        images.append({"url": file_url(request, engine, artifact.id),
                       "b64": base64.b64encode(picture.data).decode()})
    meta = translate.metadata(translate.new_request_id(), engine.registry.resolve(model).id)
    return JSON({"images": images, "metadata": meta})


def _vision_model(engine: Engine) -> str:
    """The router's vision model; with none configured, the default chat model, whose own
    vision routing says which vision model to install."""
    try:
        return engine.router.pick("vision")
    except ModelNotFoundError:
        return engine.registry.model_or_default(None, "chat")


@router.post("/vision")
@cancel_on_disconnect
async def vision_chat(body: VisionIn, request: Request, engine: EngineDep) -> Any:
    job = translate.vision_request(body, body.model or _vision_model(engine))
    result = await engine.generate(job)
    meta = translate.metadata(job.request_id, vision.chat_entry(engine.registry, job).id)
    return JSON(translate.chat_result(result, meta))


# -- speech ------------------------------------------------------------------------------------


def _default_voice(engine: Engine, model: str) -> str:
    entry = engine.registry.resolve(model, "tts")
    voices = [v.id for v in list_voices(engine.registry) if v.model == entry.id]
    return voices[0] if voices else "alloy"


@router.post("/tts")
@cancel_on_disconnect
async def tts(body: TtsIn, request: Request, engine: EngineDep) -> Any:
    """The whole clip is synthesized, stored as a file, and its URL returned."""
    translate.check_vendor(body)
    model = engine.registry.model_or_default(body.model, "tts")
    voice = body.voice or _default_voice(engine, model)
    fmt = TTS_FORMATS[body.format]
    with renamed_params({"response_format": "format"}):
        speech = engine.speak(SpeechRequest(model, body.input, voice))
        data = b"".join([part async for part in encoded_speech(speech, fmt)])
    artifact = await asyncio.to_thread(engine.artifacts.put, data, MEDIA_TYPES[fmt], body.format)
    meta = translate.metadata(translate.new_request_id(), engine.registry.resolve(model).id)
    return JSON({"audio_url": file_url(request, engine, artifact.id), "format": body.format,
                 "metadata": meta})


async def _audio_bytes(ref: MediaRef, engine: Engine) -> bytes:
    """A URL goes through the engine's guarded fetcher (audio types); base64 is decoded
    under the same size cap."""
    settings = engine.settings
    if ref.url is not None:
        return await fetch_media(ref.url.strip(), settings, "audio.url", AUDIO)
    data = (ref.base64 or "").strip()
    if data[:5].lower() != "data:":
        mime = (ref.mime or "audio/*").strip().lower()
        if not mime.startswith(AUDIO.prefixes):
            raise InvalidRequestError(f"mime must be an audio type; got {ref.mime!r}",
                                      param="audio.mime")
        data = f"data:{mime};base64,{data}"
    return decode_data_uri(data, "audio.base64", settings.fetch_max_bytes, AUDIO)


@router.post("/asr")
@cancel_on_disconnect
async def asr(body: AsrIn, request: Request, engine: EngineDep) -> Any:
    translate.check_vendor(body)
    if body.audio.url is not None:  # a bad URL is a 400 whatever the model
        await vet_media_url(body.audio.url.strip(), engine.settings, "audio.url", AUDIO)
    model = engine.registry.model_or_default(body.model, "stt")
    resolve_source(engine.registry.resolve(model))  # not installed: 503 before any fetch
    audio = await _audio_bytes(body.audio, engine)
    with renamed_params({"file": "audio"}):
        result = await engine.transcribe(
            TranscriptionRequest(model=model, audio=audio, language=body.language)
        )
    meta = translate.metadata(translate.new_request_id(), engine.registry.resolve(model).id)
    return JSON(translate.transcript_json(result, meta))


@router.post("/realtime/token")
async def realtime_token(body: RealtimeTokenIn) -> Any:
    raise NotImplementedYetError(
        "Realtime sessions are not built yet: a token is only minted once ember can open the "
        "live WebRTC session it is for. Use /v1/ai/asr and /v1/ai/tts meanwhile.",
        param=None,
    )


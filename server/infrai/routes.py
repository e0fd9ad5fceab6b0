"""`/v1/ai/*` routes (seed 001): parse, call the engine, serialize."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from engine.contracts.chat import ChoiceFinished, TextDelta, ToolCallDelta, Usage
from engine.contracts.embeddings import EmbeddingRequest
from engine.contracts.images import ImageRequest
from engine.contracts.speech import SpeechRequest, TranscriptionRequest
from engine.core.errors import InvalidRequestError, NotFoundError
from engine.gateway.cache import CachePolicy
from engine.gateway.service import RecordedStream
from engine.generation.tool_calls import join_deltas
from engine.jobs import chat as chat_jobs
from engine.media.fetch import AUDIO
from engine.service import Engine
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
    routed = translate.chat_request(body, engine.gateway.router)
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
    return JSON(await engine.gateway.once(key, digest, once))


def _served_by(engine: Engine, routed: translate.Routed) -> str:
    return engine.generation.served_by(routed.request)


async def _chat_once(routed: translate.Routed, policy: CachePolicy, timeout_s: float,
                     engine: Engine) -> dict[str, Any]:
    request = routed.request
    async with deadline(timeout_s):
        result, hit = await engine.gateway.chat(request, policy)
    meta = translate.metadata(request.request_id, _served_by(engine, routed), hit,
                              routed.routed_by)
    return translate.chat_result(result, meta)


async def _chat_stream(routed: translate.Routed, policy: CachePolicy, timeout_s: float,
                       key: str | None, digest: str, once: Any, engine: Engine) -> Any:
    """SSE chunks `{delta: {content}, finish_reason, index}`; the last one also carries usage
    and metadata. With an idempotency key, a retry while the first runs (or after) gets the
    first reply, replayed."""

    async def open_stream() -> RecordedStream[dict[str, Any]]:
        hit, events = engine.gateway.chat_stream(routed.request, policy)
        events = await prime(within(events, timeout_s))
        meta = translate.metadata(routed.request.request_id, _served_by(engine, routed), hit,
                                  routed.routed_by)
        reply: dict[str, Any] = {}

        async def frames() -> AsyncIterator[dict[str, Any]]:
            text, finish = "", None
            calls: list[ToolCallDelta] = []
            async for event in events:
                if isinstance(event, TextDelta):
                    text += event.text
                    yield {"delta": {"content": event.text}, "finish_reason": None, "index": 0}
                elif isinstance(event, ToolCallDelta):
                    calls.append(event)
                    yield {"delta": tool_call_delta(event), "finish_reason": None, "index": 0}
                elif isinstance(event, ChoiceFinished):
                    finish = event.finish_reason
                elif isinstance(event, Usage):  # last: the closing chunk carries the metadata
                    usage = translate.usage_json(event.prompt_tokens, event.completion_tokens)
                    reply.update(content=text, finish_reason=finish, usage=usage)
                    if calls:
                        reply["tool_calls"] = tool_calls_json(join_deltas(calls))
                    reply.update(translate.with_metadata({}, meta))
                    yield translate.with_metadata(
                        {"delta": {}, "finish_reason": finish, "index": 0, "usage": usage}, meta)

        return RecordedStream(frames(), lambda: reply or None)

    frames = await engine.gateway.stream_once(key, digest, open_stream, once, _replayed)
    return sse_response(frames, infrai_envelope)


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
    texts = [body.input] if isinstance(body.input, str) else body.input
    job = EmbeddingRequest(model=body.model, texts=texts, dimensions=body.dimensions)

    async def once() -> dict[str, Any]:
        result = await engine.embeddings.embed(job)
        meta = translate.metadata(translate.new_request_id(), result.served_by)
        return {"embeddings": result.vectors, "model": result.model,
                "dimensions": int(result.vectors.shape[1]),
                "usage": {"prompt_tokens": result.prompt_tokens,
                          "total_tokens": result.prompt_tokens},
                "metadata": meta}

    key = f"ai.embed:{body.idempotency_key}" if body.idempotency_key else None
    return JSON(await engine.gateway.once(key, translate.body_digest(body), once))


@router.post("/image")
@cancel_on_disconnect
async def image(body: ImageIn, request: Request, engine: EngineDep) -> Any:
    translate.check_vendor(body)
    width, height = parse_size(body.size)  # a bad size is a 400 before any model is picked
    model = body.model or engine.gateway.pick("image", "general", body.prefer)
    result = await engine.images.generate(ImageRequest(
        model=model, prompt=body.prompt, n=body.n, width=width, height=height,
    ), keep=True)
    images = [{"url": file_url(request, engine, picture.file_id or ""),
               "b64": base64.b64encode(picture.data).decode()} for picture in result.images]
    meta = translate.metadata(translate.new_request_id(), result.served_by)
    return JSON({"images": images, "metadata": meta})


@router.post("/vision")
@cancel_on_disconnect
async def vision_chat(body: VisionIn, request: Request, engine: EngineDep) -> Any:
    job = translate.vision_request(body, body.model or engine.gateway.vision_model())
    result = await engine.generation.generate(job)
    meta = translate.metadata(job.request_id, result.served_by)
    return JSON(translate.chat_result(result, meta))


# -- speech ------------------------------------------------------------------------------------


@router.post("/tts")
@cancel_on_disconnect
async def tts(body: TtsIn, request: Request, engine: EngineDep) -> Any:
    """The whole clip is synthesized, stored as a file, and its URL returned."""
    translate.check_vendor(body)
    voice = body.voice or engine.speech.default_voice(body.model)
    with renamed_params({"response_format": "format"}):
        spoken = await engine.speech.speak_to_file(SpeechRequest(body.model, body.input, voice),
                                                   TTS_FORMATS[body.format], body.format)
    meta = translate.metadata(translate.new_request_id(), spoken.served_by)
    return JSON({"audio_url": file_url(request, engine, spoken.artifact.id),
                 "format": body.format, "metadata": meta})


def _audio_data_uri(ref: MediaRef) -> str:
    """The wire's base64 (with its mime, or a whole data: URI) as a data: URI."""
    data = (ref.base64 or "").strip()
    if data[:5].lower() == "data:":
        return data
    mime = (ref.mime or "audio/*").strip().lower()
    if not mime.startswith(AUDIO.prefixes):
        raise InvalidRequestError(f"mime must be an audio type; got {ref.mime!r}",
                                  param="audio.mime")
    return f"data:{mime};base64,{data}"


@router.post("/asr")
@cancel_on_disconnect
async def asr(body: AsrIn, request: Request, engine: EngineDep) -> Any:
    translate.check_vendor(body)
    url = body.audio.url.strip() if body.audio.url is not None else None
    data_uri = None if url is not None else _audio_data_uri(body.audio)
    audio = await engine.speech.fetch_audio(body.model, url, data_uri, "audio")
    with renamed_params({"file": "audio"}):
        result = await engine.speech.transcribe(
            TranscriptionRequest(model=body.model, audio=audio, language=body.language)
        )
    meta = translate.metadata(translate.new_request_id(), result.served_by)
    return JSON(translate.transcript_json(result, meta))


@router.post("/realtime/token")
async def realtime_token(body: RealtimeTokenIn) -> Any:
    raise NotImplementedYetError(
        "Realtime sessions are not built yet: a token is only minted once ember can open the "
        "live WebRTC session it is for. Use /v1/ai/asr and /v1/ai/tts meanwhile.",
        param=None,
    )


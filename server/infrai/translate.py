"""`/v1/ai/*` wire <-> engine types. Pure functions: no I/O, no model code."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from engine.contracts.chat import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    OutputConstraint,
    SamplingParams,
)
from engine.contracts.speech import Transcription
from engine.core.digest import digest
from engine.core.errors import InvalidRequestError
from engine.gateway.cache import CachePolicy
from engine.gateway.routing import Router
from engine.jobs.store import Job
from server.infrai.schemas import Body, ChatIn, MediaRef, NamedToolChoice, VisionIn
from server.tools_wire import history_calls, output_constraint, tool_calls_json

VENDOR = "ember"
# vendor: only greedy replies, which a fresh run would repeat, are served from the cache;
# infrai: the caller opts into the gateway's exact-match cache, sampled replies included.
CACHE_POLICIES: dict[str, CachePolicy] = {
    "vendor": "deterministic", "infrai": "always", "none": "off",
}


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


def check_vendor(body: Body) -> None:
    if body.vendor not in (None, VENDOR):
        raise InvalidRequestError(
            f"vendor {body.vendor!r} is not available: this gateway is ember, which serves "
            "every request with its own local models (vendor 'ember' or none).",
            param="vendor",
        )


@dataclass
class Routed:
    """The engine request and what the reply's metadata reports about how it was served."""

    request: GenerationRequest
    routed_by: dict[str, str] | None  # {task, prefer} when the router picked the model


def chat_request(body: ChatIn, router: Router) -> Routed:
    check_vendor(body)
    messages = [
        ChatMessage(role=m.role, content=m.content or "", tool_call_id=m.tool_call_id,
                    tool_calls=history_calls(m.tool_calls))
        for m in body.messages]
    if not messages or not any(m.content.strip() or m.tool_calls for m in messages):
        raise InvalidRequestError("messages must hold some text", param="messages")
    routed_by: dict[str, str] | None = None
    model = body.model
    if model is None:
        model = router.pick("chat", body.task, body.prefer)
        routed_by = {"task": body.task, "prefer": body.prefer}
    params = sampling(body.temperature, body.max_tokens)
    request = GenerationRequest(model=model, params=params, messages=messages,
                                request_id=new_request_id(), constraint=constraint(body))
    return Routed(request, routed_by)


def constraint(body: ChatIn) -> OutputConstraint | None:
    fmt, choice = body.response_format, body.tool_choice
    return output_constraint(
        fmt.type if fmt is not None else None, fmt.schema_object() if fmt is not None else None,
        "", body.tools, choice.function.name if isinstance(choice, NamedToolChoice) else choice,
        body.parallel_tool_calls)


def sampling(temperature: float | None, max_tokens: int | None) -> SamplingParams:
    """Unset fields take the model's own defaults."""
    return SamplingParams(max_tokens=max_tokens, temperature=temperature)


def body_digest(body: Body, *ignored: str) -> str:
    """What an idempotency key is bound to: the request minus fields a retry may change."""
    return digest(body.model_dump(exclude={"idempotency_key", *ignored}))


def image_input(ref: MediaRef, where: str) -> ImageInput:
    """`{url}` (http(s) or data:) or `{base64, mime}` as the engine's image input; the
    engine's guarded fetcher checks and fetches it."""
    if ref.url is not None:
        return ImageInput(url=ref.url.strip(), param=f"{where}.url", part=where)
    data = (ref.base64 or "").strip()
    if data[:5].lower() == "data:":
        return ImageInput(url=data, param=f"{where}.base64", part=where)
    mime = (ref.mime or "image/png").strip().lower()
    if not mime.startswith("image/"):
        raise InvalidRequestError(f"mime must be an image/* type; got {ref.mime!r}",
                                  param=f"{where}.mime")
    return ImageInput(url=f"data:{mime};base64,{data}", param=f"{where}.base64", part=where)


def vision_request(body: VisionIn, model: str) -> GenerationRequest:
    check_vendor(body)
    # Images first, then the question: what vision models are trained on.
    parts: list[str | ImageInput] = [
        image_input(ref, f"images[{index}]") for index, ref in enumerate(body.images)
    ]
    parts.append(body.prompt)
    message = ChatMessage(role="user", content=body.prompt, parts=tuple(parts))
    return GenerationRequest(model=model, params=sampling(body.temperature, body.max_tokens),
                             messages=[message], request_id=new_request_id())


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def metadata(request_id: str, model: str, cache_hit: bool = False,
             routed_by: dict[str, str] | None = None) -> dict[str, Any]:
    return {"request_id": request_id, "vendor": VENDOR, "model": model, "cache_hit": cache_hit,
            "routed_by": routed_by}


def with_metadata(result: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """`metadata` as the seed's result type names it, and `_metadata` as its own examples read
    it (`result["_metadata"]["request_id"]`): the same object under both keys."""
    return {**result, "metadata": meta, "_metadata": meta}


def chat_result(result: GenerationResult, meta: dict[str, Any]) -> dict[str, Any]:
    choice = result.choices[0]
    usage = usage_json(result.usage.prompt_tokens, result.usage.completion_tokens)
    reply: dict[str, Any] = {"content": choice.text, "finish_reason": choice.finish_reason,
                             "usage": usage}
    if choice.tool_calls:
        reply["tool_calls"] = tool_calls_json(choice.tool_calls)
    return with_metadata(reply, meta)


def job_json(job: Job) -> dict[str, Any]:
    """A batch chat job: its state, and the ChatResult once it has completed."""
    result = None
    if job.status == "completed" and job.result:
        out = job.result
        usage = usage_json(out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"])
        meta = metadata(job.id, out["model"], out.get("cache_hit", False))
        result = with_metadata({"content": out["text"], "finish_reason": out["finish_reason"],
                                "usage": usage}, meta)
    return {
        "object": "ai.chat.job", "job_id": job.id, "status": job.status, "model": job.model,
        "created_at": int(job.created_at),
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "result": result, "error": {"message": job.error} if job.error else None,
        "status_url": f"/v1/ai/jobs/{job.id}",
    }


def transcript_json(result: Transcription, meta: dict[str, Any]) -> dict[str, Any]:
    segments = [{"id": s.id, "start": s.start, "end": s.end, "text": s.text.strip()}
                for s in result.segments]
    return {"text": result.text, "language": result.language, "segments": segments,
            "duration": round(result.duration, 3), "metadata": meta}

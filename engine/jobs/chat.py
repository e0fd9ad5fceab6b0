"""Chat as a job kind (the /v1/ai/* dialect's `batch_mode`): the request is stored as JSON in
the job queue, run later through the engine's own chat path (scheduler, response cache), and
its result kept as a JSON file in the artifact store, like any job's result."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from engine.contracts.chat import ChatMessage, GenerationRequest, GenerationResult, SamplingParams
from engine.contracts.media import MediaResult
from engine.core.errors import DeadlineExceededError, InvalidRequestError
from engine.core.registry import ModelEntry
from engine.gateway.cache import CachePolicy, ResponseCache
from engine.jobs.store import Job

Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]
POLICIES = ("deterministic", "always", "off")


def job_params(request: GenerationRequest, policy: CachePolicy,
               timeout_s: float | None) -> dict[str, Any]:
    """A text-only chat request as JSON-able job params."""
    if request.images():
        raise InvalidRequestError("batch jobs carry text messages only", param="messages")
    return {
        "messages": [{"role": m.role, "content": m.content} for m in request.messages or []],
        "params": asdict(request.params), "cache": policy, "timeout_s": timeout_s,
    }


def validate(entry: ModelEntry, params: dict[str, Any]) -> dict[str, Any]:
    """The job queue's submit-time check; any chat model takes the same params."""
    return check(params)


def check(params: dict[str, Any]) -> dict[str, Any]:
    """Checked at submit time and again at run time (for params an older version stored)."""
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages
    ):
        raise InvalidRequestError("messages must be a non-empty list of {role, content}",
                                  param="messages")
    try:
        SamplingParams(**params.get("params", {}))
    except TypeError as exc:
        raise InvalidRequestError(f"invalid sampling params: {exc}", param="params") from exc
    if params.get("cache", "off") not in POLICIES:
        raise InvalidRequestError("unknown cache policy", param="cache")
    timeout = params.get("timeout_s")
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise InvalidRequestError("timeout_s must be a positive number", param="timeout_s")
    return params


def request_from(job: Job) -> GenerationRequest:
    params = check(job.params)
    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in params["messages"]]
    return GenerationRequest(model=job.model, params=SamplingParams(**params["params"]),
                             messages=messages, request_id=job.id)


async def run(cache: ResponseCache, generate: Generate, job: Job) -> MediaResult:
    request = request_from(job)
    timeout = job.params.get("timeout_s")
    try:
        async with asyncio.timeout(timeout):
            result, hit = await cache.generate(request, job.params.get("cache", "off"), generate)
    except TimeoutError as exc:
        raise DeadlineExceededError(
            f"the reply took longer than timeout_seconds ({timeout:g} s)"
        ) from exc
    choice = result.choices[0]
    output = {
        "model": job.model, "text": choice.text, "finish_reason": choice.finish_reason,
        "usage": {"prompt_tokens": result.usage.prompt_tokens,
                  "completion_tokens": result.usage.completion_tokens},
        "cache_hit": hit,
    }
    return MediaResult(data=json.dumps(output).encode(), media_type="application/json",
                       suffix=".json", metadata={**output, "format": "json"})

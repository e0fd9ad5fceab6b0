"""OpenAI wire ⇄ engine types. Pure functions: no I/O, no model code."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np

from engine.contracts.chat import (
    ChatMessage,
    Choice,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    OutputConstraint,
    SamplingParams,
    Usage,
)
from engine.contracts.embeddings import EmbeddingRequest, EmbeddingResult
from engine.core.errors import InvalidRequestError
from server.openai.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    EmbeddingRequestIn,
    NamedToolChoice,
    SamplingFields,
)
from server.tools_wire import history_calls, output_constraint, tool_calls_json


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sampling(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=stop,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        n=body.n,
        ignore_eos=body.ignore_eos,
    )


def _image_part(part: dict[str, Any], where: str) -> ImageInput:
    """`{"type": "image_url", "image_url": {"url", "detail"}}` (Chat Completions) or
    `{"type": "input_image", "image_url": "...", "detail"}` (Responses style). `detail` is
    accepted and left to the model's processor, which picks the resolution itself."""
    value = part.get("image_url")
    if isinstance(value, dict):
        url, param, detail = value.get("url"), f"{where}.image_url.url", value.get("detail")
    else:
        url, param, detail = value, f"{where}.image_url", part.get("detail")
    if url is None:
        raise InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param,
            code="missing_required_parameter",
        )
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError("the image URL must be a non-empty string", param=param)
    if detail is not None and not isinstance(detail, str):
        raise InvalidRequestError("detail must be a string ('auto', 'low' or 'high')",
                                  param=param.rsplit(".", 1)[0] + ".detail")
    return ImageInput(url=url.strip(), param=param, part=where)


def _message(message: ChatMessageIn, index: int) -> ChatMessage:
    if message.content is None or isinstance(message.content, str):
        return ChatMessage(role=message.role, content=message.content or "",
                           tool_calls=history_calls(message.tool_calls),
                           tool_call_id=message.tool_call_id)
    parts: list[str | ImageInput] = []
    for part_index, part in enumerate(message.content):
        where = f"messages[{index}].content[{part_index}]"
        kind = part.get("type")
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image_url", "input_image"):
            parts.append(_image_part(part, where))
        else:
            raise InvalidRequestError(
                f"Unsupported content part type {kind!r}; expected 'text' or 'image_url'",
                param=where,
            )
    text = "".join(p for p in parts if isinstance(p, str))
    has_images = any(isinstance(p, ImageInput) for p in parts)
    return ChatMessage(role=message.role, content=text, parts=tuple(parts) if has_images else ())


def _constraint(body: ChatCompletionRequest) -> OutputConstraint | None:
    fmt, choice = body.response_format, body.tool_choice
    spec = fmt.json_schema if fmt is not None else None
    return output_constraint(
        fmt.type if fmt is not None else None, spec.schema_ if spec is not None else None,
        spec.name if spec is not None else "", body.tools,
        choice.function.name if isinstance(choice, NamedToolChoice) else choice,
        body.parallel_tool_calls is not False)


def chat_request(body: ChatCompletionRequest) -> GenerationRequest:
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    max_tokens = body.max_completion_tokens or body.max_tokens
    return GenerationRequest(
        model=body.model, params=_sampling(body, max_tokens), messages=messages,
        request_id=new_id("chatcmpl"), constraint=_constraint(body), logprobs=bool(body.logprobs),
    )


def completion_requests(body: CompletionRequest) -> list[GenerationRequest]:
    """One engine request per prompt (OpenAI accepts a list of prompts)."""
    prompt = body.prompt
    prompts: list[str | list[int]]
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]  # list[str] | list[list[int]] here
    if not prompts:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    request_id = new_id("cmpl")
    return [
        GenerationRequest(
            model=body.model, params=_sampling(body, body.max_tokens), prompt=p,
            echo=body.echo, request_id=request_id, logprobs=bool(body.logprobs),
            suffix=body.suffix, best_of=body.best_of,
        )
        for p in prompts
    ]


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def assistant_message(choice: Choice) -> dict[str, Any]:
    """OpenAI's message: content null when the reply is only tool calls."""
    if not choice.tool_calls:
        return {"role": "assistant", "content": choice.text}
    return {"role": "assistant", "content": choice.text or None,
            "tool_calls": tool_calls_json(choice.tool_calls)}


def chat_response(name: str, request_id: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": c.index,
                "message": assistant_message(c),
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ],
        "usage": usage_json(result.usage),
    }


def completion_response(
    name: str, request_id: str, results: list[GenerationResult]
) -> dict[str, Any]:
    per_prompt = len(results[0].choices)
    choices = [
        {
            "index": p * per_prompt + c.index,
            "text": c.text,
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        for p, result in enumerate(results)
        for c in result.choices
    ]
    usage = Usage(
        sum(r.usage.prompt_tokens for r in results),
        sum(r.usage.completion_tokens for r in results),
    )
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "usage": usage_json(usage),
    }


def embedding_request(body: EmbeddingRequestIn) -> EmbeddingRequest:
    value = body.input
    if isinstance(value, str):
        return EmbeddingRequest(model=body.model, texts=[value], dimensions=body.dimensions)
    if not value:  # the engine refuses empty input, for every dialect alike
        return EmbeddingRequest(model=body.model, texts=[], dimensions=body.dimensions)
    if isinstance(value[0], int):
        return EmbeddingRequest(model=body.model, token_ids=[value],
                                dimensions=body.dimensions)
    if isinstance(value[0], str):
        return EmbeddingRequest(model=body.model, texts=value,
                                dimensions=body.dimensions)
    return EmbeddingRequest(model=body.model, token_ids=value,
                            dimensions=body.dimensions)


def embedding_response(
    name: str, result: EmbeddingResult, encoding_format: str
) -> dict[str, Any]:
    vectors = np.asarray(result.vectors, dtype="<f4")
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": (
                base64.b64encode(vector.tobytes()).decode("ascii")
                if encoding_format == "base64" else vector
            ),
        }
        for i, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }

"""What the sync and async clients share: configuration, one request description per SDK
method (endpoint, body, how to read the answer), the retry policy and the SSE decoder. The
two clients only differ in how they send and wait."""

from __future__ import annotations

import email.utils
import json
import mimetypes
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from ember import __version__
from ember.client import types
from ember.client.errors import APIConnectionError, APIError, APITimeoutError, error_from_body

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "EMBER_BASE_URL"
API_KEY_ENV = "EMBER_API_KEY"  # the same variable the server reads its key from
DEFAULT_TIMEOUT_S = 600.0  # a long generation is one request; jobs poll instead
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 2

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is not waited for: backoff applies instead

# 503s that would fail the same way on retry: the weights are not installed, or loading failed.
PERMANENT_UNAVAILABLE_CODES = frozenset({"model_unavailable", "model_load_failed"})


def resolve_base_url(base_url: str | None) -> str:
    """The server's root URL; a trailing `/v1` (as OpenAI clients are configured) is accepted."""
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    return url.removesuffix("/v1")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def request_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"ember-python/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout or CONNECT_TIMEOUT_S))


# -- retries -------------------------------------------------------------------------------------


def retry_after_seconds(headers: httpx.Headers, now: float | None = None) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date), None when absent or unreadable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def backoff_delay(retries_done: int, retry_after: float | None) -> float:
    """The server's Retry-After when it gives a sane one, else exponential backoff with
    jitter (so clients refused together do not all come back at the same moment)."""
    if retry_after is not None and retry_after <= MAX_RETRY_AFTER_S:
        return retry_after
    delay = min(INITIAL_BACKOFF_S * 2**retries_done, MAX_BACKOFF_S)
    return delay * (1 - 0.25 * random.random())


def is_retryable(error: APIError) -> bool:
    """429 (queue full) and 503 (loading, over the memory budget) pass; a 503 saying the
    model is not installed or cannot load is final unless the server asks for a retry."""
    if error.status_code == 429:
        return True
    if error.status_code != 503:
        return False
    has_retry_after = error.response is not None and "retry-after" in error.response.headers
    return has_retry_after or error.code not in PERMANENT_UNAVAILABLE_CODES


def is_retryable_transport_error(error: httpx.TransportError) -> bool:
    """Connection failures are retried; a read timeout is not (the server may still be
    working on the request, and a retry would run it twice)."""
    if isinstance(error, httpx.TimeoutException):
        return isinstance(error, httpx.ConnectTimeout | httpx.PoolTimeout)
    return True


# -- server-sent events --------------------------------------------------------------------------


class SSEDecoder:
    """Lines of a `text/event-stream` in, each event's data out (comments and keep-alives are
    skipped)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def event_frame(data: str, status_code: int) -> dict[str, Any] | None:
    """An event's JSON object; None at `[DONE]`. An error frame (the server failed after the
    stream began) raises the typed error; its `status_code` is the stream's own (200)."""
    if data.strip() == "[DONE]":
        return None
    frame = json.loads(data)
    if not isinstance(frame, dict):
        raise APIError(f"Unexpected stream event: {data[:200]}", status_code=status_code)
    if isinstance(frame.get("error"), dict) and "choices" not in frame:
        raise error_from_body(status_code, frame)
    return frame


# -- one request per SDK method ------------------------------------------------------------------

FrameParser = Callable[[dict[str, Any]], Any]


@dataclass
class Call:
    """One SDK call on the wire: where it goes, what it sends, how its answer is read."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    json: dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # multipart form fields (with `files`)
    files: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream_frame: FrameParser | None = None  # set for `stream=True`: SSE frame → chunk


def _json(response: httpx.Response) -> dict[str, Any]:
    data = response.json()
    if not isinstance(data, dict):
        raise APIError(f"Unexpected response body: {response.text[:200]}",
                       status_code=response.status_code, response=response)
    return data


def _body(fields: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The named parameters that are set, then the pass-through ones (`seed`, `top_k`, ...)."""
    return {**{k: v for k, v in fields.items() if v is not None}, **kwargs}


def chat_completion(*, model: str, messages: Sequence[dict[str, Any] | types.ChatMessage],
                    stream: bool, max_tokens: int | None, temperature: float, top_p: float,
                    stop: str | list[str] | None, kwargs: dict[str, Any]) -> Call:
    wire_messages = [m.to_dict() if isinstance(m, types.ChatMessage) else m for m in messages]
    body = _body({"model": model, "messages": wire_messages, "max_tokens": max_tokens,
                  "temperature": temperature, "top_p": top_p, "stop": stop}, kwargs)
    if stream:
        body["stream"] = True
    return Call("POST", "/v1/chat/completions", json=body,
                parse=lambda r: types.ChatCompletion.from_json(_json(r)),
                stream_frame=types.StreamChunk.from_chat_frame if stream else None)


def completion(*, model: str, prompt: str, stream: bool, max_tokens: int | None,
               temperature: float, kwargs: dict[str, Any]) -> Call:
    body = _body({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                  "temperature": temperature}, kwargs)
    if stream:
        body["stream"] = True
    return Call("POST", "/v1/completions", json=body,
                parse=lambda r: types.Completion.from_json(_json(r)),
                stream_frame=types.StreamChunk.from_completion_frame if stream else None)


def embedding(*, model: str, input: str | list[str], kwargs: dict[str, Any]) -> Call:
    return Call("POST", "/v1/embeddings", json=_body({"model": model, "input": input}, kwargs),
                parse=lambda r: types.EmbeddingResponse.from_json(_json(r)))


def _speech(response: httpx.Response) -> types.SpeechResponse:
    content_type = response.headers.get("content-type", "application/octet-stream")
    return types.SpeechResponse(content=response.content,
                                content_type=content_type.split(";")[0].strip())


def speech(*, model: str, input: str, voice: str, response_format: str, speed: float,
           kwargs: dict[str, Any]) -> Call:
    body = _body({"model": model, "input": input, "voice": voice,
                  "response_format": response_format, "speed": speed}, kwargs)
    return Call("POST", "/v1/audio/speech", json=body, parse=_speech)


def _transcript(response: httpx.Response) -> types.TranscriptionResponse:
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        return types.TranscriptionResponse.from_json(_json(response))
    if content_type.startswith("text/event-stream"):  # `stream=True` passed through: collect
        decoder, text = SSEDecoder(), ""
        for line in [*response.text.splitlines(), ""]:
            data = decoder.feed(line)
            frame = event_frame(data, response.status_code) if data else None
            if frame and frame.get("type") == "transcript.text.done":
                text = frame.get("text", "")
        return types.TranscriptionResponse(text=text)
    return types.TranscriptionResponse(text=response.text)  # text, srt, vtt


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _form(fields: dict[str, Any]) -> dict[str, Any]:
    """Multipart fields as strings; a list goes as repeated `name[]` fields, the way OpenAI's
    clients send `timestamp_granularities[]`."""
    form: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, list | tuple):
            form[name if name.endswith("[]") else f"{name}[]"] = [_form_value(v) for v in value]
        else:
            form[name] = _form_value(value)
    return form


def _audio_file(file: bytes | BinaryIO, filename: str) -> tuple[str, bytes, str]:
    # Read once, so a retry sends the same bytes again.
    content = file if isinstance(file, bytes | bytearray) else file.read()
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return filename, bytes(content), media_type


def transcription(*, task: str, model: str, file: bytes | BinaryIO, filename: str,
                  fields: dict[str, Any], kwargs: dict[str, Any]) -> Call:
    """`response_format="json"` asks the server for verbose_json: the same text, plus the
    language, duration and segments the SDK's `TranscriptionResponse` has fields for."""
    values = _body({"model": model, **fields}, kwargs)
    if values.get("response_format", "json") == "json":
        values["response_format"] = "verbose_json"
    path = "/v1/audio/transcriptions" if task == "transcribe" else "/v1/audio/translations"
    return Call("POST", path, data=_form(values), files={"file": _audio_file(file, filename)},
                parse=_transcript)


def image_generation(*, model: str, prompt: str, n: int, size: str, quality: str,
                     response_format: str, kwargs: dict[str, Any]) -> Call:
    body = _body({"model": model, "prompt": prompt, "n": n, "size": size, "quality": quality,
                  "response_format": response_format}, kwargs)
    return Call("POST", "/v1/images/generations", json=body,
                parse=lambda r: types.ImageGenerationResponse.from_json(_json(r)))


def _job(response: httpx.Response) -> types.GenerationJob:
    return types.GenerationJob.from_json(_json(response))


def submit_job(*, kind: str, fields: dict[str, Any], kwargs: dict[str, Any]) -> Call:
    """Every submission carries an Idempotency-Key, so a retry after a lost connection gets
    the job the first attempt created instead of a second one. `idempotency_key=` sets it."""
    extra = dict(kwargs)
    key = extra.pop("idempotency_key", None) or f"ember-python-{uuid.uuid4().hex}"
    return Call("POST", f"/v1/{kind}/generations", json=_body(fields, extra), parse=_job,
                headers={"Idempotency-Key": str(key)})


def generation_status(*, job_id: str) -> Call:
    return Call("GET", f"/v1/generations/{quote(job_id, safe='')}", parse=_job)


def cancel_generation(*, job_id: str) -> Call:
    return Call("POST", f"/v1/generations/{quote(job_id, safe='')}/cancel", parse=_job)


def moderation(*, model: str, input: str | list[str], kwargs: dict[str, Any]) -> Call:
    return Call("POST", "/v1/moderations", json=_body({"model": model, "input": input}, kwargs),
                parse=lambda r: types.ModerationResponse.from_json(_json(r)))


def rerank(*, model: str, query: str, documents: Sequence[str | dict[str, Any]],
           top_n: int | None, kwargs: dict[str, Any]) -> Call:
    """Documents come back with each result (`return_documents` defaults to true here; the
    SDK's `RerankResult.document` expects them); pass `return_documents=False` to skip."""
    body = _body({"model": model, "query": query, "documents": list(documents), "top_n": top_n,
                  "return_documents": True}, kwargs)
    return Call("POST", "/v1/rerank", json=body,
                parse=lambda r: types.RerankResponse.from_json(_json(r)))


def connection_error(error: httpx.TransportError, base_url: str) -> APIConnectionError:
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return APITimeoutError(f"The ember server at {base_url} did not answer in time "
                               f"({type(error).__name__}).")
    return APIConnectionError(f"Could not reach the ember server at {base_url}: "
                              f"{type(error).__name__}: {error}")

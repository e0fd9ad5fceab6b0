"""The asyncio client: `await AsyncEmber().ai.inference.<method>(...)`, the same surface as
`Ember`, with `async for` over streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from types import TracebackType
from typing import Any, BinaryIO, Generic, Literal, TypeVar, overload

import httpx

from ember.client import _base
from ember.client.errors import error_from_response
from ember.client.types import (
    ChatCompletion,
    ChatMessage,
    Completion,
    EmbeddingResponse,
    GenerationJob,
    ImageGenerationResponse,
    ModerationResponse,
    RerankResponse,
    SpeechResponse,
    StreamChunk,
    TranscriptionResponse,
)

T = TypeVar("T")


class AsyncStream(Generic[T]):
    """The chunks of a streamed reply, as they arrive (`async for`). Iterating to the end (or
    `await close()`, or leaving an `async with` block) releases the connection; closing early
    stops the generation."""

    def __init__(self, response: httpx.Response, parse_frame: _base.FrameParser,
                 base_url: str) -> None:
        self.response = response
        self._parse_frame = parse_frame
        self._base_url = base_url
        self._chunks = self._iterate()

    async def _iterate(self) -> AsyncGenerator[T, None]:
        decoder = _base.SSEDecoder()
        try:
            async for line in self.response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                frame = _base.event_frame(data, self.response.status_code)
                if frame is None:
                    return
                yield self._parse_frame(frame)
            # A stream cut off without [DONE] (a proxy, say): its last event still counts.
            data = decoder.flush()
            frame = _base.event_frame(data, self.response.status_code) if data else None
            if frame is not None:
                yield self._parse_frame(frame)
        except httpx.TransportError as error:
            raise _base.connection_error(error, self._base_url) from error
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await anext(self._chunks)

    async def close(self) -> None:
        await self._chunks.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncEmber:
    """The asyncio twin of `Ember`, with the same options; `http_client` is an
    `httpx.AsyncClient` (an `httpx.ASGITransport` as `transport` drives an app in-process)."""

    def __init__(self, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = _base.DEFAULT_TIMEOUT_S,
                 max_retries: int = _base.DEFAULT_MAX_RETRIES,
                 http_client: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = _base.resolve_base_url(base_url)
        self.api_key = _base.resolve_api_key(api_key)
        self.timeout = _base.make_timeout(timeout)
        self.max_retries = max_retries
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport, timeout=self.timeout)
        self.ai = AsyncAI(AsyncInference(self))

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncEmber:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    async def _send(self, call: _base.Call) -> Any:
        retries_done = 0
        while True:
            request = self._http.build_request(
                call.method, self.base_url + call.path, json=call.json, data=call.data,
                files=call.files, headers={**_base.request_headers(self.api_key), **call.headers},
                timeout=self.timeout,
            )
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as error:
                if retries_done < self.max_retries and _base.is_retryable_transport_error(error):
                    await asyncio.sleep(_base.backoff_delay(retries_done, None))
                    retries_done += 1
                    continue
                raise _base.connection_error(error, self.base_url) from error
            if call.stream_frame is not None and response.status_code < 400:
                return AsyncStream(response, call.stream_frame, self.base_url)
            try:
                await response.aread()
            except httpx.TransportError as error:
                raise _base.connection_error(error, self.base_url) from error
            finally:
                await response.aclose()
            if response.status_code < 400:
                return call.parse(response)
            api_error = error_from_response(response)
            if retries_done < self.max_retries and _base.is_retryable(api_error):
                await asyncio.sleep(_base.backoff_delay(
                    retries_done, _base.retry_after_seconds(response.headers)))
                retries_done += 1
                continue
            raise api_error


class AsyncAI:
    def __init__(self, inference: AsyncInference) -> None:
        self.inference = inference


class AsyncInference:
    """Every method of the gateway SDK's `client.ai.inference`, awaitable."""

    def __init__(self, client: AsyncEmber) -> None:
        self._client = client

    @overload
    async def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage],
        stream: Literal[False] = False, max_tokens: int | None = None,
        temperature: float = 0.7, top_p: float = 1.0, stop: str | list[str] | None = None,
        **kwargs: Any,
    ) -> ChatCompletion: ...

    @overload
    async def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage],
        stream: Literal[True], max_tokens: int | None = None, temperature: float = 0.7,
        top_p: float = 1.0, stop: str | list[str] | None = None, **kwargs: Any,
    ) -> AsyncStream[StreamChunk]: ...

    @overload
    async def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage], stream: bool,
        max_tokens: int | None = None, temperature: float = 0.7, top_p: float = 1.0,
        stop: str | list[str] | None = None, **kwargs: Any,
    ) -> ChatCompletion | AsyncStream[StreamChunk]: ...

    async def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage],
        stream: bool = False, max_tokens: int | None = None, temperature: float = 0.7,
        top_p: float = 1.0, stop: str | list[str] | None = None, **kwargs: Any,
    ) -> ChatCompletion | AsyncStream[StreamChunk]:
        """POST /v1/chat/completions. `stream=True` returns an async iterator of
        `StreamChunk`."""
        return await self._client._send(_base.chat_completion(
            model=model, messages=messages, stream=stream, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, stop=stop, kwargs=kwargs))

    @overload
    async def completion(
        self, *, model: str, prompt: str, stream: Literal[False] = False,
        max_tokens: int | None = None, temperature: float = 0.7, **kwargs: Any,
    ) -> Completion: ...

    @overload
    async def completion(
        self, *, model: str, prompt: str, stream: Literal[True], max_tokens: int | None = None,
        temperature: float = 0.7, **kwargs: Any,
    ) -> AsyncStream[StreamChunk]: ...

    @overload
    async def completion(
        self, *, model: str, prompt: str, stream: bool, max_tokens: int | None = None,
        temperature: float = 0.7, **kwargs: Any,
    ) -> Completion | AsyncStream[StreamChunk]: ...

    async def completion(
        self, *, model: str, prompt: str, stream: bool = False, max_tokens: int | None = None,
        temperature: float = 0.7, **kwargs: Any,
    ) -> Completion | AsyncStream[StreamChunk]:
        """POST /v1/completions. `stream=True` returns an async iterator of `StreamChunk`."""
        return await self._client._send(_base.completion(
            model=model, prompt=prompt, stream=stream, max_tokens=max_tokens,
            temperature=temperature, kwargs=kwargs))

    async def embedding(self, *, model: str, input: str | list[str],
                        **kwargs: Any) -> EmbeddingResponse:
        """POST /v1/embeddings."""
        return await self._client._send(_base.embedding(model=model, input=input, kwargs=kwargs))

    async def speech(self, *, model: str, input: str, voice: str = "alloy",
                     response_format: str = "mp3", speed: float = 1.0,
                     **kwargs: Any) -> SpeechResponse:
        """POST /v1/audio/speech: the whole audio file."""
        return await self._client._send(_base.speech(
            model=model, input=input, voice=voice, response_format=response_format,
            speed=speed, kwargs=kwargs))

    async def transcription(self, *, model: str, file: bytes | BinaryIO,
                            filename: str = "audio.mp3", language: str | None = None,
                            prompt: str | None = None, response_format: str = "json",
                            temperature: float = 0.0, **kwargs: Any) -> TranscriptionResponse:
        """POST /v1/audio/transcriptions (multipart)."""
        fields = {"language": language, "prompt": prompt, "response_format": response_format,
                  "temperature": temperature}
        return await self._client._send(_base.transcription(
            task="transcribe", model=model, file=file, filename=filename, fields=fields,
            kwargs=kwargs))

    async def translation(self, *, model: str, file: bytes | BinaryIO,
                          filename: str = "audio.mp3", **kwargs: Any) -> TranscriptionResponse:
        """POST /v1/audio/translations (multipart): speech in any language → English text."""
        return await self._client._send(_base.transcription(
            task="translate", model=model, file=file, filename=filename, fields={},
            kwargs=kwargs))

    async def image_generation(self, *, model: str, prompt: str, n: int = 1,
                               size: str = "1024x1024", quality: str = "standard",
                               response_format: str = "url",
                               **kwargs: Any) -> ImageGenerationResponse:
        """POST /v1/images/generations."""
        return await self._client._send(_base.image_generation(
            model=model, prompt=prompt, n=n, size=size, quality=quality,
            response_format=response_format, kwargs=kwargs))

    async def video_generation(self, *, model: str, prompt: str, duration: int | None = None,
                               resolution: str | None = None, **kwargs: Any) -> GenerationJob:
        """POST /v1/video/generations: submits a job and returns it at once."""
        fields = {"model": model, "prompt": prompt, "duration": duration,
                  "resolution": resolution}
        return await self._client._send(
            _base.submit_job(kind="video", fields=fields, kwargs=kwargs))

    async def music_generation(self, *, model: str, prompt: str, duration: int | None = None,
                               **kwargs: Any) -> GenerationJob:
        """POST /v1/music/generations: submits a job and returns it at once."""
        fields = {"model": model, "prompt": prompt, "duration": duration}
        return await self._client._send(
            _base.submit_job(kind="music", fields=fields, kwargs=kwargs))

    async def generation_status(self, *, job_id: str) -> GenerationJob:
        """GET /v1/generations/{job_id}."""
        return await self._client._send(_base.generation_status(job_id=job_id))

    async def cancel_generation(self, *, job_id: str) -> GenerationJob:
        """POST /v1/generations/{job_id}/cancel: a running job stops at its next step."""
        return await self._client._send(_base.cancel_generation(job_id=job_id))

    async def moderation(self, *, model: str, input: str | list[str],
                         **kwargs: Any) -> ModerationResponse:
        """POST /v1/moderations."""
        return await self._client._send(
            _base.moderation(model=model, input=input, kwargs=kwargs))

    async def rerank(self, *, model: str, query: str, documents: Sequence[str | dict[str, Any]],
                     top_n: int | None = None, **kwargs: Any) -> RerankResponse:
        """POST /v1/rerank: results most relevant first, each with its document."""
        return await self._client._send(_base.rerank(
            model=model, query=query, documents=documents, top_n=top_n, kwargs=kwargs))

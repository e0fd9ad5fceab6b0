"""The blocking client: `Ember().ai.inference.<method>(...)`."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
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


class Stream(Generic[T]):
    """The chunks of a streamed reply, as they arrive. Iterating to the end (or `close()`, or
    leaving a `with` block) releases the connection; closing early stops the generation."""

    def __init__(self, response: httpx.Response, parse_frame: _base.FrameParser,
                 base_url: str) -> None:
        self.response = response
        self._parse_frame = parse_frame
        self._base_url = base_url
        self._chunks = self._iterate()

    def _iterate(self) -> Generator[T, None, None]:
        decoder = _base.SSEDecoder()
        try:
            for line in self.response.iter_lines():
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
            self.response.close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Ember:
    """A client for an ember server.

    `base_url` (else `EMBER_BASE_URL`, else http://127.0.0.1:8000; a trailing `/v1` is
    accepted) and `api_key` (else `EMBER_API_KEY`) say where and as whom; `timeout` is seconds
    per request; 429s, transient 503s and connection failures are retried up to `max_retries`
    times, waiting as `Retry-After` says or backing off exponentially. `http_client` (an
    `httpx.Client` the caller keeps and closes) or `transport` replace the default connection.
    """

    def __init__(self, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = _base.DEFAULT_TIMEOUT_S,
                 max_retries: int = _base.DEFAULT_MAX_RETRIES,
                 http_client: httpx.Client | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = _base.resolve_base_url(base_url)
        self.api_key = _base.resolve_api_key(api_key)
        self.timeout = _base.make_timeout(timeout)
        self.max_retries = max_retries
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=self.timeout)
        self.ai = AI(Inference(self))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Ember:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _send(self, call: _base.Call) -> Any:
        retries_done = 0
        while True:
            request = self._http.build_request(
                call.method, self.base_url + call.path, json=call.json, data=call.data,
                files=call.files, headers={**_base.request_headers(self.api_key), **call.headers},
                timeout=self.timeout,
            )
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as error:
                if retries_done < self.max_retries and _base.is_retryable_transport_error(error):
                    time.sleep(_base.backoff_delay(retries_done, None))
                    retries_done += 1
                    continue
                raise _base.connection_error(error, self.base_url) from error
            if call.stream_frame is not None and response.status_code < 400:
                return Stream(response, call.stream_frame, self.base_url)
            try:
                response.read()
            except httpx.TransportError as error:
                raise _base.connection_error(error, self.base_url) from error
            finally:
                response.close()
            if response.status_code < 400:
                return call.parse(response)
            api_error = error_from_response(response)
            if retries_done < self.max_retries and _base.is_retryable(api_error):
                time.sleep(_base.backoff_delay(
                    retries_done, _base.retry_after_seconds(response.headers)))
                retries_done += 1
                continue
            raise api_error


class AI:
    def __init__(self, inference: Inference) -> None:
        self.inference = inference


class Inference:
    """Every method of the gateway SDK's `client.ai.inference`, on ember's endpoints."""

    def __init__(self, client: Ember) -> None:
        self._client = client

    @overload
    def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage],
        stream: Literal[False] = False, max_tokens: int | None = None,
        temperature: float = 0.7, top_p: float = 1.0, stop: str | list[str] | None = None,
        **kwargs: Any,
    ) -> ChatCompletion: ...

    @overload
    def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage],
        stream: Literal[True], max_tokens: int | None = None, temperature: float = 0.7,
        top_p: float = 1.0, stop: str | list[str] | None = None, **kwargs: Any,
    ) -> Stream[StreamChunk]: ...

    @overload
    def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage], stream: bool,
        max_tokens: int | None = None, temperature: float = 0.7, top_p: float = 1.0,
        stop: str | list[str] | None = None, **kwargs: Any,
    ) -> ChatCompletion | Stream[StreamChunk]: ...

    def chat_completion(
        self, *, model: str, messages: Sequence[dict[str, Any] | ChatMessage],
        stream: bool = False, max_tokens: int | None = None, temperature: float = 0.7,
        top_p: float = 1.0, stop: str | list[str] | None = None, **kwargs: Any,
    ) -> ChatCompletion | Stream[StreamChunk]:
        """POST /v1/chat/completions. `stream=True` returns an iterator of `StreamChunk`."""
        return self._client._send(_base.chat_completion(
            model=model, messages=messages, stream=stream, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, stop=stop, kwargs=kwargs))

    @overload
    def completion(
        self, *, model: str, prompt: str, stream: Literal[False] = False,
        max_tokens: int | None = None, temperature: float = 0.7, **kwargs: Any,
    ) -> Completion: ...

    @overload
    def completion(
        self, *, model: str, prompt: str, stream: Literal[True], max_tokens: int | None = None,
        temperature: float = 0.7, **kwargs: Any,
    ) -> Stream[StreamChunk]: ...

    @overload
    def completion(
        self, *, model: str, prompt: str, stream: bool, max_tokens: int | None = None,
        temperature: float = 0.7, **kwargs: Any,
    ) -> Completion | Stream[StreamChunk]: ...

    def completion(
        self, *, model: str, prompt: str, stream: bool = False, max_tokens: int | None = None,
        temperature: float = 0.7, **kwargs: Any,
    ) -> Completion | Stream[StreamChunk]:
        """POST /v1/completions. `stream=True` returns an iterator of `StreamChunk`."""
        return self._client._send(_base.completion(
            model=model, prompt=prompt, stream=stream, max_tokens=max_tokens,
            temperature=temperature, kwargs=kwargs))

    def embedding(self, *, model: str, input: str | list[str], **kwargs: Any) -> EmbeddingResponse:
        """POST /v1/embeddings."""
        return self._client._send(
            _base.embedding(model=model, input=input, kwargs=kwargs))

    def speech(self, *, model: str, input: str, voice: str = "alloy",
               response_format: str = "mp3", speed: float = 1.0, **kwargs: Any) -> SpeechResponse:
        """POST /v1/audio/speech: the whole audio file."""
        return self._client._send(_base.speech(
            model=model, input=input, voice=voice, response_format=response_format,
            speed=speed, kwargs=kwargs))

    def transcription(self, *, model: str, file: bytes | BinaryIO, filename: str = "audio.mp3",
                      language: str | None = None, prompt: str | None = None,
                      response_format: str = "json", temperature: float = 0.0,
                      **kwargs: Any) -> TranscriptionResponse:
        """POST /v1/audio/transcriptions (multipart)."""
        fields = {"language": language, "prompt": prompt, "response_format": response_format,
                  "temperature": temperature}
        return self._client._send(_base.transcription(
            task="transcribe", model=model, file=file, filename=filename, fields=fields,
            kwargs=kwargs))

    def translation(self, *, model: str, file: bytes | BinaryIO, filename: str = "audio.mp3",
                    **kwargs: Any) -> TranscriptionResponse:
        """POST /v1/audio/translations (multipart): speech in any language → English text."""
        return self._client._send(_base.transcription(
            task="translate", model=model, file=file, filename=filename, fields={},
            kwargs=kwargs))

    def image_generation(self, *, model: str, prompt: str, n: int = 1, size: str = "1024x1024",
                         quality: str = "standard", response_format: str = "url",
                         **kwargs: Any) -> ImageGenerationResponse:
        """POST /v1/images/generations."""
        return self._client._send(_base.image_generation(
            model=model, prompt=prompt, n=n, size=size, quality=quality,
            response_format=response_format, kwargs=kwargs))

    def video_generation(self, *, model: str, prompt: str, duration: int | None = None,
                         resolution: str | None = None, **kwargs: Any) -> GenerationJob:
        """POST /v1/video/generations: submits a job and returns it at once (poll it with
        `generation_status`)."""
        fields = {"model": model, "prompt": prompt, "duration": duration,
                  "resolution": resolution}
        return self._client._send(
            _base.submit_job(kind="video", fields=fields, kwargs=kwargs))

    def music_generation(self, *, model: str, prompt: str, duration: int | None = None,
                         **kwargs: Any) -> GenerationJob:
        """POST /v1/music/generations: submits a job and returns it at once."""
        fields = {"model": model, "prompt": prompt, "duration": duration}
        return self._client._send(
            _base.submit_job(kind="music", fields=fields, kwargs=kwargs))

    def generation_status(self, *, job_id: str) -> GenerationJob:
        """GET /v1/generations/{job_id}."""
        return self._client._send(
            _base.generation_status(job_id=job_id))

    def cancel_generation(self, *, job_id: str) -> GenerationJob:
        """POST /v1/generations/{job_id}/cancel: a running job stops at its next step."""
        return self._client._send(
            _base.cancel_generation(job_id=job_id))

    def moderation(self, *, model: str, input: str | list[str],
                   **kwargs: Any) -> ModerationResponse:
        """POST /v1/moderations."""
        return self._client._send(
            _base.moderation(model=model, input=input, kwargs=kwargs))

    def rerank(self, *, model: str, query: str, documents: Sequence[str | dict[str, Any]],
               top_n: int | None = None, **kwargs: Any) -> RerankResponse:
        """POST /v1/rerank: results most relevant first, each with its document."""
        return self._client._send(_base.rerank(
            model=model, query=query, documents=documents, top_n=top_n, kwargs=kwargs))

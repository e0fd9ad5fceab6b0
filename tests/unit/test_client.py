"""The Python client over an httpx.MockTransport: what goes on the wire for each SDK method,
error mapping, retries with backoff and Retry-After, streaming. (The client against the real
app: tests/integration/test_client_inprocess.py and tests/e2e/test_client.py.)"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from ember import AsyncEmber, Ember
from ember.client import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ChatMessage,
    ConflictError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from ember.client._base import (
    INITIAL_BACKOFF_S,
    MAX_BACKOFF_S,
    backoff_delay,
    retry_after_seconds,
)

Handler = Callable[[httpx.Request], httpx.Response]


def error_body(message: str, code: str | None = None, param: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Recorder:
    """Answers each request with the next scripted response and keeps the requests."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        self.times.append(time.monotonic())
        answer = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


def client_for(handler: Handler, **options: Any) -> Ember:
    options.setdefault("base_url", "http://ember.test")
    return Ember(transport=httpx.MockTransport(handler), **options)


CHAT_REPLY = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
}


# -- configuration -------------------------------------------------------------------------------


def test_base_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_BASE_URL", "http://gpu-box:9000/v1/")
    monkeypatch.setenv("EMBER_API_KEY", "secret")
    recorder = Recorder(httpx.Response(200, json=CHAT_REPLY))
    with Ember(transport=httpx.MockTransport(recorder)) as client:
        client.ai.inference.chat_completion(model="m", messages=[{"role": "user", "content": "x"}])
    request = recorder.requests[0]
    assert str(request.url) == "http://gpu-box:9000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer secret"
    assert request.headers["user-agent"].startswith("ember-python/")


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBER_BASE_URL", raising=False)
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    recorder = Recorder(httpx.Response(200, json=CHAT_REPLY))
    client = Ember(transport=httpx.MockTransport(recorder))
    client.ai.inference.chat_completion(model="m", messages=[{"role": "user", "content": "x"}])
    client.close()
    assert str(recorder.requests[0].url) == "http://127.0.0.1:8000/v1/chat/completions"
    assert "authorization" not in recorder.requests[0].headers


# -- what each method sends and returns ----------------------------------------------------------


def test_chat_sends_the_sdk_defaults_and_maps_the_reply() -> None:
    recorder = Recorder(httpx.Response(200, json=CHAT_REPLY))
    client = client_for(recorder)
    reply = client.ai.inference.chat_completion(
        model="gpt-4o-mini",
        messages=[ChatMessage(role="system", content="Be brief."),
                  {"role": "user", "content": "Capital of France?"}],
        seed=7, top_k=20,
    )
    assert recorder.body() == {
        "model": "gpt-4o-mini", "temperature": 0.7, "top_p": 1.0, "seed": 7, "top_k": 20,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Capital of France?"}],
    }
    assert reply.content == "Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.role == "assistant"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (7, 2, 9)
    assert (reply.id, reply.model, reply.created) == ("chatcmpl-1", "gpt-4o-mini", 1700000000)


def test_completion_maps_text_onto_message_content() -> None:
    recorder = Recorder(httpx.Response(200, json={
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": " a tuple is immutable", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }))
    reply = client_for(recorder).ai.inference.completion(model="m", prompt="p", max_tokens=5)
    assert recorder.body() == {"model": "m", "prompt": "p", "max_tokens": 5, "temperature": 0.7}
    assert reply.content == " a tuple is immutable"
    assert reply.choices[0].finish_reason == "length" and reply.usage.total_tokens == 8


def sse(*frames: dict[str, Any] | str) -> bytes:
    lines = [f"data: {f if isinstance(f, str) else json.dumps(f)}\n\n" for f in frames]
    return ": keep-alive\n\n".join(lines).encode()


def chat_frame(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_chat_stream_yields_chunks_with_content() -> None:
    body = sse(chat_frame({"role": "assistant", "content": ""}), chat_frame({"content": "Hel"}),
               chat_frame({"content": "lo"}), chat_frame({}, "stop"),
               {"id": "c1", "model": "m", "choices": [],
                "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
               "[DONE]")
    recorder = Recorder(httpx.Response(200, content=body,
                                       headers={"content-type": "text/event-stream"}))
    chunks = list(client_for(recorder).ai.inference.chat_completion(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert recorder.body()["stream"] is True
    assert recorder.body()["stream_options"] == {"include_usage": True}
    assert "".join(c.content for c in chunks) == "Hello"
    assert chunks[0].role == "assistant"
    assert [c.finish_reason for c in chunks] == [None, None, None, "stop", None]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6
    assert all(c.id == "c1" and c.model == "m" for c in chunks)


def test_an_error_frame_mid_stream_raises_the_servers_message() -> None:
    body = sse(chat_frame({"content": "Hel"}),
               error_body("Request waited too long", "deadline_exceeded", kind="server_error"),
               "[DONE]")
    client = client_for(Recorder(httpx.Response(200, content=body)))
    stream = client.ai.inference.chat_completion(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert next(stream).content == "Hel"
    with pytest.raises(APIError) as caught:
        next(stream)
    assert caught.value.message == "Request waited too long"
    assert caught.value.code == "deadline_exceeded"


def test_a_refused_stream_raises_at_the_call() -> None:
    client = client_for(Recorder(httpx.Response(400, json=error_body(
        "Invalid value for 'temperature'", "invalid_value", "temperature"))))
    with pytest.raises(BadRequestError) as caught:
        client.ai.inference.completion(model="m", prompt="p", stream=True, temperature=9)
    assert caught.value.param == "temperature"


def test_completion_stream_reads_text() -> None:
    frames = [{"id": "x", "model": "m", "choices": [{"index": 0, "text": t,
                                                     "finish_reason": f}]}
              for t, f in (("a", None), ("b", None), ("", "length"))]
    client = client_for(Recorder(httpx.Response(200, content=sse(*frames, "[DONE]"))))
    with client.ai.inference.completion(model="m", prompt="p", stream=True) as stream:
        chunks = list(stream)
    assert [c.content for c in chunks] == ["a", "b", ""]
    assert chunks[-1].finish_reason == "length"


def test_a_stream_cut_off_without_done_keeps_its_last_event() -> None:
    body = b'data: {"id": "x", "model": "m", "choices": [{"index": 0, "text": "a"}]}\n\n' \
           b'data: {"id": "x", "model": "m", "choices": [{"index": 0, "text": "b"}]}'
    client = client_for(Recorder(httpx.Response(200, content=body)))
    stream = client.ai.inference.completion(model="m", prompt="p", stream=True)
    assert [chunk.content for chunk in stream] == ["a", "b"]


def test_embedding_vectors_come_back_in_input_order() -> None:
    recorder = Recorder(httpx.Response(200, json={
        "object": "list", "model": "text-embedding-ada-002",
        "data": [{"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
                 {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }))
    reply = client_for(recorder).ai.inference.embedding(
        model="text-embedding-ada-002", input=["a", "b"], dimensions=2)
    assert recorder.body() == {"model": "text-embedding-ada-002", "input": ["a", "b"],
                               "dimensions": 2}
    assert reply.embeddings == [[1.0, 0.0], [0.0, 1.0]]
    assert reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens == 0


def test_speech_returns_the_bytes_and_media_type() -> None:
    recorder = Recorder(httpx.Response(200, content=b"ID3...",
                                       headers={"content-type": "audio/mpeg"}))
    reply = client_for(recorder).ai.inference.speech(model="tts-1", input="Hello")
    assert recorder.body() == {"model": "tts-1", "input": "Hello", "voice": "alloy",
                               "response_format": "mp3", "speed": 1.0}
    assert (reply.content, reply.content_type) == (b"ID3...", "audio/mpeg")


def test_transcription_is_multipart_and_asks_for_segments() -> None:
    recorder = Recorder(httpx.Response(200, json={
        "task": "transcribe", "language": "english", "duration": 2.5, "text": "Hello there.",
        "segments": [{"id": 0, "start": 0.0, "end": 2.5, "text": " Hello there."}],
    }))
    reply = client_for(recorder).ai.inference.transcription(
        model="whisper-1", file=b"RIFF....", filename="hello.wav", language="en",
        vad_filter=True, timestamp_granularities=["segment"])
    request = recorder.requests[0]
    assert request.url.path == "/v1/audio/transcriptions"
    form = request.content.decode("latin-1")
    for name, value in (("model", "whisper-1"), ("language", "en"), ("temperature", "0.0"),
                        ("response_format", "verbose_json"), ("vad_filter", "true"),
                        ("timestamp_granularities[]", "segment")):
        assert f'name="{name}"\r\n\r\n{value}\r\n' in form, name
    assert 'name="file"; filename="hello.wav"\r\nContent-Type: audio/' in form
    assert reply.text == "Hello there." and reply.language == "english"
    assert reply.duration == 2.5
    assert reply.segments is not None and reply.segments[0].end == 2.5


def test_transcription_text_formats_return_the_text_as_is() -> None:
    srt = "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n"
    recorder = Recorder(httpx.Response(200, text=srt, headers={"content-type": "text/plain"}))
    with open(__file__, "rb") as handle:  # any BinaryIO works as `file`
        reply = client_for(recorder).ai.inference.translation(
            model="whisper-1", file=handle, response_format="srt")
    assert 'name="response_format"\r\n\r\nsrt' in recorder.requests[0].content.decode("latin-1")
    assert recorder.requests[0].url.path == "/v1/audio/translations"
    assert reply.text == srt and reply.segments is None


def test_image_generation_sends_the_sdk_defaults() -> None:
    recorder = Recorder(httpx.Response(200, json={
        "created": 5, "data": [{"url": "http://x/v1/files/f/content", "revised_prompt": "p",
                                "seed": 3}]}))
    reply = client_for(recorder).ai.inference.image_generation(model="dall-e-3", prompt="p",
                                                               seed=3)
    assert recorder.body() == {"model": "dall-e-3", "prompt": "p", "n": 1, "size": "1024x1024",
                               "quality": "standard", "response_format": "url", "seed": 3}
    image = reply.data[0]
    assert (image.url, image.b64_json, image.revised_prompt, image.seed) == (
        "http://x/v1/files/f/content", None, "p", 3)


JOB = {"object": "generation.job", "job_id": "gen_1", "id": "gen_1", "kind": "video",
       "model": "wan2.1-t2v-1.3b", "provider": "ember", "status": "queued", "progress": 0,
       "created_at": 100, "created": 100, "result": None, "error": None}


def test_job_statuses_use_the_sdk_names_and_keep_embers() -> None:
    recorder = Recorder(httpx.Response(202, json=JOB))
    client = client_for(recorder)
    job = client.ai.inference.video_generation(model="text-to-video", prompt="p", duration=5)
    assert recorder.body() == {"model": "text-to-video", "prompt": "p", "duration": 5}
    assert (job.job_id, job.status, job.ember_status, job.progress, job.created, job.provider,
            job.model) == ("gen_1", "pending", "queued", 0, 100, "ember", "wan2.1-t2v-1.3b")
    recorder.responses = [httpx.Response(200, json={**JOB, "status": "running",
                                                     "progress": 40})]
    assert client.ai.inference.generation_status(job_id="gen_1").status == "processing"
    recorder.responses = [httpx.Response(200, json={**JOB, "status": "failed",
                                                     "error": {"message": "out of memory"}})]
    failed = client.ai.inference.cancel_generation(job_id="gen_1")
    assert (failed.status, failed.error) == ("failed", "out of memory")
    assert [r.url.path for r in recorder.requests] == [
        "/v1/video/generations", "/v1/generations/gen_1", "/v1/generations/gen_1/cancel"]
    assert [r.method for r in recorder.requests] == ["POST", "GET", "POST"]


def test_a_job_submission_keeps_its_idempotency_key_across_retries() -> None:
    recorder = Recorder(httpx.ConnectError("refused"), httpx.Response(202, json=JOB))
    client = client_for(recorder)
    client.ai.inference.music_generation(model="musicgen", prompt="p", duration=30)
    keys = [r.headers["idempotency-key"] for r in recorder.requests]
    assert len(keys) == 2 and keys[0] == keys[1]
    client.ai.inference.music_generation(model="musicgen", prompt="p", idempotency_key="mine")
    assert recorder.requests[-1].headers["idempotency-key"] == "mine"
    assert "idempotency_key" not in recorder.body()
    assert recorder.requests[-1].url.path == "/v1/music/generations"


def test_moderation_and_rerank_map_the_results() -> None:
    recorder = Recorder(httpx.Response(200, json={
        "id": "modr-1", "model": "profanity-check",
        "results": [{"flagged": True, "categories": {"harassment": True, "hate": False},
                     "category_scores": {"harassment": 0.97, "hate": 0.0}}]}))
    client = client_for(recorder)
    verdict = client.ai.inference.moderation(model="omni-moderation-latest", input=["x"])
    assert recorder.body() == {"model": "omni-moderation-latest", "input": ["x"]}
    assert verdict.results[0].flagged and verdict.results[0].category_scores["harassment"] == 0.97
    recorder.responses = [httpx.Response(200, json={
        "id": "rerank-1", "model": "minilm-biencoder-rerank", "usage": {"total_tokens": 12},
        "results": [{"index": 1, "relevance_score": 0.8, "document": {"text": "b"}}]})]
    ranked = client.ai.inference.rerank(model="rerank", query="q", documents=["a", "b"], top_n=1)
    assert recorder.body() == {"model": "rerank", "query": "q", "documents": ["a", "b"],
                               "top_n": 1, "return_documents": True}
    assert ranked.results[0].index == 1 and ranked.results[0].document == {"text": "b"}
    assert ranked.meta == {"usage": {"total_tokens": 12}}
    client.ai.inference.rerank(model="rerank", query="q", documents=["a"],
                               return_documents=False)
    assert recorder.body()["return_documents"] is False and "top_n" not in recorder.body()


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error_class"), [
    (400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError),
    (404, NotFoundError), (409, ConflictError), (413, PayloadTooLargeError),
    (429, RateLimitError), (500, InternalServerError), (503, ServiceUnavailableError),
    (504, GatewayTimeoutError), (418, APIError),
])
def test_each_status_raises_its_own_error_with_the_envelope(
    status: int, error_class: type[APIError]
) -> None:
    body = error_body("Model 'nope' not found", "model_not_found", "model")
    client = client_for(Recorder(httpx.Response(status, json=body)), max_retries=0)
    with pytest.raises(error_class) as caught:
        client.ai.inference.embedding(model="nope", input="x")
    error = caught.value
    assert type(error) is error_class
    assert (error.status_code, error.message, error.type, error.param, error.code) == (
        status, "Model 'nope' not found", "invalid_request_error", "model", "model_not_found")
    assert "Model 'nope' not found" in str(error) and str(status) in str(error)


def test_a_body_that_is_not_an_envelope_still_gives_the_status() -> None:
    client = client_for(Recorder(httpx.Response(502, text="Bad gateway from the proxy")))
    with pytest.raises(InternalServerError) as caught:
        client.ai.inference.embedding(model="m", input="x")
    assert caught.value.status_code == 502
    assert caught.value.message == "Bad gateway from the proxy"


# -- retries -------------------------------------------------------------------------------------


def test_429_is_retried_after_the_servers_retry_after() -> None:
    busy = httpx.Response(429, json=error_body("Queue full", "rate_limit_exceeded"),
                          headers={"Retry-After": "0.3"})
    recorder = Recorder(busy, httpx.Response(200, json=CHAT_REPLY))
    reply = client_for(recorder).ai.inference.chat_completion(
        model="m", messages=[{"role": "user", "content": "x"}])
    assert reply.content == "Paris."
    assert len(recorder.requests) == 2
    assert recorder.times[1] - recorder.times[0] >= 0.3


def test_retries_stop_at_max_retries_and_raise_the_last_error() -> None:
    busy = httpx.Response(429, json=error_body("Queue full", "rate_limit_exceeded"),
                          headers={"Retry-After": "0"})
    recorder = Recorder(busy)
    with pytest.raises(RateLimitError) as caught:
        client_for(recorder, max_retries=3).ai.inference.embedding(model="m", input="x")
    assert len(recorder.requests) == 4
    assert caught.value.message == "Queue full"
    recorder.requests.clear()
    with pytest.raises(RateLimitError):
        client_for(recorder, max_retries=0).ai.inference.embedding(model="m", input="x")
    assert len(recorder.requests) == 1


def test_without_retry_after_the_backoff_grows() -> None:
    loading = httpx.Response(503, json=error_body("still loading", None, kind="server_error"))
    recorder = Recorder(loading, loading, httpx.Response(200, json=CHAT_REPLY))
    client_for(recorder).ai.inference.chat_completion(
        model="m", messages=[{"role": "user", "content": "x"}])
    first, second = (b - a for a, b in zip(recorder.times, recorder.times[1:], strict=False))
    assert INITIAL_BACKOFF_S * 0.75 <= first < INITIAL_BACKOFF_S * 1.5
    assert second >= 2 * INITIAL_BACKOFF_S * 0.75


def test_a_model_that_is_not_installed_is_not_retried() -> None:
    message = ("Model 'sd-turbo' (stabilityai/sd-turbo on the Hugging Face Hub) is not "
               "downloaded. Fetch it once with: ember pull sd-turbo")
    recorder = Recorder(httpx.Response(
        503, json=error_body(message, "model_unavailable", kind="server_error")))
    with pytest.raises(ServiceUnavailableError) as caught:
        client_for(recorder).ai.inference.image_generation(model="dall-e-3", prompt="p")
    assert len(recorder.requests) == 1
    assert "ember pull sd-turbo" in caught.value.message
    # ... unless the server asks for a retry.
    recorder = Recorder(httpx.Response(503, json=error_body("busy", "model_unavailable"),
                                       headers={"Retry-After": "0"}),
                        httpx.Response(200, json={"created": 1, "data": []}))
    client_for(recorder).ai.inference.image_generation(model="dall-e-3", prompt="p")
    assert len(recorder.requests) == 2


def test_client_errors_are_not_retried() -> None:
    recorder = Recorder(httpx.Response(400, json=error_body("bad", "invalid_value", "n")))
    with pytest.raises(BadRequestError):
        client_for(recorder).ai.inference.image_generation(model="m", prompt="p", n=99)
    assert len(recorder.requests) == 1


def test_connection_failures_are_retried_then_raised() -> None:
    recorder = Recorder(httpx.ConnectError("connection refused"))
    with pytest.raises(APIConnectionError) as caught:
        client_for(recorder, max_retries=1).ai.inference.embedding(model="m", input="x")
    assert len(recorder.requests) == 2
    assert "http://ember.test" in caught.value.message
    assert not isinstance(caught.value, APITimeoutError)


def test_a_read_timeout_is_raised_without_running_the_request_twice() -> None:
    recorder = Recorder(httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError):
        client_for(recorder).ai.inference.chat_completion(
            model="m", messages=[{"role": "user", "content": "x"}])
    assert len(recorder.requests) == 1


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert retry_after_seconds(httpx.Headers({})) is None
    assert retry_after_seconds(httpx.Headers({"Retry-After": "soon"})) is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"Retry-After": date}), now=now) == 12.0
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"Retry-After": past}), now=now) == 0.0


def test_backoff_doubles_up_to_its_cap_and_defers_to_retry_after() -> None:
    for retries_done in range(8):
        expected = min(INITIAL_BACKOFF_S * 2**retries_done, MAX_BACKOFF_S)
        assert expected * 0.75 <= backoff_delay(retries_done, None) <= expected
    assert backoff_delay(0, 7.0) == 7.0
    assert backoff_delay(0, 3600.0) <= INITIAL_BACKOFF_S  # an absurd wait is not honoured


# -- the async twin ------------------------------------------------------------------------------


async def test_async_client_retries_streams_and_maps_errors() -> None:
    busy = httpx.Response(429, json=error_body("Queue full", "rate_limit_exceeded"),
                          headers={"Retry-After": "0"})
    stream = httpx.Response(200, content=sse(chat_frame({"content": "Hi"}),
                                             chat_frame({}, "stop"), "[DONE]"))
    recorder = Recorder(busy, stream)
    async with AsyncEmber(base_url="http://ember.test",
                          transport=httpx.MockTransport(recorder)) as client:
        chunks = [chunk async for chunk in await client.ai.inference.chat_completion(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True)]
        assert [c.content for c in chunks] == ["Hi", ""] and chunks[1].finish_reason == "stop"
        assert len(recorder.requests) == 2
        recorder.responses = [httpx.Response(404, json=error_body(
            "No generation job 'gen_x'", "not_found", "job_id"))]
        with pytest.raises(NotFoundError) as caught:
            await client.ai.inference.generation_status(job_id="gen_x")
        assert caught.value.param == "job_id"

"""The `/v1/ai/*` dialect (seed 001) over HTTP on the in-process app with tiny models: every
example of the seed translated to HTTP, then routing, the response cache, idempotency, batch
jobs, deadlines, and bad input answered in the dialect's own error envelope."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.core.audio_codec import decode_audio
from engine.core.settings import Settings
from tests.audio_files import encode_file, espeak_wav
from tests.conftest import Served, serve_in_process

# One step: the seed's 1024x1024 example costs seconds on a CPU even for a toy model.
TINY_DIFFUSION_OPTIONS = {"default_size": [64, 64], "max_side": 1024, "default_steps": 1,
                          "max_steps": 8, "default_guidance": 0.0}


def png(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def speech_mp3(text: str) -> bytes:
    samples = decode_audio(espeak_wav(text), sample_rate=16_000, max_seconds=60)
    return encode_file(samples, 16_000, "mp3", "libmp3lame")


class FileServer:
    """Stands in for the seed's example.com URLs: serves fixed bodies on 127.0.0.1."""

    def __init__(self, files: dict[str, tuple[bytes, str]]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, media_type = files.get(self.path, (b"missing", "text/plain"))
                self.send_response(200 if self.path in files else 404)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    server = FileServer({
        "/photo.jpg": (png(), "image/png"),
        "/clip.mp3": (speech_mp3("Hello world."), "audio/mpeg"),
        "/page.html": (b"<html></html>", "text/html"),
    })
    yield server
    server.httpd.shutdown()


@pytest.fixture(scope="module")
async def ai(make_settings: Callable[..., Settings]) -> AsyncIterator[Served]:
    """The seed's image example asks for 1024x1024: the tiny model is allowed that size."""
    settings = make_settings(
        fetch_allow_private=True, job_workers=2,
        models=[{"id": "tiny-diffusion", "options": TINY_DIFFUSION_OPTIONS},
                # Routing here picks among the tiny models: the real GGUF is not installed.
                {"id": "smollm2-llama", "source": "package:no_such_package"},
                {"id": "qwen2.5-coder-0.5b-instruct", "source": "package:no_such_package"}],
    )
    async with serve_in_process(settings) as served:
        yield served


def sse(text: str) -> list[dict[str, Any]]:
    frames = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]", frames[-1:]
    return [json.loads(frame) for frame in frames[:-1]]


def assert_error(response: httpx.Response, status: int, param: str | None,
                 code: str | None = None) -> dict[str, Any]:
    """The /v1/ai/* envelope: {error: {code, message, param, status, retryable}}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "param", "status", "retryable", "request_id"}, error
    assert error["request_id"] == response.headers["x-request-id"], error
    assert error["status"] == status and error["param"] == param and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


# -- the seed's examples, as HTTP --------------------------------------------------------------


async def test_example_chat_stream_true_reads_content_and_metadata(ai: Served) -> None:
    response = await ai.http.post("/v1/ai/chat", json={
        "messages": "Tell me a 50-word story about a curious raccoon.",
        "prefer": "balanced", "stream": True,
    })
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse(response.text)
    assert all(set(c) >= {"delta", "finish_reason", "index"} for c in chunks)
    content = "".join(c["delta"].get("content") or "" for c in chunks)
    last = chunks[-1]
    assert last["finish_reason"] in ("stop", "length") and content
    assert last["_metadata"]["request_id"].startswith("req_")
    assert last["_metadata"]["vendor"] == "ember" == last["metadata"]["vendor"]
    assert last["usage"]["completion_tokens"] > 0


async def test_example_stream_chunks_carry_delta_content(ai: Served) -> None:
    async with ai.http.stream("POST", "/v1/ai/chat", json={
        "messages": "Tell me a 50-word story about a curious raccoon.", "stream": True,
        "max_tokens": 12,
    }) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    pieces = [c["delta"].get("content") or "" for c in chunks]
    assert len([p for p in pieces if p]) > 1  # token by token, not one blob
    assert chunks[-1]["usage"]["completion_tokens"] <= 12


async def test_example_embed_create(ai: Served) -> None:
    result = (await ai.http.post("/v1/ai/embed",
                                 json={"input": "What animal has clever paws?"})).json()
    data = result.get("data") or result.get("embeddings") or []
    vector = data[0].get("embedding") if data and isinstance(data[0], dict) else data[0]
    assert vector is not None and len(vector) == 384 == result["dimensions"]
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    assert result["model"] == "all-minilm-l6-v2" and result["usage"]["prompt_tokens"] > 0
    assert result["metadata"]["vendor"] == "ember"


async def test_example_image_generate(ai: Served) -> None:
    result = (await ai.http.post("/v1/ai/image", json={
        "prompt": "A watercolor raccoon reading a book under a maple tree",
        "size": "1024x1024", "n": 1, "prefer": "balanced",
    })).json()
    images = result.get("images") or result.get("data") or []
    url = images[0].get("url") if images else None
    assert url and url.startswith("http://ember/v1/files/"), result
    fetched = await ai.http.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (1024, 1024)
    assert base64.b64decode(images[0]["b64"]) == fetched.content


async def test_example_vision(ai: Served, files: FileServer) -> None:
    r = (await ai.http.post("/v1/ai/vision", json={
        "prompt": "What's in this image?", "images": [{"url": f"{files.base}/photo.jpg"}],
    })).json()
    assert isinstance(r.get("content") or r.get("text"), str), r
    assert r["metadata"]["model"] == "tiny-vision"
    assert r["usage"]["prompt_tokens"] > 10  # the image's tokens count


async def test_example_tts(ai: Served) -> None:
    r = (await ai.http.post("/v1/ai/tts", json={
        "input": "Hello from Infrai.", "voice": "alloy", "format": "mp3",
    })).json()
    assert r["format"] == "mp3", r
    audio = await ai.http.get(r.get("audio_url"))
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg"
    samples = decode_audio(audio.content, sample_rate=16_000, max_seconds=60)
    assert 0.5 < len(samples) / 16_000 < 5


async def test_example_asr(ai: Served, files: FileServer) -> None:
    r = (await ai.http.post("/v1/ai/asr", json={
        "audio": {"url": f"{files.base}/clip.mp3"}, "language": "en",
    })).json()
    assert "hello" in r.get("text", "").lower(), r
    assert r["language"] == "en" and r["segments"][0]["end"] > 0


async def test_example_realtime_token_is_501_with_the_reason(ai: Served) -> None:
    response = await ai.http.post("/v1/ai/realtime/token", json={"ttl_seconds": 300})
    error = assert_error(response, 501, None, "not_implemented")
    assert "not built yet" in error["message"]


# -- chat: shapes, routing, cache, idempotency, batch, deadlines -------------------------------


async def test_chat_result_shape_with_a_message_list(ai: Served) -> None:
    r = (await ai.http.post("/v1/ai/chat", json={
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}],
        "max_tokens": 5, "temperature": 0,
    })).json()
    assert set(r) == {"content", "finish_reason", "usage", "metadata", "_metadata"}, r
    assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 5
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 5
    assert r["metadata"] == r["_metadata"]
    assert r["metadata"]["model"] == "tiny-chat"
    assert r["metadata"]["routed_by"] == {"task": "general", "prefer": "balanced"}


async def test_task_and_prefer_route_through_the_table(ai: Served) -> None:
    for task in ("general", "reasoning", "coding", "long_context"):
        for prefer in ("balanced", "cheapest", "smartest"):
            r = (await ai.http.post("/v1/ai/chat", json={
                "messages": "Hi", "task": task, "prefer": prefer, "max_tokens": 2,
            })).json()
            # tiny-chat and tiny-chat-sees share weights; ties go to the default model, and
            # broken-chat (no weights) is never a candidate.
            assert r["metadata"]["model"] == "tiny-chat", r
            assert r["metadata"]["routed_by"] == {"task": task, "prefer": prefer}
    explicit = (await ai.http.post("/v1/ai/chat", json={
        "messages": "Hi", "model": "tiny-chat-sees", "prefer": "cheapest", "max_tokens": 2,
    })).json()
    assert explicit["metadata"]["model"] == "tiny-chat-sees"
    assert explicit["metadata"]["routed_by"] is None


async def test_greedy_replies_are_cached_by_default_sampled_ones_only_with_infrai(
    ai: Served,
) -> None:
    async def ask(**fields: Any) -> dict[str, Any]:
        body = {"messages": "Cache me", "max_tokens": 6, **fields}
        return dict((await ai.http.post("/v1/ai/chat", json=body)).json())

    first, again = await ask(temperature=0), await ask(temperature=0)
    assert not first["metadata"]["cache_hit"] and again["metadata"]["cache_hit"]
    assert again["content"] == first["content"] and again["usage"] == first["usage"]
    assert again["metadata"]["request_id"] != first["metadata"]["request_id"]
    bypass = await ask(temperature=0, cache_strategy="none")
    assert not bypass["metadata"]["cache_hit"] and bypass["content"] == first["content"]
    sampled = [await ask(temperature=1.0) for _ in range(2)]
    assert not any(r["metadata"]["cache_hit"] for r in sampled)
    opted = [await ask(temperature=1.0, cache_strategy="infrai") for _ in range(2)]
    assert [r["metadata"]["cache_hit"] for r in opted] == [False, True]
    assert opted[0]["content"] == opted[1]["content"]
    # A stream is served from the same cache, replayed.
    streamed = await ai.http.post("/v1/ai/chat", json={
        "messages": "Cache me", "max_tokens": 6, "temperature": 0, "stream": True,
    })
    chunks = sse(streamed.text)
    assert chunks[-1]["metadata"]["cache_hit"] is True
    assert "".join(c["delta"].get("content") or "" for c in chunks) == first["content"]


async def test_idempotency_key_returns_the_same_result(ai: Served) -> None:
    body = {"messages": "Once only", "max_tokens": 8, "temperature": 1.0,
            "idempotency_key": "idem-chat-1"}
    together = await asyncio.gather(*(ai.http.post("/v1/ai/chat", json=body) for _ in range(3)))
    later = await ai.http.post("/v1/ai/chat", json=body)
    results = [r.json() for r in [*together, later]]
    assert all(r == results[0] for r in results), results
    streamed = sse((await ai.http.post("/v1/ai/chat", json={**body, "stream": True})).text)
    assert "".join(c["delta"].get("content") or "" for c in streamed) == results[0]["content"]
    assert streamed[-1]["metadata"]["request_id"] == results[0]["metadata"]["request_id"]
    clash = await ai.http.post("/v1/ai/chat", json={**body, "messages": "Something else"})
    assert_error(clash, 409, "idempotency_key", "conflict")
    embed = {"input": ["a", "b"], "idempotency_key": "idem-embed-1"}
    first, second = [(await ai.http.post("/v1/ai/embed", json=embed)).json() for _ in range(2)]
    assert first == second


async def test_batch_mode_queues_a_job_and_the_jobs_api_has_the_chat_result(
    ai: Served,
) -> None:
    body = {"messages": "Batch me", "max_tokens": 4, "temperature": 0, "batch_mode": True,
            "idempotency_key": "batch-1"}
    response = await ai.http.post("/v1/ai/chat", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and job["job_id"].startswith("gen_")
    assert (await ai.http.post("/v1/ai/chat", json=body)).json()["job_id"] == job["job_id"]
    deadline = time.monotonic() + 60
    while job["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
        job = (await ai.http.get(job["status_url"])).json()
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 4
    assert result["metadata"]["request_id"] == job["job_id"] and result["content"]
    # The same job through the generic jobs API, its result a JSON file.
    generic = (await ai.http.get(f"/v1/generations/{job['job_id']}")).json()
    assert generic["kind"] == "chat" and generic["status"] == "completed"
    content = (await ai.http.get(f"/v1/generations/{job['job_id']}/content")).json()
    assert content["text"] == result["content"]
    refused = await ai.http.post("/v1/ai/chat", json={**body, "stream": True,
                                                      "idempotency_key": "batch-2"})
    assert_error(refused, 400, "stream")


async def test_timeout_seconds_is_a_504_naming_it_and_the_server_goes_on(ai: Served) -> None:
    body = {"messages": "Take your time", "temperature": 1.0, "timeout_seconds": 0.001}
    assert_error(await ai.http.post("/v1/ai/chat", json=body), 504, "timeout_seconds",
                 "deadline_exceeded")
    streamed = await ai.http.post("/v1/ai/chat", json={**body, "stream": True})
    assert streamed.status_code in (200, 504)
    if streamed.status_code == 200:  # the deadline passed after the first token
        assert sse(streamed.text)[-1]["error"]["code"] == "deadline_exceeded"
    ok = await ai.http.post("/v1/ai/chat", json={"messages": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


# -- other routes ------------------------------------------------------------------------------


async def test_embed_batch_with_dimensions(ai: Served) -> None:
    r = (await ai.http.post("/v1/ai/embed", json={
        "input": ["one", "two", "three"], "dimensions": 64, "model": "text-embedding-ada-002",
    })).json()
    vectors = np.array(r["embeddings"])
    assert vectors.shape == (3, 64) and r["model"] == "text-embedding-ada-002"
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


async def test_vision_with_base64_and_several_images(ai: Served) -> None:
    encoded = base64.b64encode(png((10, 200, 10))).decode()
    r = (await ai.http.post("/v1/ai/vision", json={
        "prompt": "Compare them.", "max_tokens": 3, "temperature": 0,
        "images": [{"base64": encoded, "mime": "image/png"},
                   {"base64": f"data:image/png;base64,{encoded}"}],
    })).json()
    assert r["usage"]["completion_tokens"] == 3, r


async def test_tts_formats_and_asr_from_base64(ai: Served) -> None:
    for fmt, media_type in (("wav", "audio/wav"), ("ogg", "audio/ogg"), ("pcm", "audio/pcm")):
        r = (await ai.http.post("/v1/ai/tts", json={"input": "Testing.", "format": fmt})).json()
        audio = await ai.http.get(r["audio_url"])
        assert r["format"] == fmt and audio.headers["content-type"] == media_type
        assert len(audio.content) > 1000
    encoded = base64.b64encode(speech_mp3("Hello world.")).decode()
    r = (await ai.http.post("/v1/ai/asr", json={"audio": {"base64": encoded,
                                                          "mime": "audio/mpeg"}})).json()
    assert "hello" in r["text"].lower(), r


# -- bad input: the dialect's own envelope, and the server goes on -----------------------------


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("chat", {}, 400, "messages"),
        ("chat", {"messages": "Hi", "tools": [{"type": "function"}]}, 400, "tools[0].function"),
        ("chat", {"messages": "Hi", "response_format": {"type": "json_schema"}}, 400,
         "response_format.json_schema.schema"),
        ("chat", {"messages": "Hi", "response_format": {"type": "json_schema", "schema": {
            "type": "array", "uniqueItems": True}}}, 400, "response_format.json_schema.schema"),
        ("chat", {"messages": "Hi", "tool_choice": "required"}, 400, "tool_choice"),
        ("chat", {"messages": "Hi", "response_format": {"type": "yaml"}}, 400,
         "response_format.type"),
        ("chat", {"messages": "Hi", "vendor": "openai"}, 400, "vendor"),
        ("chat", {"messages": "Hi", "prefer": "fastest"}, 400, "prefer"),
        ("chat", {"messages": "Hi", "task": "poetry"}, 400, "task"),
        ("chat", {"messages": "Hi", "temperature": 3}, 400, "temperature"),
        ("chat", {"messages": "Hi", "model": "no-such-model"}, 404, "model"),
        ("chat", {"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role"),
        ("chat", {"messages": "  "}, 400, "messages"),
        ("embed", {"input": "x", "dimensions": 4096}, 400, "dimensions"),
        ("embed", {"input": []}, 400, "input"),
        ("embed", {"input": "x", "model": "tiny-chat"}, 400, "model"),
        ("image", {"prompt": "x", "size": "big"}, 400, "size"),
        ("image", {"prompt": "x", "n": 11}, 400, "n"),
        ("vision", {"prompt": "x", "images": []}, 400, "images"),
        ("vision", {"prompt": "x", "images": [{"url": "a", "base64": "b"}]}, 400, "images[0]"),
        ("vision", {"prompt": "x", "images": [{"base64": "AAAA", "mime": "text/plain"}]}, 400,
         "images[0].mime"),
        ("vision", {"prompt": "x", "images": [{"url": "file:///etc/passwd"}]}, 400,
         "images[0].url"),
        ("tts", {"input": "x", "format": "flac"}, 400, "format"),
        ("tts", {"input": ""}, 400, "input"),
        ("tts", {"input": "x", "voice": "nobody"}, 400, "voice"),
        ("asr", {"audio": {"base64": "***"}}, 400, "audio.base64"),
        ("asr", {"audio": {"base64": base64.b64encode(b"not audio").decode()}}, 400, "audio"),
        ("asr", {"audio": {"base64": "AAAA", "mime": "image/png"}}, 400, "audio.mime"),
    ],
)
async def test_bad_input_is_answered_in_the_infrai_envelope(
    ai: Served, route: str, body: dict[str, Any], status: int, param: str,
) -> None:
    assert_error(await ai.http.post(f"/v1/ai/{route}", json=body), status, param)


async def test_fetched_urls_must_be_the_right_kind_and_public(
    ai: Served, served: Served, files: FileServer,
) -> None:
    wrong = await ai.http.post("/v1/ai/asr", json={"audio": {"url": f"{files.base}/page.html"}})
    assert "not audio" in assert_error(wrong, 400, "audio.url")["message"]
    # Without fetch_allow_private (the default), loopback is refused before any connection.
    for route, body, param in (
        ("asr", {"audio": {"url": f"{files.base}/clip.mp3"}}, "audio.url"),
        ("vision", {"prompt": "x", "images": [{"url": f"{files.base}/photo.jpg"}]},
         "images[0].url"),
    ):
        refused = await served.http.post(f"/v1/ai/{route}", json=body)
        assert "loopback" in assert_error(refused, 400, param)["message"]


async def test_malformed_bodies_and_unknown_routes_use_the_envelope(ai: Served) -> None:
    raw = await ai.http.post("/v1/ai/chat", content=b"{not json",
                             headers={"content-type": "application/json"})
    assert_error(raw, 400, None, "invalid_json")
    assert_error(await ai.http.post("/v1/ai/nothing", json={}), 404, None, "not_found")
    assert_error(await ai.http.get("/v1/ai/jobs/gen_missing"), 404, "job_id")
    # Still serving.
    assert (await ai.http.post("/v1/ai/chat", json={"messages": "Hi", "max_tokens": 1}))\
        .status_code == 200


# -- structured output and tools (the engine's grammars, in this dialect's shapes) -------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}


async def test_chat_json_schema_and_required_tools(ai: Served) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    response = await ai.http.post("/v1/ai/chat", json={
        "messages": "Are you ok?", "model": "tiny-chat", "temperature": 1, "max_tokens": 64,
        "response_format": {"type": "json_schema", "json_schema": {"name": "ok",
                                                                  "schema": schema}}})
    assert response.status_code == 200, response.text
    assert set(json.loads(response.json()["content"])) == {"ok"}

    response = await ai.http.post("/v1/ai/chat", json={
        "messages": "Weather in Paris?", "model": "tiny-chat", "temperature": 0,
        "max_tokens": 300, "tools": [WEATHER_TOOL], "tool_choice": "required",
        "parallel_tool_calls": False})
    result = response.json()
    assert response.status_code == 200 and result["finish_reason"] == "tool_calls", result
    [call] = result["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}

    streamed = await ai.http.post("/v1/ai/chat", json={
        "messages": "Weather in Paris?", "model": "tiny-chat", "temperature": 0,
        "max_tokens": 300, "tools": [WEATHER_TOOL], "tool_choice": "required",
        "parallel_tool_calls": False, "stream": True})
    chunks = sse(streamed.text)
    pieces = [c["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["delta"]]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    arguments = "".join(piece["function"]["arguments"] for piece in pieces)
    assert json.loads(arguments) == json.loads(call["function"]["arguments"])
    assert chunks[-1]["finish_reason"] == "tool_calls"

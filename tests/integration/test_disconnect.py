"""A client that leaves stops its work, non-streamed requests included.

httpx's ASGITransport cannot hang up, so the app is driven directly: a `receive` that hands
over the body and then, `LEAVE_AFTER_S` later, `http.disconnect`, as a server does when the
client's socket closes. Everything below it is real: the routes, the engine, the chat
scheduler, the batchers and tiny models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.requests import Request
from starlette.types import Message

from engine.core.settings import Settings
from server.cancellation import cancel_on_disconnect, unless_disconnected
from tests.audio_files import encode_file
from tests.conftest import Served, serve_in_process
from tests.tiny_models import build_tiny_llama

LEAVE_AFTER_S = 0.5
SETTLE_S = 2.0  # the work must be gone this soon after the client
LONG_CONTEXT = 2048
CHAT = "tiny-chat"
EMBEDDER = "all-minilm-l6-v2"
STT = "whisper-tiny-en"
TTS = "piper-en-us-joe"


@pytest.fixture(scope="module")
def long_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chat model with room for a reply of 2000 tokens (~8 s here), so a request is
    surely still decoding when its client leaves."""
    return build_tiny_llama(tmp_path_factory.mktemp("long-tiny-llama"), LONG_CONTEXT)


@pytest.fixture(scope="module")
async def served(
    make_settings: Callable[..., Settings], long_chat_dir: Path
) -> AsyncIterator[Served]:
    models = [
        {"id": CHAT, "source": str(long_chat_dir)},
        # Small batches, so a long request is many batches and only one is ever in flight.
        {"id": EMBEDDER, "limits": {"max_batch_size": 8, "max_queue": 4096}},
        {"id": STT, "limits": {"max_batch_size": 1}},
        {"id": TTS, "limits": {"max_batch_size": 1}},
    ]
    async with serve_in_process(make_settings(models=models)) as value:
        yield value


@dataclass
class Left:
    """What the app did for a client that left: the messages it sent, and how long its call
    ran on after the client was gone."""

    messages: list[Message]
    ran_on_s: float

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return int(starts[0]["status"]) if starts else None


async def call_and_leave(
    app: Any, path: str, payload: bytes, content_type: str = "application/json",
    leave_after_s: float = LEAVE_AFTER_S, once: Callable[[], bool] = lambda: True,
) -> Left:
    """POST `payload` (in two body messages, as a server may deliver it), then hang up
    `leave_after_s` later, or later still, `once` the work is seen running."""
    loop = asyncio.get_running_loop()
    gone_at = loop.time() + leave_after_s
    half = len(payload) // 2
    body = [
        {"type": "http.request", "body": payload[:half], "more_body": True},
        {"type": "http.request", "body": payload[half:], "more_body": False},
    ]

    async def receive() -> Message:
        if body:
            return body.pop(0)
        nonlocal gone_at
        await asyncio.sleep(max(0.0, gone_at - loop.time()))
        await until(once, within_s=20)
        gone_at = loop.time()
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"ember"), (b"content-type", content_type.encode()),
                    (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("ember", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return Left(sent, loop.time() - gone_at)


async def until(probe: Callable[[], bool], within_s: float = SETTLE_S) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not probe():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def still(count: Callable[[], int], for_s: float = 0.4) -> bool:
    """`count` does not move for `for_s`: nothing is computing for the request any more."""
    before = count()
    await asyncio.sleep(for_s)
    return count() == before


async def assert_let_go(batcher: Any, batch_size: int) -> None:
    """What was queued is withdrawn before the app returns; only the batch already computing
    is left, and it cannot be stopped (on a loaded machine it can take seconds); once it is
    done, nothing more runs."""
    assert batcher.pending <= batch_size
    ran = batcher.batches_run
    assert await until(lambda: batcher.pending == 0, within_s=60)
    assert batcher.batches_run - ran <= 1
    assert await still(lambda: batcher.batches_run)


def assert_abandoned(left: Left) -> None:
    assert left.status == 499, left.messages  # not a finished 200 nobody reads
    assert left.ran_on_s < 1.0, f"the app ran on {left.ran_on_s:.2f}s after the client left"


def chat_payload(**extra: Any) -> bytes:
    return json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "Hi"}],
                       "temperature": 0, **extra}).encode()


# Each dialect's non-streamed chat, asking for 2000 tokens (the gateways have no ignore_eos:
# the tiny model at temperature 0 never samples its end token).
CHATS = {
    "openai": ("/v1/chat/completions", chat_payload(max_tokens=2000, ignore_eos=True)),
    "openai-completions": ("/v1/completions", json.dumps({
        "model": CHAT, "prompt": ["Once upon a time", "Twice"], "max_tokens": 2000,
        "ignore_eos": True, "temperature": 0}).encode()),
    "infrai": ("/v1/ai/chat", chat_payload(max_tokens=2000, cache_strategy="none")),
    "quantcdn": ("/api/v3/organizations/acme/ai/chat", json.dumps({
        "modelId": CHAT, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
        "maxTokens": 2000}).encode()),
}


@pytest.mark.parametrize("dialect", list(CHATS))
async def test_non_streamed_chat_stops_when_its_client_leaves(
    served: Served, dialect: str
) -> None:
    engine = served.app.state.engine
    scheduler = (await engine.manager.load(CHAT)).runner
    steps_before = scheduler.steps
    path, payload = CHATS[dialect]
    left = await call_and_leave(served.app, path, payload,
                                once=lambda: scheduler.steps > steps_before + 10)
    assert_abandoned(left)
    assert await until(lambda: engine.manager.status_of(CHAT).active_requests == 0)
    assert await until(lambda: scheduler.pending == 0 and scheduler.active_sequences == 0)
    assert await still(lambda: scheduler.steps)
    decoded = scheduler.steps - steps_before
    assert 10 < decoded < 1000, f"{decoded} steps: it decoded, and stopped long before 2000"
    listed = (await served.http.get("/v1/models")).json()["data"]
    assert next(m for m in listed if m["id"] == CHAT)["active_requests"] == 0


async def test_streamed_chat_still_answers_and_stops(served: Served) -> None:
    """The streamed path under the same decorator: a full stream arrives, and a stream whose
    client leaves stops decoding (the SSE response's own disconnect listener)."""
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "ignore_eos": True, "temperature": 0, "stream": True}
    reply = await served.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
    scheduler = served.app.state.engine.manager.slot(CHAT).runner
    left = await call_and_leave(served.app, "/v1/chat/completions",
                                chat_payload(max_tokens=2000, ignore_eos=True, stream=True))
    assert left.status == 200  # the stream had started
    assert left.ran_on_s < 1.0
    assert await until(lambda: scheduler.pending == 0 and scheduler.active_sequences == 0)
    assert await still(lambda: scheduler.steps)


async def test_a_request_that_finishes_first_is_answered(served: Served) -> None:
    """The client leaves after the reply was sent: an ordinary 200 with the whole reply."""
    left = await call_and_leave(served.app, "/v1/chat/completions",
                                chat_payload(max_tokens=3, ignore_eos=True), leave_after_s=5)
    assert left.status == 200
    reply = json.loads(b"".join(m.get("body", b"") for m in left.messages))
    assert reply["usage"]["completion_tokens"] == 3
    assert left.ran_on_s < 0  # it returned long before the client left


async def test_embeddings_withdraw_their_queued_inputs(served: Served) -> None:
    engine = served.app.state.engine
    batcher = (await engine.manager.load(EMBEDDER)).runner

    def texts(count: int) -> list[str]:  # ~70 tokens each
        return [f"sentence {i} about the weather, the sea and the harbour. " * 5
                for i in range(count)]

    def ran_since(before: int) -> Callable[[], bool]:  # leave once a batch has run
        return lambda: batcher.batches_run > before

    for path, payload in [
        ("/v1/embeddings", {"model": EMBEDDER, "input": texts(2048)}),
        ("/v1/ai/embed", {"model": EMBEDDER, "input": texts(2048)}),
        # QuantCDN's limit is 100 inputs a request.
        ("/api/v3/organizations/acme/ai/embeddings", {"modelId": EMBEDDER,
                                                      "input": texts(100)}),
    ]:
        batches = len(payload["input"]) // 8
        batches_before = batcher.batches_run
        left = await call_and_leave(served.app, path, json.dumps(payload).encode(),
                                    once=ran_since(batches_before))
        assert_abandoned(left)
        assert await until(lambda: engine.manager.status_of(EMBEDDER).active_requests == 0)
        await assert_let_go(batcher, 8)
        ran = batcher.batches_run - batches_before
        assert 0 < ran < batches // 2, f"{path}: {ran} of {batches} batches of 8 ran"


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://ember/", data=fields, files=files)
    return request.read(), request.headers["content-type"]


async def test_transcription_upload_is_read_then_stops_when_its_client_leaves(
    served: Served,
) -> None:
    """The route reads its multipart form itself: the disconnect listener starts only after
    the form is read (else it would swallow the upload), and then stops the windows."""
    engine = served.app.state.engine
    batcher = (await engine.manager.load(STT)).runner
    rng = np.random.default_rng(0)
    minutes = encode_file(rng.normal(0, 0.05, 16_000 * 300), 16_000, "wav", "pcm_s16le")
    payload, content_type = multipart({"model": STT}, {"file": ("noise.wav", minutes)})
    batches_before = batcher.batches_run
    left = await call_and_leave(served.app, "/v1/audio/transcriptions", payload, content_type)
    assert_abandoned(left)
    assert await until(lambda: engine.manager.status_of(STT).active_requests == 0)
    await assert_let_go(batcher, 1)
    assert batcher.batches_run - batches_before < 10  # of 10 windows (300 s)


async def test_speech_stream_stops_when_its_client_leaves(served: Served) -> None:
    engine = served.app.state.engine
    batcher = (await engine.manager.load(TTS)).runner
    story = " ".join(f"This is sentence number {i} of a long story." for i in range(60))
    payload = json.dumps({"model": TTS, "input": story, "voice": "alloy",
                          "response_format": "wav"}).encode()
    batches_before = batcher.batches_run
    left = await call_and_leave(served.app, "/v1/audio/speech", payload)
    assert left.ran_on_s < 1.0
    assert await until(lambda: engine.manager.status_of(TTS).active_requests == 0)
    await assert_let_go(batcher, 1)
    assert batcher.batches_run - batches_before < 60


async def test_a_channel_that_cannot_be_read_leaves_the_work_alone() -> None:
    async def broken() -> Message:
        raise RuntimeError("no receive channel")

    scope = {"type": "http", "method": "POST", "scheme": "http", "path": "/v1/x",
             "query_string": b"", "headers": [], "server": ("ember", 80)}
    work = asyncio.sleep(0.1, result="done")
    assert await unless_disconnected(Request(scope, broken), work) == "done"


def test_the_decorator_needs_a_request_to_listen_on() -> None:
    async def handler(body: dict[str, Any]) -> None:
        return None

    with pytest.raises(TypeError, match="needs a `request: Request` parameter"):
        cancel_on_disconnect(handler)

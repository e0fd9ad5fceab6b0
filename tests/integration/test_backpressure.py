"""Backpressure: a full queue is 429 with Retry-After, a deadline passed in the queue is 504, and
cancelled or disconnected callers leave nothing behind."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from engine.contracts.chat import GenerationRequest, SamplingParams
from engine.core.settings import Settings
from tests.conftest import serve_in_process

ONE_AT_A_TIME = {"id": "tiny-chat", "limits": {"max_batch_size": 1, "max_queue": 1}}


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}


async def test_full_chat_queue_is_429_with_retry_after(
    make_settings: Callable[..., Settings],
) -> None:
    async with serve_in_process(make_settings(models=[ONE_AT_A_TIME])) as served:
        await served.http.post("/v1/models/load", json={"model": "tiny-chat"})
        responses = await asyncio.gather(*[
            served.http.post("/v1/chat/completions", json=chat_body(200)) for _ in range(6)
        ])
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        later = await served.http.post("/v1/chat/completions", json=chat_body(2))
        assert later.status_code == 200


async def test_full_embedding_queue_is_429(make_settings: Callable[..., Settings]) -> None:
    # A long batching wait keeps the first request's inputs in the queue while the second
    # arrives; the second does not fit beside them.
    tight = {"id": "all-minilm-l6-v2", "limits": {"max_queue": 4, "max_wait_ms": 1000}}
    async with serve_in_process(make_settings(models=[tight])) as served:
        await served.http.post("/v1/models/load", json={"model": "all-minilm-l6-v2"})
        body = {"model": "all-minilm-l6-v2", "input": ["a", "b", "c"]}
        first = asyncio.ensure_future(served.http.post("/v1/embeddings", json=body))
        await asyncio.sleep(0.3)
        refused = await served.http.post("/v1/embeddings", json=body)
        assert refused.status_code == 429
        assert "Retry-After" in refused.headers
        assert (await first).status_code == 200
        # One request larger than the whole queue is not refused: it goes in slices.
        large = await served.http.post(
            "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["x"] * 6}
        )
        assert large.status_code == 200 and len(large.json()["data"]) == 6


# The server-wide deadline, and a registry entry's own (timeouts per request class: the
# entry's limits.request_timeout_s wins over a long server-wide one).
STRICT_ENTRY = {"id": "tiny-chat",
                "limits": {"max_batch_size": 1, "max_queue": 1, "request_timeout_s": 0.03}}


@pytest.mark.parametrize(("entry", "server_timeout_s"), [
    pytest.param(ONE_AT_A_TIME, 0.03, id="server-wide"),
    pytest.param(STRICT_ENTRY, 600, id="per-model"),
])
async def test_request_waiting_past_its_deadline_is_504(
    make_settings: Callable[..., Settings], entry: dict[str, Any], server_timeout_s: float,
) -> None:
    settings = make_settings(models=[entry], request_timeout_s=server_timeout_s)
    async with serve_in_process(settings) as served:
        await served.http.post("/v1/models/load", json={"model": "tiny-chat"})
        long = asyncio.ensure_future(
            served.http.post("/v1/chat/completions", json=chat_body(230))
        )
        await asyncio.sleep(0.01)
        waiting = await served.http.post("/v1/chat/completions", json=chat_body(2))
        assert waiting.status_code == 504, waiting.text
        assert waiting.json()["error"]["code"] == "deadline_exceeded"
        assert (await long).status_code == 200


async def test_a_thousand_cancelled_requests_leave_nothing_behind(
    make_settings: Callable[..., Settings],
) -> None:
    async with serve_in_process(make_settings()) as served:
        engine = served.app.state.engine
        scheduler = (await engine.manager.load("tiny-chat")).runner

        async def abandon(index: int) -> None:
            request = GenerationRequest(
                model="tiny-chat", prompt=f"Hello {index}",
                params=SamplingParams(max_tokens=100, temperature=0.8, ignore_eos=True),
            )
            events = engine.generation.stream(request)
            await anext(events)
            await events.aclose()

        rss_after_warmup = 0
        for round_index in range(20):
            await asyncio.gather(*[abandon(50 * round_index + i) for i in range(50)])
            assert scheduler.active_sequences == 0 and scheduler.pending == 0
            if round_index == 1:
                rss_after_warmup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_after_warmup
        assert grown_kb < 64 * 1024, f"peak RSS grew {grown_kb} KiB over 900 cancelled requests"
        slot = engine.manager.slot("tiny-chat")
        assert slot.leases == 0


async def test_disconnected_stream_frees_its_row(make_settings: Callable[..., Settings]) -> None:
    async with serve_in_process(make_settings()) as served:
        scheduler = (await served.app.state.engine.manager.load("tiny-chat")).runner
        body = {**chat_body(2000), "stream": True}
        async with served.http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
        for _ in range(100):
            if scheduler.active_sequences == 0 and scheduler.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert scheduler.active_sequences == 0 and scheduler.pending == 0
        assert isinstance(response, httpx.Response)


async def test_request_larger_than_the_batch_still_runs(
    make_settings: Callable[..., Settings],
) -> None:
    """n=3 choices on a model limited to batches of 1 row: it runs alone, not never."""
    async with serve_in_process(make_settings(models=[ONE_AT_A_TIME])) as served:
        response = await served.http.post(
            "/v1/chat/completions", json={**chat_body(4), "n": 3}
        )
        assert response.status_code == 200
        assert len(response.json()["choices"]) == 3

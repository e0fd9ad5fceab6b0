"""The Python client against the app in-process (httpx's ASGI transport), on the tiny test
models: what `ember serve` offline cannot show. The seed's image, video, music, cancel,
moderation and rerank examples run here through `AsyncEmber` (awaited, with sizes and
durations the tiny models take), and real 429s from a full queue are retried."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from ember import AsyncEmber
from ember.client import (
    AuthenticationError,
    ChatMessage,
    RateLimitError,
    ServiceUnavailableError,
)
from engine.core.settings import Settings
from tests.conftest import Served, serve_in_process

FINISHED = ("completed", "failed", "cancelled")


class CountingTransport(httpx.ASGITransport):
    """The app's own transport, counting the requests that reach it."""

    def __init__(self, app: Any) -> None:
        super().__init__(app=app)
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return await super().handle_async_request(request)


@pytest.fixture
async def client(served: Served) -> AsyncIterator[AsyncEmber]:
    async with AsyncEmber(base_url="http://ember",
                          transport=CountingTransport(served.app)) as ember:
        yield ember


async def test_image_generation_example(client: AsyncEmber, served: Served,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # The seed's example; "dall-e-3" is the tiny test model, whose largest side is 256.
    response = await client.ai.inference.image_generation(
        model="dall-e-3",
        prompt="A serene mountain landscape at sunset",
        n=1,
        size="64x64",
        quality="standard",
    )
    for image in response.data:
        if image.url:
            print(f"Image URL: {image.url}")
        if image.revised_prompt:
            print(f"Revised prompt: {image.revised_prompt}")
    output = capsys.readouterr().out
    assert "Revised prompt: A serene mountain landscape at sunset" in output
    url = response.data[0].url
    assert url is not None and url.startswith("http://ember/v1/files/")
    downloaded = await served.http.get(url)
    assert Image.open(io.BytesIO(downloaded.content)).size == (64, 64)
    assert response.created > 0

    seeded = await client.ai.inference.image_generation(
        model="dall-e-3", prompt="a red bicycle", n=2, size="128x64",
        response_format="b64_json", seed=11)  # `seed` passes through to the server
    assert [image.seed for image in seeded.data] == [11, 12]
    for image in seeded.data:
        assert image.url is None and image.b64_json is not None
        picture = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
        assert picture.format == "PNG" and picture.size == (128, 64)


async def test_video_generation_example_polls_the_job_to_its_file(
    client: AsyncEmber, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seed's example, awaited, polling every 50 ms instead of 10 s, at a size and
    # duration the tiny video model takes.
    job = await client.ai.inference.video_generation(
        model="text-to-video",
        prompt="A drone flying over a tropical forest",
        duration=1,
        resolution="64x48",
    )
    print(f"Job submitted: {job.job_id}")
    seen = [job.status]
    while job.status not in ("completed", "failed", "cancelled"):
        await asyncio.sleep(0.05)
        job = await client.ai.inference.generation_status(job_id=job.job_id)
        seen.append(job.status)
        print(f"Status: {job.status}, Progress: {job.progress}%")
    if job.status == "completed":
        print(f"Result: {job.result}")
    output = capsys.readouterr().out
    assert output.startswith(f"Job submitted: {job.job_id}\n") and "Result: {" in output
    assert seen[0] == "pending" and seen[-1] == "completed"
    assert set(seen) <= {"pending", "processing", "completed"}
    assert job.progress == 100 and job.ember_status == "completed"
    assert (job.model, job.provider, job.kind) == ("tiny-video", "ember", "video")
    assert job.result["media_type"] == "video/mp4" and job.result["frames"] == 9
    video = await served.http.get(job.result["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"


async def test_music_generation_example_then_its_cancel_continuation(
    client: AsyncEmber, capsys: pytest.CaptureFixture[str]
) -> None:
    # A long video job keeps the worker busy, so the music job is still pending when the
    # seed's cancel example runs right after the music example.
    blocker = await client.ai.inference.video_generation(
        model="text-to-video", prompt="a long scene", duration=1, num_inference_steps=60)
    job = await client.ai.inference.music_generation(
        model="musicgen",
        prompt="Upbeat electronic music with a catchy melody",
        duration=1,
    )
    print(f"Job submitted: {job.job_id}")
    cancelled = await client.ai.inference.cancel_generation(job_id=job.job_id)
    print(f"Cancelled: {cancelled.status}")
    assert capsys.readouterr().out == f"Job submitted: {job.job_id}\nCancelled: cancelled\n"
    assert cancelled.job_id == job.job_id and cancelled.kind == "music"
    # The running job stops at its next step.
    while (running := await client.ai.inference.generation_status(
            job_id=blocker.job_id)).progress == 0 and running.status != "completed":
        await asyncio.sleep(0.05)
    await client.ai.inference.cancel_generation(job_id=blocker.job_id)
    while (running := await client.ai.inference.generation_status(
            job_id=blocker.job_id)).status not in FINISHED:
        await asyncio.sleep(0.05)
    assert running.status == "cancelled" and running.progress < 100


async def test_moderation_examples(client: AsyncEmber,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny classifier's thresholds flag `harassment` always and `sexual` never.
    response = await client.ai.inference.moderation(
        model="tiny-moderation",
        input="Some text to check for policy violations.",
    )
    for result in response.results:
        print(f"Flagged: {result.flagged}")
        for category, flagged in result.categories.items():
            if flagged:
                print(f" {category}: score={result.category_scores[category]:.4f}")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Flagged: True" and lines[1].startswith(" harassment: score=0.")
    assert response.model == "tiny-moderation" and response.id.startswith("modr-")
    assert len(response.results[0].categories) == 13
    assert response.results[0].categories["sexual"] is False

    texts = ["This is a normal message.", "You stupid idiot."]
    batch = await client.ai.inference.moderation(model="omni-moderation-latest", input=texts)
    assert [result.flagged for result in batch.results] == [False, True]
    assert batch.results[1].category_scores["harassment"] > 0.9


async def test_rerank_example_on_both_kinds_of_reranker(client: AsyncEmber) -> None:
    deep_learning = "Deep learning uses neural networks to learn from data."
    documents: list[str | dict[str, Any]] = [
        "Machine learning is a subset of artificial intelligence.",
        "The weather today is sunny and warm.",
        {"text": deep_learning},  # the SDK takes strings or {"text": ...} objects
    ]
    ranked = await client.ai.inference.rerank(
        model="rerank", query="What is machine learning?", documents=documents, top_n=2)
    assert [result.index for result in ranked.results] == [0, 2]
    assert ranked.results[1].document == {"text": deep_learning}
    assert ranked.meta["usage"]["total_tokens"] > 10
    crossed = await client.ai.inference.rerank(
        model="tiny-cross-encoder", query="What is machine learning?", documents=documents)
    scores = [result.relevance_score for result in crossed.results]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert all(0.0 <= score <= 1.0 for score in scores)  # a cross-encoder's sigmoid


async def test_chat_stream_matches_the_whole_reply_and_reports_usage(client: AsyncEmber) -> None:
    messages: list[dict[str, Any] | ChatMessage] = [
        ChatMessage(role="system", content="You are terse."),
        {"role": "user", "content": "Say something."},
    ]
    whole = await client.ai.inference.chat_completion(
        model="gpt-4o-mini", messages=messages, temperature=0, max_tokens=12, ignore_eos=True)
    stream = await client.ai.inference.chat_completion(
        model="gpt-4o-mini", messages=messages, temperature=0, max_tokens=12, ignore_eos=True,
        stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(chunk.content for chunk in chunks) == whole.content
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    finished = [chunk for chunk in chunks if chunk.finish_reason]
    assert [chunk.finish_reason for chunk in finished] == ["length"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    text = await client.ai.inference.completion(
        model="gpt-3.5-turbo-instruct", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.choices[0].message.role == "assistant" and text.usage.completion_tokens <= 5


async def test_a_model_that_was_never_pulled_is_one_request_and_says_how(
    served: Served,
) -> None:
    transport = CountingTransport(served.app)
    async with AsyncEmber(base_url="http://ember", transport=transport) as client:
        with pytest.raises(ServiceUnavailableError) as caught:
            await client.ai.inference.image_generation(model="sd-turbo", prompt="a cat")
    assert caught.value.status_code == 503 and caught.value.code == "model_unavailable"
    assert "ember pull sd-turbo" in caught.value.message
    assert transport.requests == 1  # not retried: it would fail the same way


ONE_AT_A_TIME = {"id": "tiny-chat", "limits": {"max_batch_size": 1, "max_queue": 1}}


async def test_a_full_queue_is_a_typed_429_and_retries_get_through(
    make_settings: Callable[..., Settings],
) -> None:
    async with serve_in_process(make_settings(models=[ONE_AT_A_TIME])) as served:
        await served.http.post("/v1/models/load", json={"model": "tiny-chat"})

        async def chats(max_retries: int) -> list[Any]:
            async with AsyncEmber(base_url="http://ember", max_retries=max_retries,
                                  transport=httpx.ASGITransport(app=served.app)) as client:
                return await asyncio.gather(*[
                    client.ai.inference.chat_completion(
                        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=40, ignore_eos=True, temperature=0)
                    for _ in range(4)
                ], return_exceptions=True)

        refused = [r for r in await chats(max_retries=0) if isinstance(r, Exception)]
        assert refused and all(isinstance(r, RateLimitError) for r in refused)
        error = refused[0]
        assert isinstance(error, RateLimitError) and error.code == "queue_full"
        assert error.response is not None and int(error.response.headers["Retry-After"]) >= 1
        # With retries, every request waits out the Retry-After and is served.
        replies = await chats(max_retries=6)
        assert not [r for r in replies if isinstance(r, Exception)], replies
        assert [r.usage.completion_tokens for r in replies] == [40] * 4


async def test_the_api_key_is_sent_from_the_argument_or_the_environment(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve_in_process(make_settings(api_key="s3cret")) as served:
        async def moderate(**options: Any) -> bool:
            async with AsyncEmber(base_url="http://ember", max_retries=0,
                                  transport=httpx.ASGITransport(app=served.app),
                                  **options) as client:
                reply = await client.ai.inference.moderation(model="profanity-check",
                                                             input="hello")
                return reply.results[0].flagged

        monkeypatch.delenv("EMBER_API_KEY", raising=False)
        with pytest.raises(AuthenticationError) as caught:
            await moderate()
        assert caught.value.status_code == 401 and "API key" in caught.value.message
        assert await moderate(api_key="s3cret") is False
        monkeypatch.setenv("EMBER_API_KEY", "s3cret")
        assert await moderate() is False


async def test_chat_completion_with_tools_and_response_format(client: AsyncEmber) -> None:
    tool = {"type": "function", "function": {
        "name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"], "additionalProperties": False}}}
    reply = await client.ai.inference.chat_completion(
        model="tiny-chat", messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=300, temperature=0, tools=[tool], tool_choice="required",
        parallel_tool_calls=False)
    [call] = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call["function"]["name"] == "get_weather"
    follow_up = await client.ai.inference.chat_completion(
        model="tiny-chat", max_tokens=4, temperature=0, tools=[tool], messages=[
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=[call]),
            ChatMessage("tool", '{"temperature": 21}', tool_call_id=call["id"])])
    assert follow_up.usage.prompt_tokens > reply.usage.prompt_tokens
    structured = await client.ai.inference.chat_completion(
        model="tiny-chat", messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=200, temperature=1, response_format={"type": "json_schema", "json_schema": {
            "name": "ok", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                     "required": ["ok"], "additionalProperties": False}}})
    assert structured.choices[0].message.content in ('{"ok":true}', '{"ok":false}')
    chunks = [chunk async for chunk in await client.ai.inference.chat_completion(
        model="tiny-chat", messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=300, temperature=0, tools=[tool], tool_choice="required",
        parallel_tool_calls=False, stream=True)]
    pieces = [piece for chunk in chunks for piece in chunk.tool_calls or []]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"].get("arguments", "") for p in pieces) == \
        call["function"]["arguments"]

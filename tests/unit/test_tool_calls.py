"""Tool-call text both ways, with no model: the streaming parser over every format and any
chunking, the formats templates map to, the fallback turns, and the grammars each choice
builds (valid llguidance grammars that accept the format's own text)."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest

from engine.contracts.chat import ChatMessage, ToolCall, ToolCallDelta, ToolSpec
from engine.contracts.chat_templates import (
    FALLBACK,
    HERMES,
    LLAMA3_JSON,
    ToolFormat,
    call_text,
    detect_format,
    template_turns,
)
from engine.generation.structured import MAX_CALLS, tool_call_grammar
from engine.generation.tool_calls import ToolCallParser, join_deltas

WEATHER = ToolSpec("get_weather", "Weather in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False})
TIME = ToolSpec("get_time", "", {"type": "object", "properties": {"zone": {"enum": ["UTC"]}},
                                 "required": ["zone"], "additionalProperties": False})
CALLS = [ToolCall("a", "get_weather", '{"city":"Paris"}'), ToolCall("b", "get_time",
                                                                     '{"zone":"UTC"}')]


def parse(fmt: ToolFormat, text: str, step: int) -> tuple[str, list[ToolCall], list[Any]]:
    parser = ToolCallParser(0, fmt)
    out = []
    for start in range(0, len(text), step):
        out += parser.feed(text[start:start + step])
    out += parser.finish()
    content = "".join(piece for piece in out if isinstance(piece, str))
    deltas = [piece for piece in out if isinstance(piece, ToolCallDelta)]
    return content, parser.calls, deltas



@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, FALLBACK])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_calls_parse_the_same_in_any_chunking(fmt: ToolFormat, step: int) -> None:
    text = fmt.separator.join(call_text(c, fmt) for c in CALLS)
    content, calls, deltas = parse(fmt, text, step)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in CALLS]
    assert [(c.name, c.arguments) for c in join_deltas(deltas)] == [
        (c.name, c.arguments) for c in CALLS]
    firsts = [d for d in deltas if d.id is not None]
    assert [d.call for d in firsts] == [0, 1] and all(d.id.startswith("call_") for d in firsts)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_text_before_a_call_is_content_and_no_half_tag_ever_is(step: int) -> None:
    text = "Let me check.\n" + call_text(CALLS[0], HERMES)
    content, calls, _ = parse(HERMES, text, step)
    assert content == "Let me check." and len(calls) == 1
    parser = ToolCallParser(0, HERMES)
    assert "".join(p for p in parser.feed("Hello <tool") if isinstance(p, str)) == "Hello"
    assert parser.finish() == [" <tool"]  # never became a call: it was text after all


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_a_reply_opening_with_a_bare_call_is_a_call(step: int) -> None:
    content, calls, _ = parse(HERMES, call_text(CALLS[0], HERMES.bare()), step)
    assert content == "" and [c.name for c in calls] == ["get_weather"]
    content, calls, _ = parse(HERMES, 'Sure: {"name": "x"}', step)
    assert content == 'Sure: {"name": "x"}' and calls == []  # only at the very start


def test_formats_follow_the_template() -> None:
    assert detect_format("{% for tool in tools %}<tool_call>{% endfor %}") is HERMES
    assert detect_format('{{ tools }} "parameters": {...}') is LLAMA3_JSON
    assert detect_format("{{ messages }}") is FALLBACK and detect_format(None) is FALLBACK


def test_fallback_turns_teach_the_tools_and_write_the_history_as_text() -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Weather?"),
                ChatMessage("assistant", "", tool_calls=(CALLS[0],)),
                ChatMessage("tool", '{"t": 21}', tool_call_id="a")]
    turns = template_turns(messages, [WEATHER], FALLBACK)
    assert turns[0]["role"] == "system" and turns[0]["content"].startswith("Be brief.")
    assert '"get_weather"' in turns[0]["content"] and "<tool_call>" in turns[0]["content"]
    assert turns[2] == {"role": "assistant", "content": call_text(CALLS[0], FALLBACK)}
    assert turns[3]["role"] == "user" and "<tool_response>" in turns[3]["content"]
    native = template_turns(messages, [WEATHER], HERMES)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[3]["tool_call_id"] == "a"


def matches(grammar: str, text: str) -> bool:
    """Does the grammar accept `text` to its end (byte-level, no vocabulary)?"""
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteVocabulary()))
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    ok = all(matcher.consume_token(b) for b in text.encode())
    return ok and matcher.is_accepting()


class ByteVocabulary:
    """One token per byte, EOS last: enough for llguidance to run a grammar on text."""

    eos_token_id = 256
    bos_token_id = None
    special_token_ids = [256]
    tokens = [bytes([b]) for b in range(256)] + [b"\xff<eos>"]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, FALLBACK])
def test_each_choice_builds_a_grammar_that_takes_its_own_format(fmt: ToolFormat) -> None:
    one = call_text(CALLS[0], fmt)
    two = fmt.separator.join(call_text(c, fmt) for c in CALLS)
    required = tool_call_grammar((WEATHER, TIME), "required", True, fmt)
    assert matches(required, one) and matches(required, two)
    assert not matches(required, "Hello")
    single = tool_call_grammar((WEATHER, TIME), "required", False, fmt)
    assert matches(single, one) and not matches(single, two)
    named = tool_call_grammar((WEATHER, TIME), "get_time", True, fmt)
    assert matches(named, call_text(CALLS[1], fmt)) and not matches(named, one)
    auto = tool_call_grammar((WEATHER, TIME), "auto", True, fmt)
    assert matches(auto, "Just text.") and matches(auto, one)
    assert not matches(auto, one.replace('"city"', '"town"'))  # arguments are checked
    many = fmt.separator.join([call_text(CALLS[0], fmt)] * (MAX_CALLS + 1))
    assert not matches(required, many)


def test_arguments_must_validate_against_the_parameters() -> None:
    grammar = tool_call_grammar((WEATHER,), "required", True, HERMES)
    bad = call_text(ToolCall("x", "get_weather", json.dumps({"city": 3})), HERMES)
    assert not matches(grammar, bad)
    assert not matches(grammar, call_text(ToolCall("x", "nope", '{"city":"P"}'), HERMES))


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_repeated_call_is_dropped_and_a_different_one_kept(step: int) -> None:
    same = ToolCall("c", "get_weather", '{"city":"Paris"}')
    longer = ToolCall("d", "get_weather", '{"city":"Paris, TX"}')
    text = HERMES.separator.join(call_text(c, HERMES) for c in [CALLS[0], same, same, longer])
    _, calls, deltas = parse(HERMES, text, step)
    assert [c.arguments for c in calls] == ['{"city":"Paris"}', '{"city":"Paris, TX"}']
    assert [(c.name, c.arguments) for c in join_deltas(deltas)] == [
        (c.name, c.arguments) for c in calls]
    assert sorted({d.call for d in deltas}) == [0, 1]

"""Tool calls in the model family's own text format, both ways: conversation turns for the
chat template (tools, assistant calls, tool results) and the parse of a reply into content
and OpenAI-style calls, incrementally while it streams.

Formats, chosen by what the chat template knows:
- `hermes` (Qwen 2.5/3, Hermes, SmolLM3, ...: the template mentions `<tool_call>`):
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call.
- `llama3_json` (Llama 3.x: the template renders tools and speaks of "parameters"):
  `{"name": "f", "parameters": {...}}`, calls separated by a newline.
- `fallback`, for templates without tool support: the hermes text, taught by a system
  message ember writes (FALLBACK_INSTRUCTIONS), with earlier calls and results rendered as
  plain assistant and user turns. The grammar makes even a model never trained on it
  produce well-formed calls.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.types import ChatMessage, ToolCall, ToolCallDelta, ToolSpec

# Roles a chat template knows; "developer" is OpenAI's newer name for "system".
ROLE_FOR_TEMPLATE = {"developer": "system"}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # before each call's JSON
    close: str  # after it
    arguments_key: str
    separator: str  # between calls
    native: bool  # the chat template renders tools, calls and results itself

    @property
    def head(self) -> str:
        """A call's text up to its function name."""
        return self.open + '{"name": "'

    @property
    def trigger(self) -> str:
        """What starts a call in free text: its tag, or the JSON's start without one."""
        return self.open.strip() or self.head

    @property
    def after_name(self) -> str:
        return f'", "{self.arguments_key}": '

    @property
    def after_arguments(self) -> str:
        return "}" + self.close

    def bare(self) -> ToolFormat:
        """The same calls without their tags: small models trained on a tagged format often
        write `{"name": ..., "arguments": ...}` alone; under `auto` a reply that starts so
        is read (and constrained) as calls."""
        return ToolFormat(f"{self.name}-bare", "", "", self.arguments_key, "\n", self.native)


HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "\n", True)
LLAMA3_JSON = ToolFormat("llama3_json", "", "", "parameters", "\n", True)
FALLBACK = ToolFormat("fallback", "<tool_call>\n", "\n</tool_call>", "arguments", "\n", False)


def detect_format(template: str | None) -> ToolFormat:
    """The tool format a chat template speaks (its source text says which)."""
    if template and "tools" in template:
        if "<tool_call>" in template:
            return HERMES
        if "parameters" in template:
            return LLAMA3_JSON
    return FALLBACK


FALLBACK_INSTRUCTIONS = (
    "You can call functions. The functions, as JSON Schemas:\n{tools}\n"
    "To call one, reply with exactly\n<tool_call>\n"
    '{{"name": "<function name>", "arguments": <its arguments as a JSON object>}}\n'
    "</tool_call>\nand nothing else; results come back as <tool_response> blocks. "
    "Otherwise answer in plain text."
)


def tool_schemas(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """OpenAI's tool objects, as chat templates take them."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": dict(t.parameters)}}
            for t in tools]


def call_text(call: ToolCall, fmt: ToolFormat) -> str:
    return (f"{fmt.head}{call.name}{fmt.after_name}{call.arguments or '{}'}"
            f"{fmt.after_arguments}")


def _arguments_object(arguments: str) -> Any:
    """Templates render arguments with `tojson`: give them the object, not its text."""
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return arguments


def template_turns(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec],
                   fmt: ToolFormat) -> list[dict[str, Any]]:
    """The conversation as chat-template turns. With a native format, tool calls and tool
    results go to the template as OpenAI fields; the fallback writes them as text."""
    turns: list[dict[str, Any]] = []
    if tools and not fmt.native:
        listing = "\n".join(json.dumps(t) for t in tool_schemas(tools))
        instructions = FALLBACK_INSTRUCTIONS.format(tools=listing)
        if messages and messages[0].role in ("system", "developer"):
            instructions = f"{messages[0].content}\n\n{instructions}"
            messages = messages[1:]
        turns.append({"role": "system", "content": instructions})
    for message in messages:
        role = ROLE_FOR_TEMPLATE.get(message.role, message.role)
        if fmt.native:
            turn: dict[str, Any] = {"role": role, "content": message.content}
            if message.tool_calls:
                turn["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": _arguments_object(c.arguments)}}
                    for c in message.tool_calls]
            if message.tool_call_id is not None:
                turn["tool_call_id"] = message.tool_call_id
            turns.append(turn)
        elif message.role == "tool":
            turns.append({"role": "user", "content":
                          f"<tool_response>\n{message.content}\n</tool_response>"})
        else:
            text = "\n".join([message.content] * bool(message.content)
                             + [call_text(c, FALLBACK) for c in message.tool_calls])
            turns.append({"role": role, "content": text})
    return turns


def join_deltas(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """One choice's streamed call pieces as whole calls, in call order."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.call, [delta.id or "", delta.name or "", ""])
        call[2] += delta.arguments
    return [ToolCall(*calls[index]) for index in sorted(calls)]


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18)


class ToolCallParser:
    """Splits one choice's streamed text into content and tool calls in `fmt`.

    Text that could still turn into a call's opening is held back, so a half tag never
    goes out as content. Once a call opens, its name is sent as soon as it is complete and
    its arguments piece by piece; the grammar guarantees the shape, so the parse is exact.

    A call identical to an earlier one of the reply (same function, same arguments) is
    dropped: small models asked for parallel calls repeat one until the limit. While a call
    can still turn out a repeat, its pieces are held back."""

    def __init__(self, index: int, fmt: ToolFormat):
        self.index = index
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._buffer = ""  # text not yet sent
        self._in_call = False
        self._started = not fmt.open  # past the point where a bare call could begin
        self._name: str | None = None
        self._id = ""
        self._arguments = ""
        self._held: list[ToolCallDelta] = []  # pieces of a call that may repeat an earlier one

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        """Content strings and call deltas that are final after `text`."""
        self._buffer += text
        out: list[str | ToolCallDelta] = []
        while True:
            if not self._started and self.fmt.open:
                start = self._buffer.lstrip()
                bare = self.fmt.bare().head
                if bare.startswith(start):
                    return []  # may still become a bare call
                self._started = True
                if start.startswith(bare):
                    self.fmt = self.fmt.bare()
                    self._buffer = start
            if not self._in_call:
                at = self._buffer.find(self.fmt.head)
                if at < 0:
                    # Held back: a possible start of a call, and trailing whitespace (it
                    # belongs to the content only if more text follows).
                    partial = _partial_suffix(self._buffer, self.fmt.head)
                    before = self._buffer[:len(self._buffer) - partial]
                    keep = len(self._buffer) - len(before.rstrip())
                    if len(self._buffer) > keep:
                        out.append(self._buffer[:len(self._buffer) - keep])
                        self._buffer = self._buffer[len(self._buffer) - keep:]
                    return [piece for piece in out if piece != ""]
                out.append(self._buffer[:at].rstrip())
                self._buffer = self._buffer[at + len(self.fmt.head):]
                self._in_call, self._name, self._arguments = True, None, ""
            if self._name is None:
                end = self._buffer.find(self.fmt.after_name)
                if end < 0:
                    return [piece for piece in out if piece != ""]
                self._name = self._buffer[:end]
                self._id = new_call_id()
                self._buffer = self._buffer[end + len(self.fmt.after_name):]
                self._send(ToolCallDelta(self.index, len(self.calls), self._id, self._name), out)
            # A call ends at its closing text; without one (llama3), where the next begins.
            # Neither can occur inside the JSON: its strings escape newlines.
            end_marker = self.fmt.after_arguments if self.fmt.close else (
                "}" + self.fmt.separator + self.fmt.head)
            closing = self._buffer.find(end_marker)
            if closing >= 0:
                consumed = len(end_marker) if self.fmt.close else 1
                piece, self._buffer = self._buffer[:closing], self._buffer[closing + consumed:]
                self._finish_call(piece, out)
                continue
            keep = _partial_suffix(self._buffer, end_marker) or (
                0 if self.fmt.close else int(self._buffer.endswith("}")))
            if len(self._buffer) > keep:
                piece = self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                self._arguments += piece
                self._send(ToolCallDelta(self.index, len(self.calls), arguments=piece), out)
            return [piece for piece in out if piece != ""]

    def _may_repeat(self) -> bool:
        return any(call.name == self._name and call.arguments.startswith(self._arguments)
                   for call in self.calls)

    def _send(self, delta: ToolCallDelta, out: list[str | ToolCallDelta]) -> None:
        """Out now, unless the call so far could still be a repeat: then held."""
        self._held.append(delta)
        if not self._may_repeat():
            out += self._held
            self._held = []

    def _finish_call(self, piece: str, out: list[str | ToolCallDelta]) -> None:
        self._arguments += piece
        if piece:
            self._send(ToolCallDelta(self.index, len(self.calls), arguments=piece), out)
        repeat = any(call.name == self._name and call.arguments == self._arguments
                     for call in self.calls)
        if not repeat:
            out += self._held
            self.calls.append(ToolCall(self._id, self._name or "", self._arguments))
        self._held = []
        self._in_call, self._name = False, None

    def finish(self) -> list[str | ToolCallDelta]:
        """The reply ended: what is left. A call without a closing tag (llama3 format, or a
        reply cut by max_tokens) ends where the text ends."""
        out: list[str | ToolCallDelta] = []
        if self._in_call and self._name is not None:
            text = self._buffer
            if not self.fmt.close and text.endswith("}"):
                text = text[:-1]  # llama3: the call object's own closing brace
            self._buffer = ""
            self._finish_call(text, out)
        elif not self._in_call and not self.calls:
            out.append(self._buffer)
        self._buffer = ""
        return [piece for piece in out if piece != ""]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0

"""Tool-call formats of chat templates, shared by every chat backend (which renders the
conversation with them) and the engine (which parses replies and builds grammars with them).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.contracts.chat import ChatMessage, ToolCall, ToolSpec

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

"""Function tools as OpenAI-style clients send them, shared by the dialects that take that
shape (OpenAI's chat completions; seed 001's `/v1/ai/chat`), and their translation into the
engine's ToolSpec. Each dialect keeps its own field names for errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.contracts.chat import (
    OutputConstraint,
    ResponseFormat,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
)
from engine.core.errors import InvalidRequestError

# What OpenAI allows in a function name.
FUNCTION_NAME = r"^[A-Za-z0-9_.:-]+$"


class FunctionCallIn(BaseModel):
    """A call in a conversation's history: `arguments` is its JSON text."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    arguments: str = ""


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallIn


class NamedFunction(BaseModel):
    name: str = Field(min_length=1)


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=FUNCTION_NAME)
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(BaseModel):
    """`{"type": "function", "function": {...}}`; the flat `{"name", "parameters", ...}` that
    some gateway clients send is read as the same."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionIn

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, value: Any) -> Any:
        if isinstance(value, dict) and "function" not in value and "name" in value:
            return {"type": value.get("type", "function"),
                    "function": {k: v for k, v in value.items() if k != "type"}}
        return value


def tool_specs(tools: list[ToolIn] | None) -> tuple[ToolSpec, ...]:
    return tuple(ToolSpec(t.function.name, t.function.description,
                          t.function.parameters or {"type": "object"}) for t in tools or [])


def history_calls(calls: list[ToolCallIn] | None) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in calls or [])


def output_constraint(
    format_type: str | None, schema: dict[str, Any] | None, schema_name: str,
    tools: list[ToolIn] | None, choice: str | None, parallel: bool,
) -> OutputConstraint | None:
    """`response_format` (its type, and a json_schema's schema) and tools with the choice
    (auto/none/required, or a function's name) as the engine's constraint; None: free text."""
    response_format = None
    if format_type is not None and format_type != "text":
        if format_type == "json_schema" and schema is None:
            raise InvalidRequestError(
                "Missing required parameter: 'response_format.json_schema.schema'.",
                param="response_format.json_schema.schema", code="missing_required_parameter")
        response_format = ResponseFormat(format_type, schema, schema_name)  # type: ignore[arg-type]
    if response_format is None and not tools and choice is None:
        return None
    return OutputConstraint(
        response_format=response_format, tools=tool_specs(tools),
        tool_choice=choice or "auto", parallel_tool_calls=parallel,
        param="response_format.json_schema.schema" if format_type == "json_schema"
        else "response_format")


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's tool_calls objects."""
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """A streamed piece of a call in OpenAI's delta shape: the first names it, the rest add
    to its arguments."""
    call: dict[str, Any] = {"index": delta.call, "function": {"arguments": delta.arguments}}
    if delta.id is not None:
        call.update(id=delta.id, type="function")
        call["function"]["name"] = delta.name
    return {"tool_calls": [call]}

"""Function tools as OpenAI-style clients send them, shared by the dialects that take that
shape (OpenAI's chat completions; seed 001's `/v1/ai/chat`), and their translation into the
engine's ToolSpec. Each dialect keeps its own field names for errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.types import ToolSpec

# What OpenAI allows in a function name.
FUNCTION_NAME = r"^[A-Za-z0-9_.:-]+$"


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

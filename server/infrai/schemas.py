"""Wire schemas of the `/v1/ai/*` API (seed 001), snake_case as it sends them. Unknown fields
are accepted and ignored; a known field with a bad value is a 400 naming it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.openapi import AT_LEAST_ONE, NonBlank, NonEmpty, Published
from server.tools_wire import NamedFunction, ToolCallIn, ToolIn
from server.wire import Size, SpeechInput, Temperature

Prefer = Literal["balanced", "cheapest", "smartest"]
TaskName = Literal["general", "reasoning", "coding", "long_context"]
CacheStrategy = Literal["vendor", "infrai", "none"]


class Body(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str | None = Field(None, min_length=1)
    vendor: Annotated[str, Published(const="ember")] | None = None  # ember serves every request


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # None: an assistant turn that only made tool calls
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class JsonSchemaIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class ResponseFormatIn(BaseModel):
    """`{type}`; a json_schema one carries `json_schema: {name, schema}` (OpenAI's shape) or
    `schema` directly."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    def schema_object(self) -> dict[str, Any] | None:
        return self.json_schema.schema_ if self.json_schema is not None else self.schema_


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatIn(Body):
    # A prompt string is one user message; kept a list type so errors name the message.
    messages: list[ChatMessageIn]
    task: TaskName = "general"
    prefer: Prefer = "balanced"
    temperature: Temperature | None = None
    max_tokens: int | None = Field(None, ge=1)
    tools: list[ToolIn] | None = Field(None, max_length=128)
    # Extensions beside `tools`, as OpenAI's: which tool, and whether several calls may come.
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormatIn | None = None
    cache_strategy: CacheStrategy = "vendor"
    batch_mode: bool = False
    max_cost_multiplier: float = Field(1.5, gt=0)
    stream: bool = False
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)
    timeout_seconds: float = Field(60, gt=0)

    @field_validator("messages", mode="before")
    @classmethod
    def _prompt_string(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value


class EmbedIn(Body):
    input: NonEmpty | Annotated[list[NonEmpty], AT_LEAST_ONE]
    dimensions: int | None = Field(None, ge=1)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)


class ImageIn(Body):
    prompt: NonBlank
    size: Size | None = None
    n: int = Field(1, ge=1, le=10)
    prefer: Prefer = "balanced"


class MediaRef(BaseModel):
    """`{url}` or `{base64, mime?}`: exactly one of url and base64."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"oneOf": [
        {"required": ["url"], "properties": {"url": {"type": "string"}}},
        {"required": ["base64"], "properties": {"base64": {"type": "string"}}},
    ]})

    url: str | None = Field(None, min_length=1)
    base64: str | None = Field(None, min_length=1)
    mime: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> MediaRef:
        if (self.url is None) == (self.base64 is None):
            raise ValueError("give exactly one of url and base64")
        return self


class VisionIn(Body):
    """ember extensions: temperature, max_tokens (as chat)."""

    prompt: str = Field(min_length=1)
    images: list[MediaRef] = Field(min_length=1)
    temperature: Temperature | None = None
    max_tokens: int | None = Field(None, ge=1)


class TtsIn(Body):
    input: SpeechInput
    voice: str | None = Field(None, min_length=1)
    format: Literal["mp3", "wav", "ogg", "pcm"] = "mp3"


class AsrIn(Body):
    audio: MediaRef
    language: str | None = Field(None, min_length=1)


class RealtimeTokenIn(Body):
    voice: str | None = None
    ttl_seconds: int | None = Field(None, gt=0)

"""Wire schemas of OpenAI's API, as its clients send them. Unknown fields are accepted and
ignored (clients add new ones all the time); only a known field with a bad value is a 400."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from server.openapi import AT_LEAST_ONE, NonEmpty, TokenIds
from server.tools_wire import NamedFunction, ToolCallIn, ToolIn
from server.wire import Temperature, representable_penalty

log = logging.getLogger("ember.http")

class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def note_unknown(self, path: str) -> None:
        """Unknown fields are accepted and ignored; a debug line says which."""
        if unknown := self.unknown_fields():
            log.debug("%s: ignoring unknown fields %s", path, unknown)


class ChatMessageIn(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(WireModel):
    include_usage: bool = False


class JsonSchemaIn(WireModel):
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None


StopField = Annotated[str | list[str] | None, Field(None)]


class SamplingFields(WireModel):
    """Fields chat and completions share. Unset sampling fields take the model's defaults.
    Ember extensions (as vLLM's): top_k, min_p, repetition_penalty, ignore_eos."""

    model: str = Field(min_length=1)
    temperature: Temperature | None = None
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: Annotated[
        float, Field(gt=0, le=10), AfterValidator(representable_penalty)] | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Any 64-bit value, signed or not; a bigger one is a 400 here, never a failed decode.
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


# A prompt or input: a string, token ids, or a list of either; none of them empty.
TextsOrTokens = (NonEmpty | TokenIds | Annotated[list[NonEmpty], AT_LEAST_ONE]
                 | Annotated[list[TokenIds], AT_LEAST_ONE])


class CompletionRequest(SamplingFields):
    prompt: TextsOrTokens
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class EmbeddingRequestIn(WireModel):
    model: str = Field(min_length=1)
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class LoadRequest(WireModel):
    model: str = Field(min_length=1)

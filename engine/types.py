"""Internal, dialect-free request and result types. Every dialect translates into these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    """A chat (messages) or a text completion (prompt text or token ids)."""

    model: str
    params: SamplingParams
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    echo: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


GenerationEvent = TextDelta | ChoiceFinished | Usage


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: FinishReason | None = None


@dataclass
class GenerationResult:
    model: str
    choices: list[Choice]
    usage: Usage


@dataclass
class EmbeddingRequest:
    model: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass
class EmbeddingResult:
    model: str
    vectors: Any  # numpy float32 array, shape (n, dims)
    prompt_tokens: int

"""Chat and completions: the engine's request, event and result types, and the contract
between the generation core (engine/generation/scheduler.py) and a chat backend.

The core owns sequences: admission, the KV budget, `n`, sampling, stop strings, detokenizing,
usage, cancellation. A backend owns the weights and the KV cache, and knows nothing of
requests: it renders and tokenizes prompts, runs one step over a set of sequences (prompt
chunks to prefill, one token each to decode) and returns a logits row for each sequence that
needs its next token, forks a prompt's cache for `n` choices, and releases sequences.

Nothing here imports torch: logits cross the seam as float32 numpy rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import field_validator

from engine.contracts.base import AdapterOptions

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


@dataclass
class ImageInput:
    """An image in a chat message: where it comes from and, once the engine has fetched and
    decoded it, the image itself."""

    url: str  # a data: URI or an http(s) URL, as the caller sent it
    param: str  # the field holding the URL, for errors (`messages[0].content[1].image_url.url`)
    part: str  # the content part (`messages[0].content[1]`)
    image: Any = None  # PIL.Image.Image in RGB, set by the engine before the model sees it


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made: `arguments` is the JSON text of its arguments."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    # Only for messages with images: text (str) and images in the caller's order. `content`
    # is then the text parts joined.
    parts: tuple[str | ImageInput, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @property
    def images(self) -> list[ImageInput]:
        return [part for part in self.parts if isinstance(part, ImageInput)]


# OpenAI's defaults, for whatever neither the request nor the model's defaults set.
OPENAI_SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": None,
}


@dataclass
class SamplingParams:
    """What the caller asked for; None = not set, so the model's own defaults apply."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = 1
    ignore_eos: bool = False

    def resolved(self, *defaults: Mapping[str, Any]) -> Sampling:
        """The request's fields, each unset one from the first of `defaults` that has it
        (the model's registry `sampling:`, its generation_config.json), then OpenAI's."""
        values: dict[str, Any] = {}
        for name, fallback in OPENAI_SAMPLING_DEFAULTS.items():
            value = getattr(self, name)
            if value is None:
                value = next((d[name] for d in defaults if d.get(name) is not None), fallback)
            values[name] = value
        return Sampling(**values, seed=self.seed, stop=tuple(self.stop), n=self.n,
                        ignore_eos=self.ignore_eos)


@dataclass(frozen=True)
class Sampling:
    """Sampling settled for one request: every field has its value."""

    max_tokens: int | None = None  # None: the rest of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    ignore_eos: bool = False

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """Plain argmax: no temperature and nothing that reshapes the logits."""
        return self.temperature == 0 and not self.penalized


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is its arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})


# "auto" (text or calls), "none" (never a call), "required" (at least one call), or the name
# of the one function that must be called.
ToolChoice = str


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON valid against `schema`."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: Mapping[str, Any] | None = None
    name: str = ""


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must be, as the dialect asked; `param` names the field for errors."""

    response_format: ResponseFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    param: str = "response_format"  # the dialect's field names, for errors
    tools_param: str = "tools"
    tool_parameters_param: str = "tools[{index}].function.parameters"
    tool_choice_param: str = "tool_choice"

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


@dataclass
class GenerationRequest:
    """A chat (messages) or a text completion (prompt text or token ids)."""

    model: str | None  # None: the task's default model
    params: SamplingParams
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    echo: bool = False
    request_id: str = ""
    constraint: OutputConstraint | None = None
    # Asked for, not built yet: the generation service refuses them, once for every dialect.
    logprobs: bool = False
    suffix: str | None = None  # completions: text to insert before
    best_of: int | None = None  # completions: only best_of == n (no reranking of choices)

    def images(self) -> list[ImageInput]:
        return [image for m in self.messages or [] for image in m.images]


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of a tool call of choice `index`: the first one of call `call` carries its id and
    name, later ones pieces of its arguments."""

    index: int
    call: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


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


GenerationEvent = TextDelta | ToolCallDelta | ChoiceFinished | Usage


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class GenerationResult:
    model: str
    choices: list[Choice]
    usage: Usage
    served_by: str = ""  # the id of the registry entry that ran it


# -- the backend contract ----------------------------------------------------------------------


@dataclass
class PromptInput:
    """A prompt as the backend tokenized it. `extras` is backend-private (a vision prompt's
    pixel tensors); a prompt with extras is prefilled whole, alone, in one step."""

    ids: list[int]
    text: str
    extras: dict[str, Any] | None = None


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens of one sequence, at positions start .. start + len(tokens) - 1.
    `last`: the prompt's final chunk; the logits of its last token are returned."""

    seq_id: int
    tokens: list[int]
    start: int
    last: bool
    extras: dict[str, Any] | None = None


@dataclass(frozen=True)
class DecodeToken:
    """The newest token of a running sequence, at `position` (its length before it)."""

    seq_id: int
    token: int
    position: int


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[DecodeToken] = field(default_factory=list)

    def logit_seq_ids(self) -> list[int]:
        """The sequences whose logits `execute` returns, in its rows' order: final prefill
        chunks first, then decoded tokens."""
        return [c.seq_id for c in self.prefill if c.last] + [d.seq_id for d in self.decode]

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


@runtime_checkable
class ChatBackend(Protocol):
    """What the core needs from a model. Attributes are read after `load`."""

    context_length: int  # longest sequence (prompt + completion) one sequence may have
    vocab_size: int  # width of a logits row
    eos_ids: frozenset[int]
    kv_capacity: int  # KV tokens the backend holds, summed over every sequence
    max_sequences: int  # sequences it can hold at once

    def render_chat(self, messages: Sequence[ChatMessage],
                    tools: Sequence[ToolSpec] = ()) -> PromptInput:
        """The chat template applied (generation prompt added) and tokenized, with `tools`
        in the template's own tool format (engine/contracts/chat_templates.py:
        template_turns). Raises UnsupportedFeatureError when the model has no template,
        InvalidRequestError for inputs it cannot take."""
        ...

    def chat_template(self) -> str | None:
        """The chat template's source (it says which tool-call format the model speaks)."""
        ...

    def grammar_tokenizer(self) -> Any:
        """An llguidance.LLTokenizer over this vocabulary, `vocab_size` wide, for the core's
        output grammars. Built once per model (about a second); raises
        UnsupportedFeatureError where the backend cannot give one."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """A completion prompt's ids (special tokens as the model adds them)."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped. May end in U+FFFD on a partial character."""
        ...

    def execute(self, plan: StepPlan) -> np.ndarray:
        """Run one step; float32 logits of shape (len(plan.logit_seq_ids()), vocab_size).
        A sequence first appears as a PrefillChunk with start 0; decoded tokens extend it."""
        ...

    def fork(self, parent: int, children: Sequence[int]) -> None:
        """After `parent`'s last prefill chunk: each child starts with a copy of its cache."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget a sequence (finished, cancelled or failed) and free its KV. An id it does
        not hold (cancelled before its first chunk) is a no-op."""
        ...

    def live_sequences(self) -> set[int]:
        """Sequences holding KV now (nothing is left once every request is done)."""
        ...

    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults the checkpoint ships (generation_config.json), by
        SamplingParams field name; {} when it has none."""
        ...


class ChatOptions(AdapterOptions):
    """Chat models, on either backend (models.chat:TransformersChat, models.llamacpp:
    LlamaCppChat, models.vision:VisionChat): one entry may be served by either."""

    # The vision model (a `task: vision` entry) that answers this chat model's requests with
    # images (read by engine/generation/vision.py).
    vision_model: str | None = None
    # llama.cpp: one KV pool shared by every sequence, instead of kv_cache_tokens /
    # max_sequences cells each.
    kv_unified: bool = False
    # llama.cpp's flash attention: off by default, so a token's logits never depend on how
    # its batch was cut; "auto" lets llama.cpp choose.
    flash_attn: bool | Literal["auto"] = False

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_attn(cls, value: Any) -> Any:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("must be auto, true or false")

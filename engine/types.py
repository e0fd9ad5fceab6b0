"""Internal, dialect-free request and result types. Every dialect translates into these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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

    model: str
    params: SamplingParams
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    echo: bool = False
    request_id: str = ""
    constraint: OutputConstraint | None = None

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


# -- speech ------------------------------------------------------------------------------------

SpeechTask = Literal["transcribe", "translate"]


@dataclass(frozen=True)
class TranscriptionRequest:
    """Speech to text. `translate` transcribes into English."""

    model: str
    audio: bytes
    task: SpeechTask = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    vad_filter: bool = False


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class TranscriptSegment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[WordTiming] = field(default_factory=list)


@dataclass(frozen=True)
class TranscriptionInfo:
    """Sent after the last segment: the language (given or detected) and the audio's length."""

    language: str
    duration: float


@dataclass
class Transcription:
    task: SpeechTask
    language: str
    duration: float
    segments: list[TranscriptSegment]

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments).strip()


@dataclass(frozen=True)
class SpeechRequest:
    """Text to speech. `voice` is a voice name or an alias of one (OpenAI's names)."""

    model: str
    text: str
    voice: str
    speed: float = 1.0


@dataclass(frozen=True)
class SpeechChunk:
    """Mono float32 samples of one synthesized sentence."""

    samples: Any  # numpy float32 array
    sample_rate: int


# -- images ------------------------------------------------------------------------------------

ImageMode = Literal["generate", "edit", "variation"]


@dataclass(frozen=True)
class ImageRequest:
    """Text to image, or (with `image`) image to image; `mask` marks where to repaint
    (transparent pixels, as OpenAI's edits). None means the model's own default."""

    model: str
    prompt: str
    mode: ImageMode = "generate"
    n: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    quality: str = "auto"
    strength: float | None = None
    image: bytes | None = None
    mask: bytes | None = None
    output_format: str = "png"


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes  # encoded in the requested format
    media_type: str
    suffix: str
    seed: int


@dataclass
class ImageResult:
    prompt: str
    images: list[GeneratedImage]


# -- rerank and moderation ---------------------------------------------------------------------

# OpenAI's moderation categories. Every result carries all of them; a category the model does
# not cover scores 0.0 and is never flagged.
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)


@dataclass(frozen=True)
class RerankRequest:
    """Order `documents` by relevance to `query`; `top_n` keeps the best n (None: all);
    `model` None means the default reranker."""

    model: str | None
    query: str
    documents: list[str]
    top_n: int | None = None


@dataclass(frozen=True)
class RankedDocument:
    index: int  # the document's position in the request
    relevance_score: float


@dataclass
class RerankResult:
    model: str  # the name the caller sent, or the default model's id
    results: list[RankedDocument]  # most relevant first
    total_tokens: int


@dataclass(frozen=True)
class ModerationRequest:
    """Classify each text on its own; `model` None means the default moderation model."""

    model: str | None
    texts: list[str]


@dataclass(frozen=True)
class ModerationVerdict:
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


@dataclass
class ModerationResult:
    model: str  # the name the caller sent, or the default model's id
    results: list[ModerationVerdict]

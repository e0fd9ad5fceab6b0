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

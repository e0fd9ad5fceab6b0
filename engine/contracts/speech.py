"""Speech: transcription and synthesis types, and the contracts speech models implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from engine.contracts.base import BatchBackend

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


@runtime_checkable
class Transcriber(BatchBackend, Protocol):
    """Audio to text, window by window. `prepare` checks the request and decodes the audio into
    windows (on a worker thread); `batch` decodes windows of any requests together."""

    multilingual: bool

    def prepare(self, request: TranscriptionRequest, max_seconds: float) -> Any: ...

    def window_between(self, prepared: Any, start: float, end: float,
                       language: str | None) -> Any: ...


@runtime_checkable
class Synthesizer(BatchBackend, Protocol):
    """Text to float32 samples at `sample_rate`, a sentence at a time."""

    sample_rate: int

    def sentences(self, request: SpeechRequest) -> list[str]: ...

    def prepare(self, request: SpeechRequest, sentences: list[str] | None = None) -> list[Any]: ...

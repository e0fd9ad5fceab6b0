"""Speech: transcription and synthesis types, and the contracts speech models implement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field, field_validator

from engine.contracts.base import AdapterOptions, BatchBackend

SpeechTask = Literal["transcribe", "translate"]


@dataclass(frozen=True)
class TranscriptionRequest:
    """Speech to text. `translate` transcribes into English."""

    model: str | None  # None: the task's default model
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
    """One segment, as the wire sends it. Times are in seconds into the request's audio,
    rounded to the millisecond. A model numbers a window's segments from 0; the engine
    renumbers them across the request (`dataclasses.replace(segment, id=...)`)."""

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
    served_by: str = ""  # the id of the registry entry that ran it

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments).strip()


@dataclass(frozen=True)
class SpeechRequest:
    """Text to speech. `voice` is a voice name or an alias of one (OpenAI's names)."""

    model: str | None  # None: the task's default model
    text: str
    voice: str
    speed: float = 1.0


@dataclass(frozen=True)
class SpeechChunk:
    """Mono float32 samples of one synthesized sentence."""

    samples: Any  # numpy float32 array
    sample_rate: int


@dataclass(frozen=True)
class AudioWindow:
    """One piece of a request's audio (at most the model's input length), ready for the
    encoder, with how to decode it. `language` None: still to detect."""

    features: np.ndarray  # the model's input features (Whisper: (n_mels, 3000) log-mel)
    offset: float  # seconds into the request's audio
    duration: float
    task: SpeechTask
    language: str | None
    prompt: str | None
    temperature: float
    word_timestamps: bool


@dataclass
class PreparedAudio:
    """A request's audio, decoded and cut into windows in order. `audio` (mono float32 at the
    model's rate) is kept, so a window can be decoded again from a later point."""

    windows: list[AudioWindow]
    duration: float  # seconds of audio in the request
    audio: np.ndarray
    request: TranscriptionRequest


@dataclass
class WindowResult:
    """A window's segments (none for silence) in the language it was decoded in."""

    language: str
    segments: list[TranscriptSegment] = field(default_factory=list)
    # Where undecoded speech starts when the model stopped before the window's end (Whisper
    # resumes from its last timestamp, as its sequential decoding does); None when done.
    resume_at: float | None = None


@runtime_checkable
class Transcriber(BatchBackend, Protocol):
    """Audio to text, window by window. `prepare` checks the request and decodes the audio into
    windows (on a worker thread); `batch` decodes windows of any requests together; a result
    with `resume_at` set is finished by decoding `window_between(prepared, resume_at, window
    end, result.language)`."""

    multilingual: bool  # False: English only (no translation, no other language)

    def prepare(self, request: TranscriptionRequest, max_seconds: float) -> PreparedAudio:
        """Check the request's parameters (InvalidRequestError before any decoding), decode
        at most `max_seconds` of its audio and cut it into windows."""
        ...

    def window_between(self, prepared: PreparedAudio, start: float, end: float,
                       language: str | None) -> AudioWindow:
        """The audio from `start` to `end` seconds as a window, decoded in `language`."""
        ...

    def batch(self, items: list[AudioWindow]) -> Sequence[WindowResult]:
        """One result per window, in order."""
        ...

    def size_of(self, item: AudioWindow) -> int: ...


@runtime_checkable
class Synthesizer(BatchBackend, Protocol):
    """Text to float32 samples at `sample_rate`, a sentence at a time."""

    sample_rate: int

    def sentences(self, request: SpeechRequest) -> list[str]:
        """Check the voice (InvalidRequestError naming the known ones) and split the text
        into sentences."""
        ...

    def prepare(self, request: SpeechRequest, sentences: list[str] | None = None) -> list[Any]:
        """The items for `sentences` (default: all of the request's); sentences with nothing
        to pronounce give none, so the list may be empty."""
        ...

    def batch(self, items: list[Any]) -> Sequence[np.ndarray]:
        """Mono float32 samples per item (its sentence, then a short silence)."""
        ...


# -- the adapters' registry options -----------------------------------------------------------


class WhisperOptions(AdapterOptions):
    """faster-whisper (models.whisper:WhisperSpeechToText)."""

    # CTranslate2's compute type (int8, float16, float32, ...); None: int8 on CPU, float16 on
    # CUDA.
    compute_type: str | None = None
    beam_size: int = Field(5, gt=0)  # faster-whisper's default


class PiperVoiceOptions(AdapterOptions):
    """One voice of a (multi-speaker) Piper model."""

    speaker: int = 0  # the speaker id, for a multi-speaker model
    language: str | None = None  # BCP 47-like (en_US), for the voice listing


class PiperOptions(AdapterOptions):
    """Piper voices (models.piper:PiperVoice)."""

    voices: dict[str, PiperVoiceOptions] = Field(default_factory=dict)
    voice_aliases: dict[str, str] = Field(default_factory=dict)  # other names (OpenAI's)
    onnx_file: str | None = None  # when the folder holds several .onnx files
    # Where phonemes come from (models/phonemes.py): the espeakng-loader wheel's library in a
    # helper process, the espeak-ng program, or auto (the wheel when installed).
    phonemizer: Literal["auto", "library", "program"] = "auto"

    @field_validator("voices", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        """`voices: {joe: }` (a name alone) is a voice with the defaults."""
        if isinstance(value, dict):
            return {name: {} if voice is None else voice for name, voice in value.items()}
        return value

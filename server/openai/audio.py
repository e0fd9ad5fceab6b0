"""OpenAI's audio API on the wire: the multipart transcription/translation form, the speech
body, and the transcript formats (json, text, srt, vtt, verbose_json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import Field

from engine.contracts.speech import (
    SpeechRequest,
    Transcription,
    TranscriptionRequest,
    TranscriptSegment,
)
from engine.core.errors import InvalidRequestError
from engine.speech.service import SPEED_RANGE, language_name
from server.forms import read_form, validate_form
from server.openai.schemas import WireModel
from server.openapi import NonEmpty, Published
from server.wire import SpeechInput

TranscriptFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class TranscriptionForm(WireModel):
    """Form fields of /v1/audio/transcriptions and /translations. Ember extension: vad_filter."""

    model: str = Field(min_length=1)
    language: str | None = None
    prompt: str | None = None
    response_format: TranscriptFormat = "json"
    temperature: float = Field(0.0, ge=0, le=1)
    timestamp_granularities: list[Literal["word", "segment"]] = Field(
        default_factory=list, alias="timestamp_granularities[]"
    )
    stream: bool = False
    vad_filter: bool = False


async def read_transcription_form(
    request: Request, task: Literal["transcribe", "translate"]
) -> tuple[TranscriptionForm, TranscriptionRequest]:
    """The multipart form → the validated fields and the engine's request. A missing or
    non-file `file` and bad fields are 400s naming the field."""
    fields, files = await read_form(request, ("file",))
    if "file" not in files:
        raise InvalidRequestError(
            "Missing required parameter: 'file' (an audio file, sent as multipart form data).",
            param="file", code="missing_required_parameter",
        )
    body = validate_form(TranscriptionForm, fields)
    engine_request = TranscriptionRequest(
        model=body.model, audio=files["file"], task=task,
        # Translation always produces English; the source language is detected.
        language=(body.language or None) if task == "transcribe" else None,
        prompt=body.prompt, temperature=body.temperature,
        word_timestamps="word" in body.timestamp_granularities, vad_filter=body.vad_filter,
    )
    return body, engine_request


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[TranscriptSegment]) -> str:
    blocks = [
        f"{number}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for number, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: list[TranscriptSegment]) -> str:
    blocks = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _usage(result: Transcription) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(result.duration, 3)}


def transcript_json(result: Transcription, body: TranscriptionForm) -> dict[str, Any]:
    if body.response_format != "verbose_json":
        return {"text": result.text, "usage": _usage(result)}
    granularities = body.timestamp_granularities or ["segment"]
    verbose: dict[str, Any] = {
        "task": result.task,
        "language": language_name(result.language),
        "duration": round(result.duration, 3),
        "text": result.text,
    }
    if "segment" in granularities:
        verbose["segments"] = [
            {"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text,
             "tokens": s.tokens, "temperature": s.temperature, "avg_logprob": s.avg_logprob,
             "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
            for s in result.segments
        ]
    if "word" in granularities:
        verbose["words"] = [
            {"word": w.word.strip(), "start": w.start, "end": w.end}
            for s in result.segments for w in s.words
        ]
    verbose["usage"] = _usage(result)
    return verbose


def transcript_text(result: Transcription, response_format: str) -> str:
    if response_format == "srt":
        return to_srt(result.segments)
    if response_format == "vtt":
        return to_vtt(result.segments)
    return result.text + "\n"


class Voice(WireModel):
    id: str = Field(min_length=1)


# The engine refuses a speed outside SPEED_RANGE (and blank or over-long input: SpeechInput).
Speed = Annotated[float, Published(minimum=SPEED_RANGE[0], maximum=SPEED_RANGE[1])]


class SpeechRequestIn(WireModel):
    model: str = Field(min_length=1)
    input: SpeechInput
    voice: NonEmpty | Voice = "alloy"
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: Speed = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None



def speech_request(body: SpeechRequestIn) -> SpeechRequest:
    voice = body.voice if isinstance(body.voice, str) else body.voice.id
    return SpeechRequest(model=body.model, text=body.input, voice=voice, speed=body.speed)

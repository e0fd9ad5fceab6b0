"""Speech: the one implementation of transcription, translation and text to speech that every
dialect calls. Decoding, windowing and phonemizing run on worker threads; models run on the
compute thread through each model's `Batcher`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from engine.contracts.speech import (
    AudioWindow,
    PreparedAudio,
    SpeechChunk,
    SpeechRequest,
    Synthesizer,
    Transcriber,
    Transcription,
    TranscriptionInfo,
    TranscriptionRequest,
    TranscriptSegment,
    WindowResult,
)
from engine.core import metrics
from engine.core.audio_codec import MEDIA_TYPES, AudioEncoder
from engine.core.batcher import Batcher
from engine.core.errors import InvalidRequestError
from engine.core.manager import ModelManager
from engine.core.registry import ModelEntry, Registry, Task
from engine.core.settings import Settings
from engine.core.sources import resolve_source
from engine.media.artifacts import Artifact, ArtifactStore
from engine.media.fetch import AUDIO, decode_data_uri, fetch_media, vet_media_url

MAX_SPEECH_INPUT_CHARS = 4096  # OpenAI's limit on `input`
SPEED_RANGE = (0.25, 4.0)


def _segments(result: WindowResult, first_id: int) -> list[TranscriptSegment]:
    """A window's segments, numbered on from `first_id` across the request."""
    return [replace(segment, id=number)
            for number, segment in enumerate(result.segments, start=first_id)]


async def _decoded(
    runner: Batcher[AudioWindow, WindowResult], adapter: Transcriber, prepared: PreparedAudio,
    window: AudioWindow, result: WindowResult,
) -> AsyncIterator[WindowResult]:
    """A window's result, then what Whisper left undecoded in it: when the model stops before
    the window's end, the rest is decoded again from its last timestamp, as sequential
    Whisper does, until the window is covered (each pass must move on by a second)."""
    yield result
    window_end = window.offset + window.duration
    resume_at = result.resume_at
    while resume_at is not None:
        rest = adapter.window_between(prepared, resume_at, window_end, result.language)
        result = (await runner.submit_many([rest]))[0]
        yield result
        moved_on = result.resume_at is not None and result.resume_at >= resume_at + 1.0
        resume_at = result.resume_at if moved_on else None


def language_name(code: str) -> str:
    """Whisper's English name of a language code ("en" -> "english"), as OpenAI's verbose
    transcripts give it; an unknown code as it is."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES  # a dict, no model

    name: str = LANGUAGES.get(code, code)
    return name


def check_speech(request: SpeechRequest) -> None:
    if not request.text.strip():
        raise InvalidRequestError("input must not be empty", param="input")
    if len(request.text) > MAX_SPEECH_INPUT_CHARS:
        raise InvalidRequestError(
            f"input has {len(request.text)} characters; at most {MAX_SPEECH_INPUT_CHARS} are "
            "allowed", param="input",
        )
    low, high = SPEED_RANGE
    if not low <= request.speed <= high:
        raise InvalidRequestError(
            f"speed must be between {low} and {high}; got {request.speed}", param="speed"
        )


async def encoded_speech(
    chunks: AsyncIterator[SpeechChunk], fmt: str, *, streaming: bool = True
) -> AsyncIterator[bytes]:
    """Synthesized speech in `fmt`, each sentence encoded as it arrives (on a worker thread: an
    encoder call costs milliseconds), so the first bytes leave before the last sentence is
    synthesized (FLAC excepted: its header holds the length, so it comes whole at the end).
    `streaming=False`, for a caller that joins the parts into one file anyway, completes every
    header (WAV sizes, mp3's Xing frame). Closing this closes `chunks`, which stops the
    synthesis."""
    encoder: AudioEncoder | None = None
    async with aclosing(chunks):  # type: ignore[type-var]
        async for chunk in chunks:
            encoder = encoder or AudioEncoder(fmt, chunk.sample_rate, streaming=streaming)
            if data := await asyncio.to_thread(encoder.encode, chunk.samples):
                yield data
    if encoder is not None and (data := await asyncio.to_thread(encoder.finish)):
        yield data


class SpeechService:
    def __init__(self, settings: Settings, manager: ModelManager, files: ArtifactStore):
        self.settings = settings
        self.manager = manager
        self.files = files

    def voices(self) -> list[VoiceInfo]:
        return list_voices(self.manager.registry)

    def default_voice(self, model: str | None) -> str:
        """The first voice of the model (the default tts model when None)."""
        name = self.manager.registry.model_or_default(model, "tts")
        entry = self.manager.registry.resolve(name, "tts")
        voices = [v.id for v in self.voices() if v.model == entry.id]
        return voices[0] if voices else "alloy"

    def speak_encoded(self, request: SpeechRequest, fmt: str, *,
                      streaming: bool = True) -> AsyncIterator[bytes]:
        return encoded_speech(self.speak(request), fmt, streaming=streaming)

    async def speak_to_file(self, request: SpeechRequest, fmt: str, suffix: str) -> SpokenFile:
        """The whole clip, synthesized, encoded in `fmt` and kept in the file store."""
        data = b"".join([part async for part in self.speak_encoded(request, fmt,
                                                                   streaming=False)])
        artifact = await asyncio.to_thread(self.files.put, data, MEDIA_TYPES[fmt], suffix)
        return SpokenFile(artifact, self._entry(request.model, "tts").id)

    def _entry(self, model: str | None, task: Task) -> ModelEntry:
        registry = self.manager.registry
        return registry.resolve(registry.model_or_default(model, task), task)

    async def fetch_audio(self, model: str | None, url: str | None, data_uri: str | None,
                          param: str) -> bytes:
        """The audio a request points at, for `model`: a URL is vetted (a bad one is a 400
        whatever the model), the model checked installed (a 503 before anything is
        fetched), then fetched through the guarded fetcher; a data: URI is decoded under the
        same size cap."""
        if url is not None:
            await vet_media_url(url, self.settings, f"{param}.url", AUDIO)
        resolve_source(self._entry(model, "stt"))
        if url is not None:
            return await fetch_media(url, self.settings, f"{param}.url", AUDIO)
        return decode_data_uri(data_uri or "", f"{param}.base64", self.settings.fetch_max_bytes,
                               AUDIO)

    async def transcribe_stream(
        self, request: TranscriptionRequest
    ) -> AsyncIterator[TranscriptSegment | TranscriptionInfo]:
        """Segments as their windows are decoded, then one `TranscriptionInfo`.

        When the language is not given, the first window is decoded alone and its detected
        language is used for the rest, so a whole file is in one language."""
        model = self.manager.registry.model_or_default(request.model, "stt")
        async with self.manager.lease_as(model, "stt", Transcriber, Batcher) as slot:
            adapter, runner = slot.backend, slot.runner
            # prepare checks the parameters first, then decodes (a bad one costs no decoding)
            prepared = await asyncio.to_thread(adapter.prepare, request,
                                               self.settings.max_audio_seconds)
            windows = prepared.windows
            language = request.language or ("en" if not adapter.multilingual else None)
            next_id = 0
            if windows and language is None:
                first = (await runner.submit_many(windows[:1]))[0]
                language = first.language
                async for result in _decoded(runner, adapter, prepared, windows[0], first):
                    for segment in _segments(result, next_id):
                        next_id += 1
                        yield segment
                windows = [replace(window, language=language) for window in windows[1:]]
            index = 0
            # aclosing: a reader that stops early withdraws the queued windows now, not at GC.
            async with contextlib.aclosing(runner.stream(windows)) as stream:
                async for decoded in stream:
                    language = language or decoded.language
                    async for result in _decoded(runner, adapter, prepared, windows[index],
                                                 decoded):
                        for segment in _segments(result, next_id):
                            next_id += 1
                            yield segment
                    index += 1
            metrics.AUDIO_SECONDS.labels(slot.entry.id).inc(prepared.duration)
            yield TranscriptionInfo(language=language or "en", duration=prepared.duration)

    async def transcribe(self, request: TranscriptionRequest) -> Transcription:
        segments: list[TranscriptSegment] = []
        info = TranscriptionInfo("en", 0.0)
        async for event in self.transcribe_stream(request):
            if isinstance(event, TranscriptSegment):
                segments.append(event)
            else:
                info = event
        return Transcription(request.task, info.language, info.duration, segments,
                             self._entry(request.model, "stt").id)

    async def speak(self, request: SpeechRequest) -> AsyncIterator[SpeechChunk]:
        """Audio a sentence at a time, in order, as each is synthesized. The first sentence with
        something to pronounce is phonemized and queued alone, so its audio is on the way while
        espeak-ng works through the rest. Sentences with nothing to pronounce ("...") are skipped;
        input with nothing at all to pronounce is a 400 before any audio exists."""
        check_speech(request)
        model = self.manager.registry.model_or_default(request.model, "tts")
        async with self.manager.lease_as(model, "tts", Synthesizer, Batcher) as slot:
            adapter, runner = slot.backend, slot.runner
            sentences = adapter.sentences(request)
            first: list[Any] = []
            taken = 0
            while not first and taken < len(sentences):
                first = await asyncio.to_thread(adapter.prepare, request,
                                                sentences[taken:taken + 1])
                taken += 1
            if not first:
                raise InvalidRequestError(
                    "input has nothing to pronounce (only punctuation or symbols the voice cannot "
                    "say)", param="input",
                )
            rest = asyncio.create_task(
                asyncio.to_thread(adapter.prepare, request, sentences[taken:])
            )
            try:
                for batch in (first, None):
                    utterances = batch if batch is not None else await rest
                    if not utterances:
                        continue
                    async with contextlib.aclosing(runner.stream(utterances)) as stream:
                        async for samples in stream:
                            seconds = len(samples) / adapter.sample_rate
                            metrics.AUDIO_SECONDS.labels(slot.entry.id).inc(seconds)
                            yield SpeechChunk(samples, adapter.sample_rate)
            finally:
                rest.cancel()


@dataclass(frozen=True)
class SpokenFile:
    artifact: Artifact
    served_by: str


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    model: str
    language: str | None
    aliases: list[str] = field(default_factory=list)
    object: str = "voice"


def list_voices(registry: Registry) -> list[VoiceInfo]:
    """Voices are registry data (`options.voices`, `options.voice_aliases` of tts entries), so
    listing them loads no model."""
    found = []
    for entry in registry.entries():
        if entry.task != "tts":
            continue
        aliases: dict[str, str] = entry.options.get("voice_aliases", {})
        for name, voice in entry.options.get("voices", {}).items():
            found.append(VoiceInfo(
                id=name, model=entry.id, language=(voice or {}).get("language"),
                aliases=sorted(a for a, target in aliases.items() if target == name),
            ))
    return found

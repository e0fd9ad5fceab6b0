"""Speech to text on faster-whisper (CTranslate2) checkpoints.

A request's audio is split into windows of at most 30 s (Whisper's input size): at the
quietest point near each 30 s mark, or, with `vad_filter`, around the speech Silero VAD
finds. Each window is one item for the engine's `Batcher`, so windows of different requests
(and of one long file) are decoded together in one batched `generate`, and a stream can send
each window's text as soon as it is decoded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
from faster_whisper.transcribe import get_compression_ratio
from faster_whisper.vad import VadOptions, get_speech_timestamps

from engine.contracts.base import AdapterOptions
from engine.contracts.speech import (
    AudioWindow,
    PreparedAudio,
    TranscriptionRequest,
    TranscriptSegment,
    WhisperOptions,
    WindowResult,
    WordTiming,
)
from engine.core.audio_codec import decode_audio
from engine.core.errors import InvalidRequestError, ModelLoadError
from engine.core.sources import assemble
from models.base import ModelAdapter

SAMPLE_RATE = 16_000
WINDOW_S = 30.0
# A window that must be cut is cut at the quietest 20 ms frame of its last few seconds.
CUT_SEARCH_S = 5.0
# Whisper's own rule for a silent window: likely no speech and a low-confidence decode.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
# faster-whisper's defaults: marks merged into the neighbouring word's timing (with CJK forms).
PREPEND_PUNCTUATIONS = "\"'\u201c\u00bf([{-"
APPEND_PUNCTUATIONS = "\"'.\u3002,\uff0c!\uff01?\uff1f:\uff1a\u201d)]}\u3001"


def split_windows(audio: np.ndarray, sample_rate: int, window_s: float = WINDOW_S) -> list[
        tuple[int, int]]:
    """(start, end) sample spans of at most `window_s`, each cut at the quietest 20 ms frame of
    the last `CUT_SEARCH_S` seconds before the limit, so words are rarely cut in half."""
    limit, search, frame = int(window_s * sample_rate), int(CUT_SEARCH_S * sample_rate), \
        sample_rate // 50
    spans, start = [], 0
    while len(audio) - start > limit:
        low = start + limit - search
        region = audio[low:start + limit]
        energy = (region[: len(region) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1)
        cut = low + int(np.argmin(energy)) * frame + frame // 2
        spans.append((start, cut))
        start = cut
    spans.append((start, len(audio)))
    return spans


def speech_windows(audio: np.ndarray, sample_rate: int, window_s: float = WINDOW_S) -> list[
        tuple[int, int]]:
    """Spans around the speech that VAD finds, adjacent pieces merged while they fit a window;
    the silence between windows is skipped."""
    options = VadOptions(max_speech_duration_s=window_s, min_silence_duration_ms=160)
    pieces = get_speech_timestamps(audio, options, sampling_rate=sample_rate)
    limit = int(window_s * sample_rate)
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        if spans and piece["end"] - spans[-1][0] <= limit:
            spans[-1] = (spans[-1][0], piece["end"])
        else:
            spans.append((piece["start"], piece["end"]))
    return spans


class WhisperSpeechToText(ModelAdapter):
    """A `Transcriber`. Options: `WhisperOptions` (engine/contracts/speech.py)."""

    options_model: ClassVar[type[AdapterOptions]] = WhisperOptions
    options: WhisperOptions
    model: WhisperModel
    multilingual: bool

    def load(self) -> None:
        path = assemble(self.entry, self.context.models_dir)
        device = "cuda" if self.context.device.startswith("cuda") else "cpu"
        default_type = "float16" if device == "cuda" else "int8"
        compute_type = self.options.compute_type or default_type
        self.beam_size = self.options.beam_size
        try:
            import torch

            self.model = WhisperModel(
                str(path), device=device, compute_type=compute_type,
                cpu_threads=torch.get_num_threads(), local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"cannot load {self.entry.id!r} from {path}: {exc}") from exc
        self._weights_bytes = sum(f.stat().st_size for f in Path(path).glob("*.bin"))
        self.multilingual = bool(self.model.model.is_multilingual)
        self._tokenizers: dict[tuple[str, str], Tokenizer] = {}

    def memory_bytes(self) -> int:
        return self._weights_bytes

    def unload(self) -> None:
        self._tokenizers = {}
        super().unload()

    def warmup(self) -> None:
        silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
        window = self._window(silence, 0, len(silence), TranscriptionRequest("", b""), "en")
        self.batch([window])

    # -- the request thread ------------------------------------------------------------------

    def check(self, request: TranscriptionRequest) -> None:
        """Parameter checks that need no audio, so they fail before any upload is decoded."""
        if request.language is not None and request.language not in _LANGUAGE_CODES:
            raise InvalidRequestError(
                f"language must be an ISO-639-1 code Whisper knows (e.g. en, de, es); got "
                f"{request.language!r}",
                param="language",
            )
        if not self.multilingual:
            if request.task == "translate":
                raise InvalidRequestError(
                    f"{self.entry.id!r} is English-only and cannot translate; use a "
                    "multilingual Whisper model", param="model",
                )
            if request.language not in (None, "en"):
                raise InvalidRequestError(
                    f"{self.entry.id!r} transcribes English only; got language "
                    f"{request.language!r}", param="language",
                )
        if not 0.0 <= request.temperature <= 1.0:
            raise InvalidRequestError(
                f"temperature must be between 0 and 1; got {request.temperature}",
                param="temperature",
            )

    def prepare(self, request: TranscriptionRequest, max_seconds: float) -> PreparedAudio:
        """Decode, cut into windows and compute log-mel features (CPU work for a worker
        thread, off both the event loop and the compute thread)."""
        self.check(request)
        audio = decode_audio(request.audio, sample_rate=SAMPLE_RATE, max_seconds=max_seconds)
        find = speech_windows if request.vad_filter else split_windows
        language = request.language or (None if self.multilingual else "en")
        windows = [
            self._window(audio, start, end, request, language)
            for start, end in find(audio, SAMPLE_RATE)
        ]
        return PreparedAudio(windows, len(audio) / SAMPLE_RATE, audio, request)

    def window_between(
        self, prepared: PreparedAudio, start: float, end: float, language: str | None
    ) -> AudioWindow:
        """The audio from `start` to `end` seconds as a window (to resume a window's
        decoding)."""
        first, last = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        return self._window(prepared.audio, first, last, prepared.request, language)

    def _window(
        self, audio: np.ndarray, start: int, end: int, request: TranscriptionRequest,
        language: str | None,
    ) -> AudioWindow:
        features = self.model.feature_extractor(audio[start:end])[..., :-1]
        return AudioWindow(
            features=pad_or_trim(features), offset=start / SAMPLE_RATE,
            duration=(end - start) / SAMPLE_RATE, task=request.task, language=language,
            prompt=request.prompt, temperature=request.temperature,
            word_timestamps=request.word_timestamps,
        )

    @staticmethod
    def size_of(window: AudioWindow) -> int:
        return 0  # every window is padded to 30 s

    # -- the compute thread ------------------------------------------------------------------

    def batch(self, windows: list[AudioWindow]) -> list[WindowResult]:
        """Decode windows of any requests together: one batched encoder pass, language
        detection for the windows whose language is still unknown, then one `generate` per
        group of windows that share decoding options (usually a single group, which reuses the
        encoder output; other groups are encoded again with just their windows)."""
        encoded = self.model.encode(np.stack([w.features for w in windows]))
        languages = [w.language for w in windows]
        unknown = [i for i, lang in enumerate(languages) if lang is None]
        if unknown:
            detected = self.model.model.detect_language(encoded)
            for i in unknown:
                languages[i] = detected[i][0][0][2:-2]  # "<|de|>" → "de"
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, window in enumerate(windows):
            key = (languages[i], window.task, window.prompt, window.temperature,
                   window.word_timestamps)
            groups[key].append(i)
        results: list[WindowResult] = [WindowResult("")] * len(windows)
        for indexes in groups.values():
            group = [replace(windows[i], language=languages[i]) for i in indexes]
            reuse = encoded if len(groups) == 1 else None
            for i, result in zip(indexes, self._decode(group, reuse), strict=True):
                results[i] = result
        return results

    def _tokenizer(self, task: str, language: str) -> Tokenizer:
        key = (task, language)
        if key not in self._tokenizers:
            self._tokenizers[key] = Tokenizer(
                self.model.hf_tokenizer, self.multilingual, task=task, language=language
            )
        return self._tokenizers[key]

    def _decode(self, windows: list[AudioWindow], encoded: Any = None) -> list[WindowResult]:
        first = windows[0]
        assert first.language is not None
        tokenizer = self._tokenizer(first.task, first.language)
        previous = tokenizer.encode(" " + first.prompt.strip()) if first.prompt else []
        prompt = self.model.get_prompt(tokenizer, previous_tokens=previous)
        encoder_output = encoded if encoded is not None else self.model.encode(
            np.stack([w.features for w in windows])
        )
        search: dict[str, Any] = {"beam_size": self.beam_size}
        if first.temperature > 0:  # sampling over the whole vocabulary, as Whisper does
            search = {"beam_size": 1, "sampling_topk": 0,
                      "sampling_temperature": first.temperature}
        outputs = self.model.model.generate(
            encoder_output, [list(prompt) for _ in windows], **search,
            max_length=self.model.max_length, suppress_blank=True, suppress_tokens=[-1],
            return_scores=True, return_no_speech_prob=True,
        )
        frames_per_second = self.model.frames_per_second
        per_window, sizes, silent = [], [], []
        resumes: list[float | None] = []
        for window, output in zip(windows, outputs, strict=True):
            tokens = output.sequences_ids[0]
            avg_logprob = output.scores[0] * len(tokens) / (len(tokens) + 1)
            size = int(math.ceil(window.duration) * frames_per_second)
            seek = int(window.offset * frames_per_second)
            pieces, seek_frames, single_ending = self.model._split_segments_by_timestamps(
                tokenizer=tokenizer, tokens=tokens, time_offset=window.offset,
                segment_size=size, segment_duration=window.duration, seek=0,
            )
            pieces = pieces or [{"tokens": [], "start": window.offset,
                                 "end": window.offset + window.duration}]
            segments = []
            for piece in pieces:
                text = tokenizer.decode(piece["tokens"])
                segments.append({
                    "text": text, "tokens": piece["tokens"], "start": piece["start"],
                    "end": piece["end"], "seek": seek, "avg_logprob": avg_logprob,
                    "no_speech_prob": output.no_speech_prob, "temperature": first.temperature,
                    "compression_ratio": get_compression_ratio(text),
                })
            per_window.append(segments)
            sizes.append(size)
            is_silent = (output.no_speech_prob > NO_SPEECH_THRESHOLD
                         and avg_logprob < LOG_PROB_THRESHOLD)
            silent.append(is_silent)
            decoded_s = seek_frames / frames_per_second
            resumes.append(
                window.offset + decoded_s
                if not (is_silent or single_ending) and window.duration - decoded_s > 1.0
                else None
            )
        if first.word_timestamps:
            self.model.add_word_timestamps(
                per_window, tokenizer, encoder_output, sizes, PREPEND_PUNCTUATIONS,
                APPEND_PUNCTUATIONS, 0.0,
            )
        return [
            WindowResult(first.language, [] if is_silent else
                         [_segment(s) for s in segments if s["tokens"]], resume_at)
            for segments, is_silent, resume_at in zip(per_window, silent, resumes, strict=True)
        ]


def _segment(raw: dict[str, Any]) -> TranscriptSegment:
    """faster-whisper's segment dict (words added by `add_word_timestamps`) as the contract's
    type; numbered from 0 (the engine numbers a request's segments)."""
    words = [WordTiming(w["word"], float(w["start"]), float(w["end"]), float(w["probability"]))
             for w in raw.get("words", [])]
    return TranscriptSegment(
        id=0, seek=int(raw["seek"]), start=round(float(raw["start"]), 3),
        end=round(float(raw["end"]), 3), text=raw["text"], tokens=list(raw["tokens"]),
        temperature=float(raw["temperature"]), avg_logprob=float(raw["avg_logprob"]),
        compression_ratio=float(raw["compression_ratio"]),
        no_speech_prob=float(raw["no_speech_prob"]), words=words,
    )

"""Speech through the real `openai` client: packaged Piper voice and Whisper models."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import openai
import pytest

from engine.core.audio_codec import decode_audio
from engine.core.settings import Settings
from tests.audio_files import (
    UPLOAD_FORMATS,
    encode_file,
    espeak_wav,
    seconds,
    word_error_rate,
)
from tests.conftest import Served, serve_in_process

# Words the packaged voice says clearly: the tests check plumbing and formats, and a sentence
# that starts with a soft onset ("Speech ...") is misheard often enough to make them flaky.
SENTENCE = (
    "The quick brown fox jumps over the lazy dog. "
    "Every morning the baker opens his small shop near the river."
)


@pytest.fixture(scope="module")
async def spoken(served: Served) -> bytes:
    """The known sentence, spoken by the default voice, as wav."""
    response = await served.openai.audio.speech.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="wav"
    )
    return response.content


async def test_round_trip_speech_to_text_word_error_rate(served: Served, spoken: bytes) -> None:
    result = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", spoken)
    )
    assert word_error_rate(SENTENCE, result.text) <= 0.15, result.text


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
async def test_each_output_format_decodes_to_the_expected_duration(
    served: Served, spoken: bytes, fmt: str
) -> None:
    expected = seconds(spoken, "wav")
    response = await served.openai.audio.speech.create(
        model="tts-1", voice="nova", input=SENTENCE, response_format=fmt  # type: ignore[arg-type]
    )
    # Encoder priming and frame padding add a few tens of ms. Each request is a new synthesis
    # and the voice draws random phoneme durations (noise_w): 20 syntheses of this sentence
    # spanned 6.39-6.74 s (sd 0.09 s), so two draws differ by up to ~0.45 s. A wrong sample
    # rate or a dropped chunk is off by seconds.
    assert seconds(response.content, fmt) == pytest.approx(expected, abs=0.6)


@pytest.mark.parametrize(("name", "container", "codec"), UPLOAD_FORMATS)
async def test_each_input_format_transcribes(
    served: Served, spoken: bytes, name: str, container: str, codec: str
) -> None:
    samples = decode_audio(spoken, sample_rate=24_000, max_seconds=60)
    upload = encode_file(samples, 24_000, container, codec)
    result = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=(f"speech.{name}", upload)
    )
    assert word_error_rate(SENTENCE, result.text) <= 0.2, (name, result.text)


async def test_translation_of_german_speech_returns_english(served: Served) -> None:
    german = espeak_wav("Guten Morgen. Das Wetter ist heute sehr schön.", voice="de")
    result = await served.openai.audio.translations.create(
        model="whisper-base", file=("german.wav", german)
    )
    words = set(re.findall(r"[a-z]+", result.text.lower()))
    assert {"good", "morning"} <= words, result.text
    assert not {"guten", "morgen", "wetter"} & words, result.text


async def test_verbose_json_has_language_duration_segments_and_words(
    served: Served, spoken: bytes
) -> None:
    result = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", spoken), response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert result.language == "english"
    assert result.duration == pytest.approx(seconds(spoken, "wav"), abs=0.01)
    assert result.segments and result.words
    starts = [word.start for word in result.words]
    assert starts == sorted(starts) and result.words[-1].end <= result.duration + 0.5
    assert all(s.start < s.end for s in result.segments)
    assert {"quick", "fox"} <= {w.word.strip(".,").lower() for w in result.words}


async def test_srt_and_vtt_parse(served: Served, spoken: bytes) -> None:
    srt = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", spoken), response_format="srt"
    )
    blocks = [b for b in str(srt).strip().split("\n\n") if b]
    stamp = r"(\d\d):(\d\d):(\d\d)[,.](\d{3})"
    for number, block in enumerate(blocks, start=1):
        lines = block.splitlines()
        assert lines[0] == str(number)
        assert re.fullmatch(f"{stamp} --> {stamp}", lines[1]), lines[1]
        assert lines[2].strip()
    vtt = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", spoken), response_format="vtt"
    )
    text = str(vtt)
    assert text.startswith("WEBVTT\n\n")
    cues = re.findall(f"{stamp} --> {stamp}", text)
    assert len(cues) == len(blocks)


async def test_streamed_transcription_sends_deltas_then_done(
    served: Served, spoken: bytes
) -> None:
    stream = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", spoken), stream=True
    )
    events: list[Any] = [event async for event in stream]
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert deltas and events[-1].type == "transcript.text.done"
    assert "".join(deltas).strip() == events[-1].text
    assert word_error_rate(SENTENCE, events[-1].text) <= 0.15


async def test_long_audio_is_cut_into_windows_and_timestamps_cover_it(served: Served) -> None:
    """~40 s of speech: more than one 30 s window, with segment times across the whole clip."""
    speech = await served.openai.audio.speech.create(
        model="tts-1", voice="alloy", input=" ".join([SENTENCE] * 6), response_format="flac"
    )
    long_clip = speech.content
    duration = seconds(long_clip, "flac")
    assert duration > 30
    result = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("long.wav", long_clip), response_format="verbose_json"
    )
    assert result.segments is not None
    assert result.segments[-1].end > 30
    assert result.text.lower().count("lazy dog") >= 5, result.text


async def test_concurrent_transcriptions_share_batches(served: Served, spoken: bytes) -> None:
    def batch_totals(metrics: str) -> tuple[float, float]:
        def value(name: str) -> float:
            match = re.search(rf'{name}{{model="whisper-tiny-en"}} ([0-9.e+]+)', metrics)
            return float(match.group(1)) if match else 0.0
        return value("ember_batch_size_sum"), value("ember_batch_size_count")

    before = batch_totals((await served.http.get("/metrics")).text)
    await asyncio.gather(*(
        served.openai.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken))
        for _ in range(6)
    ))
    after = batch_totals((await served.http.get("/metrics")).text)
    windows, batches = after[0] - before[0], after[1] - before[1]
    assert windows == 6 and batches < 6


async def test_voices_are_listed_with_openai_aliases(served: Served) -> None:
    voices = (await served.http.get("/v1/audio/voices")).json()["data"]
    joe = next(v for v in voices if v["id"] == "joe")
    assert joe["model"] == "piper-en-us-joe"
    assert {"alloy", "echo", "fable", "onyx", "nova", "shimmer"} <= set(joe["aliases"])


async def test_speech_sse_stream_carries_audio(served: Served) -> None:
    response = await served.http.post("/v1/audio/speech", json={
        "model": "tts-1", "input": "Hello. Goodbye.", "voice": "alloy",
        "response_format": "pcm", "stream_format": "sse",
    })
    assert response.status_code == 200
    frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
    events = [json.loads(frame) for frame in frames]
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert seconds(audio, "pcm") > 0.5


# -- bad inputs: a 400 naming the field, and the server keeps serving ---------------------------

TRANSCRIPTION_ERRORS = [
    ({}, b"", "file"),
    ({}, b"this is not audio, just text" * 10, "file"),
    ({"response_format": "docx"}, None, "response_format"),
    ({"temperature": "2"}, None, "temperature"),
    ({"language": "xx"}, None, "language"),
    ({"timestamp_granularities[]": "sentence"}, None, "timestamp_granularities[][0]"),
]


@pytest.mark.parametrize(("fields", "content", "param"), TRANSCRIPTION_ERRORS)
async def test_bad_transcription_requests_get_400(
    served: Served, spoken: bytes, fields: dict[str, str], content: bytes | None, param: str
) -> None:
    upload = spoken if content is None else content
    response = await served.http.post(
        "/v1/audio/transcriptions", data={"model": "whisper-1", **fields},
        files={"file": ("clip.wav", upload)},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


async def test_missing_file_and_wrong_models_get_clear_errors(served: Served) -> None:
    missing = await served.http.post("/v1/audio/transcriptions", data={"model": "whisper-1"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    clip = espeak_wav("Hello.")
    with pytest.raises(openai.BadRequestError, match="English-only"):
        await served.openai.audio.translations.create(model="whisper-tiny-en", file=("a.wav", clip))
    with pytest.raises(openai.BadRequestError):
        await served.openai.audio.transcriptions.create(model="tiny-chat", file=("a.wav", clip))
    with pytest.raises(openai.NotFoundError):
        await served.openai.audio.transcriptions.create(model="no-such", file=("a.wav", clip))


SPEECH_ERRORS = [
    ({"input": "x" * 4097}, "input"),
    ({"input": "   "}, "input"),
    ({"speed": 5}, "speed"),
    ({"speed": 0.1}, "speed"),
    ({"voice": "bob"}, "voice"),
    ({"response_format": "ogg"}, "response_format"),
]


@pytest.mark.parametrize(("fields", "param"), SPEECH_ERRORS)
async def test_bad_speech_requests_get_400(
    served: Served, fields: dict[str, Any], param: str
) -> None:
    body = {"model": "tts-1", "input": "Hello.", "voice": "alloy", **fields}
    response = await served.http.post("/v1/audio/speech", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_server_keeps_serving_after_bad_audio(served: Served, spoken: bytes) -> None:
    for content in (b"", b"garbage" * 100):
        await served.http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                               files={"file": ("x.wav", content)})
    result = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", spoken)
    )
    assert word_error_rate(SENTENCE, result.text) <= 0.15


async def test_vad_filter_skips_silence_and_keeps_speech(served: Served, spoken: bytes) -> None:
    samples = decode_audio(spoken, sample_rate=16_000, max_seconds=60)
    padded = np.concatenate([np.zeros(16_000 * 3, np.float32), samples])
    upload = encode_file(padded, 16_000, "wav", "pcm_s16le")
    result = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("padded.wav", upload), response_format="verbose_json",
        extra_body={"vad_filter": True},
    )
    assert word_error_rate(SENTENCE, result.text) <= 0.15, result.text
    assert result.segments and result.segments[0].start >= 2.5  # timestamps stay absolute
    silence = encode_file(np.zeros(16_000 * 4, np.float32), 16_000, "wav", "pcm_s16le")
    quiet = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("silence.wav", silence), extra_body={"vad_filter": True}
    )
    assert quiet.text == ""


async def test_audio_over_the_duration_limit_is_a_400(
    make_settings: Callable[..., Settings], spoken: bytes
) -> None:
    async with serve_in_process(make_settings(max_audio_seconds=2)) as short:
        response = await short.http.post(
            "/v1/audio/transcriptions", data={"model": "whisper-1"},
            files={"file": ("speech.wav", spoken)},
        )
    assert response.status_code == 400
    assert "longer than the limit of 2 seconds" in response.json()["error"]["message"]

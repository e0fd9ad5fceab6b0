"""Every audio file ember returns is read by libsndfile (python `soundfile`) and FFmpeg (PyAV)
with its real rate and length, streamed or not; and speech input with sentences that have
nothing to pronounce ("...") is skipped, or a 400 when nothing at all can be said. The packaged
Piper voice speaks; music comes from the tiny MusicGen of the test registry."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from typing import Any

import av
import numpy as np
import pytest

from engine.core.audio_codec import OUTPUT_RATE
from models.phonemes import PhonemizerChoice, choose_phonemizer
from tests.audio_files import seconds
from tests.conftest import Served
from tests.integration.test_jobs import submit, wait_for

soundfile = pytest.importorskip("soundfile", reason="python-soundfile (libsndfile) is needed")

SENTENCE = "The quick brown fox jumps over the lazy dog. Every morning the baker opens his shop."


def soundfile_reads(fmt: str) -> bool:
    """libsndfile reads wav and flac always; mp3 (1.1+) and Ogg Opus (1.0.29+) in newer
    builds, as the soundfile wheels bundle. It has no AAC (ADTS) reader."""
    formats = soundfile.available_formats()
    if fmt in ("wav", "flac"):
        return True
    if fmt == "mp3":
        return "MP3" in formats
    if fmt == "opus":
        return "OGG" in formats and "OPUS" in soundfile.available_subtypes("OGG")
    return False


def libsndfile(data: bytes) -> tuple[float, int]:
    """(seconds, rate) as libsndfile reads the file."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert samples.ndim == 1 and samples.size > 0
    assert np.isfinite(samples).all()
    return samples.shape[0] / rate, int(rate)


def ffmpeg(data: bytes) -> tuple[float, int]:
    """(seconds, rate) as FFmpeg decodes the file (every frame, not the header's guess)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
        assert frames
        rate = int(frames[0].sample_rate)
        return sum(frame.samples for frame in frames) / rate, rate


async def speech(served: Served, text: str, fmt: str = "wav", **extra: Any) -> Any:
    return await served.http.post("/v1/audio/speech", json={
        "model": "tts-1", "voice": "alloy", "input": text, "response_format": fmt, **extra,
    })


@pytest.fixture(scope="module")
async def wav_seconds(served: Served) -> float:
    response = await speech(served, SENTENCE)
    assert response.status_code == 200, response.text
    return seconds(response.content, "wav")


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
async def test_each_speech_format_decodes_with_libsndfile_and_ffmpeg(
    served: Served, wav_seconds: float, fmt: str
) -> None:
    response = await speech(served, SENTENCE, fmt)
    assert response.status_code == 200, response.text
    data = response.content
    length, rate = ffmpeg(data)
    # Opus always decodes at 48 kHz (the Ogg header keeps the 24 kHz input rate).
    assert rate == (48_000 if fmt == "opus" else OUTPUT_RATE)
    assert length == pytest.approx(wav_seconds, abs=0.35), fmt
    if soundfile_reads(fmt):
        length, rate = libsndfile(data)
        assert rate == OUTPUT_RATE, fmt
        assert length == pytest.approx(wav_seconds, abs=0.35), fmt


async def test_flac_header_carries_the_length_and_wav_reads_to_its_end(
    served: Served, wav_seconds: float
) -> None:
    flac = (await speech(served, SENTENCE, "flac")).content
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0  # STREAMINFO first
    info = flac[8:8 + 34]
    rate = int.from_bytes(info[10:13], "big") >> 4
    total = int.from_bytes(info[13:18], "big") & ((1 << 36) - 1)
    assert rate == OUTPUT_RATE
    assert total == pytest.approx(wav_seconds * OUTPUT_RATE, abs=0.35 * OUTPUT_RATE)
    assert info[18:] != bytes(16)  # the MD5 of the audio is filled in too
    assert soundfile.info(io.BytesIO(flac)).frames == total

    # Streamed WAV says 'unknown length' (as OpenAI's does); libsndfile reads up to the end.
    wav = (await speech(served, SENTENCE, "wav")).content
    assert wav[:4] == b"RIFF" and wav[36:40] == b"data"
    assert struct.unpack("<I", wav[40:44])[0] in (0xFFFFFFFF, len(wav) - 44)
    assert libsndfile(wav)[0] == pytest.approx((len(wav) - 44) / 2 / OUTPUT_RATE, abs=1e-3)


@pytest.mark.parametrize("fmt", ["flac", "wav", "mp3"])
async def test_sse_speech_deltas_join_into_a_file_libsndfile_reads(
    served: Served, fmt: str
) -> None:
    plain = await speech(served, "Hello. Goodbye.", fmt)
    response = await speech(served, "Hello. Goodbye.", fmt, stream_format="sse")
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    assert events and events[-1]["type"] == "speech.audio.done"
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert ffmpeg(data)[0] == pytest.approx(ffmpeg(plain.content)[0], abs=0.35)
    if soundfile_reads(fmt):
        length, rate = libsndfile(data)
        assert rate == OUTPUT_RATE and length == pytest.approx(ffmpeg(data)[0], abs=0.1)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
async def test_music_job_files_decode_with_libsndfile(served: Served, fmt: str) -> None:
    job = await submit(served, "music", {
        "model": "musicgen", "prompt": "calm piano", "duration": 0.6, "response_format": fmt,
    })
    done = await wait_for(served, job["job_id"])
    assert done["status"] == "completed", done
    data = (await served.http.get(done["result"]["url"])).content
    ffmpeg_seconds, ffmpeg_rate = ffmpeg(data)
    assert ffmpeg_seconds == pytest.approx(0.6, abs=0.1)
    length, rate = libsndfile(data)
    assert rate == ffmpeg_rate and length == pytest.approx(0.6, abs=0.1)
    if fmt == "wav":  # a whole file: its header holds the real sizes
        assert struct.unpack("<I", data[40:44])[0] == len(data) - 44
        assert struct.unpack("<I", data[4:8])[0] == len(data) - 8


# -- input with nothing to pronounce ----------------------------------------------------------

@pytest.mark.parametrize("text", ["...", "?", "… — …", ". . ."])
@pytest.mark.parametrize("stream_format", ["audio", "sse"])
async def test_input_with_nothing_to_pronounce_is_a_400_naming_input(
    served: Served, text: str, stream_format: str
) -> None:
    response = await speech(served, text, "mp3", stream_format=stream_format)
    assert response.status_code == 400, response.headers
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "input"
    assert "nothing to pronounce" in error["message"]


async def test_openai_client_gets_bad_request_for_dots(served: Served) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        await served.openai.audio.speech.create(model="tts-1", voice="alloy", input="...")
    assert raised.value.status_code == 400
    body: Any = raised.value.body
    assert body["param"] == "input"


@pytest.mark.parametrize("text", ["Hello. ... Goodbye.", "... Hello. ? Goodbye. ..."])
async def test_unpronounceable_sentences_are_skipped_not_the_end_of_the_audio(
    served: Served, text: str
) -> None:
    reference = await speech(served, "Hello. Goodbye.")
    response = await speech(served, text)
    assert response.status_code == 200, response.text
    expected, got = seconds(reference.content, "wav"), seconds(response.content, "wav")
    # "Goodbye." and its pause are about 0.9 s: a cut after "Hello." cannot pass this.
    assert got == pytest.approx(expected, abs=0.3), (got, expected)
    heard = await served.openai.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", response.content)
    )
    words = re.sub(r"[^a-z ]+", " ", heard.text.lower()).split()
    assert "hello" in words and any(w.startswith("good") for w in words), heard.text


def test_whole_clips_have_complete_headers_and_exact_lengths() -> None:
    """encode_audio (music jobs, benchmarks) writes whole files: WAV sizes, FLAC's sample
    count, and mp3's Xing/LAME frame, so libsndfile reads exactly the samples put in."""
    from engine.core.audio_codec import encode_audio

    tone = (0.2 * np.sin(np.linspace(0, 3000, 32_000 * 2))).astype(np.float32)
    for fmt in ("wav", "flac", "mp3"):
        data = encode_audio(tone, 32_000, fmt, rate=32_000)
        assert soundfile.info(io.BytesIO(data)).frames == tone.size, fmt
        assert libsndfile(data) == (2.0, 32_000), fmt


@pytest.mark.parametrize("choice", ["library", "program"])
def test_phonemes_of_punctuation_alone_are_empty_not_an_error(choice: PhonemizerChoice) -> None:
    from models.piper import espeak_phonemes, speakable

    phonemizer = choose_phonemizer(choice)
    try:
        for text in ("...", "?", ".", ",", "—"):
            assert espeak_phonemes(text, "en-us", phonemizer) == "", text
    finally:
        phonemizer.close()
    id_map = {"^": [1], "$": [2], "_": [0], ".": [10], " ": [3], "h": [20]}
    assert not speakable(". .", id_map) and speakable("h.", id_map)

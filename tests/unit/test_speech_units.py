"""Pure speech logic: window cutting, transcript formats, Piper phoneme ids, joined weights."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest

from engine.contracts.speech import TranscriptSegment
from engine.core.audio_codec import AudioEncoder, decode_audio, encode_audio
from engine.core.errors import InvalidRequestError, ModelUnavailableError
from engine.core.registry import ModelEntry
from engine.core.sources import assemble
from models.piper import phoneme_ids, split_sentences
from models.whisper import split_windows
from server.openai.audio import to_srt, to_vtt

RATE = 16_000


def test_long_audio_is_cut_at_the_quietest_point_before_each_30_s_mark() -> None:
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, RATE * 70).astype(np.float32)
    quiet = [int(27.3 * RATE), int(55.1 * RATE)]
    for start in quiet:
        audio[start:start + RATE // 10] = 0.0  # 100 ms of silence
    spans = split_windows(audio, RATE)
    assert spans[0][0] == 0 and spans[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no gaps
    assert all(end - start <= 30 * RATE for start, end in spans)
    cuts = [end for _, end in spans[:-1]]
    assert len(cuts) == 2
    for cut, start in zip(cuts, quiet, strict=True):
        assert start <= cut <= start + RATE // 10


def test_short_audio_is_one_window() -> None:
    assert split_windows(np.zeros(RATE * 5, dtype=np.float32), RATE) == [(0, RATE * 5)]


def segment(index: int, start: float, end: float, text: str) -> TranscriptSegment:
    return TranscriptSegment(index, 0, start, end, text, [], 0.0, -0.2, 1.1, 0.01)


def test_srt_and_vtt_timestamps_and_numbering() -> None:
    segments = [segment(0, 0.0, 2.5, " Hello there."), segment(1, 2.5, 3661.042, " Bye.")]
    assert to_srt(segments) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
        "2\n00:00:02,500 --> 01:01:01,042\nBye.\n"
    )
    assert to_vtt(segments) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
        "00:00:02.500 --> 01:01:01.042\nBye.\n"
    )


def test_piper_ids_wrap_in_bos_eos_and_pad_between_phonemes() -> None:
    id_map = {"^": [1], "$": [2], "_": [0], "h": [20], "a": [14], " ": [3]}
    assert phoneme_ids("ha", id_map) == [1, 0, 20, 0, 14, 0, 2]
    assert phoneme_ids("h?a", id_map) == [1, 0, 20, 0, 14, 0, 2]  # unknown phoneme skipped


def test_sentences_split_on_end_marks_and_long_ones_on_spaces() -> None:
    assert split_sentences("Hello there. How are you?\nFine!") == [
        "Hello there.", "How are you?", "Fine!"
    ]
    long = " ".join(["word"] * 200)
    parts = split_sentences(long)
    assert len(parts) > 1 and all(len(p) <= 400 for p in parts)
    assert " ".join(parts) == long


def test_encoded_chunks_concatenate_to_one_decodable_file() -> None:
    tone = (0.2 * np.sin(np.linspace(0, 2000, 22_050 * 2))).astype(np.float32)
    for fmt in ("mp3", "opus", "aac", "flac", "wav"):
        encoder = AudioEncoder(fmt, 22_050)
        data = encoder.encode(tone[:22_050]) + encoder.encode(tone[22_050:]) + encoder.finish()
        decoded = decode_audio(data, sample_rate=RATE, max_seconds=10)
        assert len(decoded) / RATE == pytest.approx(2.0, abs=0.1), fmt
    assert len(encode_audio(tone, 22_050, "pcm")) == 2 * 24_000 * 2


def test_undecodable_and_over_long_audio_are_400s() -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        decode_audio(b"", sample_rate=RATE, max_seconds=10)
    with pytest.raises(InvalidRequestError, match="could not be decoded"):
        decode_audio(b"RIFF but not really" * 20, sample_rate=RATE, max_seconds=10)
    wav = encode_audio(np.zeros(24_000 * 3, dtype=np.float32), 24_000, "wav")
    with pytest.raises(InvalidRequestError, match="longer than the limit of 2 seconds"):
        decode_audio(wav, sample_rate=RATE, max_seconds=2)
    with pytest.raises(InvalidRequestError, match="response_format"):
        AudioEncoder("ogg", 22_050)


def test_split_weights_are_joined_once_and_checked(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (tmp_path / "a.part").write_bytes(b"abc")
    (tmp_path / "b.part").write_bytes(b"def")
    parts = [str(tmp_path / "a.part"), str(tmp_path / "b.part")]
    digest = hashlib.sha256(b"abcdef").hexdigest()
    entry = ModelEntry(id="m", task="stt", adapter="x:Y", source=str(source),
                       join={"model.bin": parts}, sha256={"model.bin": digest})
    folder = assemble(entry, tmp_path / "cache")
    assert (folder / "model.bin").read_bytes() == b"abcdef"
    assert (folder / "config.json").read_text() == "{}"
    assert assemble(entry, tmp_path / "cache") == folder  # cached: not joined again
    wrong = entry.model_copy(update={"id": "n", "sha256": {"model.bin": "0" * 64}})
    with pytest.raises(ModelUnavailableError, match="fails its check"):
        assemble(wrong, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("n-*"))  # nothing half-written is left

"""Audio for speech tests: espeak-ng clips (any language) and files in the containers clients
upload (m4a and webm need a seekable file, so they are written through a temp file)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import av
import jiwer
import numpy as np

from engine.core.audio_codec import decode_audio

# (format name, container, codec) of the files a client may upload.
UPLOAD_FORMATS = [
    ("wav", "wav", "pcm_s16le"),
    ("mp3", "mp3", "libmp3lame"),
    ("flac", "flac", "flac"),
    ("ogg", "ogg", "libopus"),
    ("m4a", "ipod", "aac"),
    ("webm", "webm", "libopus"),
]


def espeak_wav(text: str, voice: str = "en-us") -> bytes:
    return subprocess.run(
        ["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True
    ).stdout


def encode_file(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"clip.{container}"
        with av.open(str(path), mode="w", format=container) as output:
            stream: Any = output.add_stream(codec, rate=48000 if codec == "libopus" else rate,
                                       layout="mono")
            frame = av.AudioFrame.from_ndarray(
                samples.astype(np.float32).reshape(1, -1), format="flt", layout="mono"
            )
            frame.sample_rate = rate
            frame.pts = 0
            for packet in stream.encode(frame):
                output.mux(packet)
            for packet in stream.encode(None):
                output.mux(packet)
        return path.read_bytes()


def seconds(data: bytes, fmt: str) -> float:
    """Length of an encoded clip (pcm is raw 24 kHz s16le, as OpenAI documents)."""
    if fmt == "pcm":
        return len(data) / 2 / 24_000
    return len(decode_audio(data, sample_rate=16_000, max_seconds=3600)) / 16_000


def word_error_rate(reference: str, hypothesis: str) -> float:
    def normalize(text: str) -> str:
        return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).strip()

    return float(jiwer.wer(normalize(reference), normalize(hypothesis)))

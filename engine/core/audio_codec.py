"""Audio in and out with PyAV (its wheels bundle FFmpeg; no system ffmpeg needed): decode any
upload to mono float32 at the rate a model wants, and encode synthesized audio incrementally,
so speech streams out in the requested format while later sentences are still synthesized."""

from __future__ import annotations

import io
import struct
from typing import Any, Literal

import av
import numpy as np

from engine.core.errors import InvalidRequestError

AudioFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
AUDIO_FORMATS: tuple[str, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")

# OpenAI's speech endpoint returns 24 kHz audio (pcm is documented as 24 kHz s16le).
OUTPUT_RATE = 24_000

# format -> (container, encoder). Opus uses libopus: the wheel's FFmpeg disables the native one.
_CONTAINERS = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
    "flac": ("flac", "flac"),
}

MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


def decode_audio(
    data: bytes, *, sample_rate: int, max_seconds: float, param: str = "file"
) -> np.ndarray:
    """Any container/codec FFmpeg reads → mono float32 samples at `sample_rate`.

    Empty, undecodable, audio-less and over-long files are a 400 naming the reason.
    """
    if not data:
        raise InvalidRequestError("The uploaded file is empty.", param=param)
    max_samples = int(max_seconds * sample_rate)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            stream = next(iter(container.streams.audio), None)
            if stream is None:
                raise InvalidRequestError("The uploaded file has no audio stream.", param=param)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    chunks.append(samples)
                    total += samples.size
                if total > max_samples:
                    raise InvalidRequestError(
                        f"The audio is longer than the limit of {max_seconds:g} seconds.",
                        param=param,
                    )
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidRequestError(
            f"The uploaded file could not be decoded as audio ({reason}). Supported: wav, mp3, "
            "flac, ogg/opus, m4a, webm and other formats FFmpeg reads.",
            param=param,
        ) from exc
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if audio.size == 0:
        raise InvalidRequestError("The uploaded file holds no audio samples.", param=param)
    return audio.astype(np.float32, copy=False)


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file for the muxer; `drain` takes what it wrote so far."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        return len(data)

    def drain(self) -> bytes:
        data, self._buffer = bytes(self._buffer), bytearray()
        return data


def wav_header(sample_rate: int, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """16-bit mono WAV header. Streamed WAV has no known length: the sizes say 'unknown'
    (0xFFFFFFFF), which FFmpeg, libsndfile, browsers and OpenAI's own streamed WAV use; a
    whole clip gets its real sizes."""
    riff_size = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )


# Formats whose header must carry the stream's length for every reader to accept the file:
# FLAC's STREAMINFO holds the total sample count, and with 0 ("unknown", all a streaming muxer
# can write) libsndfile takes the length as unbounded and cannot read the file. They are
# encoded into a seekable buffer, where the muxer rewrites the header when the stream ends,
# and come out whole from `finish`.
WHOLE_FILE_FORMATS = frozenset({"flac"})


class AudioEncoder:
    """Mono float32 samples at `source_rate` in, bytes of `fmt` at `rate` out, chunk by chunk.

    `encode` returns what is ready now (possibly nothing, while an encoder fills a frame);
    `finish` flushes the rest. Concatenated, the outputs are one valid file.

    With `streaming` (the default), mp3, opus, aac, wav and pcm come out as they are encoded
    (wav with 'unknown' sizes); FLAC always comes out whole from `finish`, its header holding
    the length (see WHOLE_FILE_FORMATS). With `streaming=False` every format is written whole
    at `finish`, headers complete: WAV sizes, and the mp3 muxer's Xing/LAME frame (frame count,
    encoder delay and padding, so decoders trim to the exact length).
    """

    def __init__(
        self, fmt: str, source_rate: int, rate: int = OUTPUT_RATE, *, streaming: bool = True
    ):
        self.fmt = fmt
        self.rate = rate
        self._source_rate = source_rate
        self._pts = 0
        self._started = False
        self._whole = not streaming or fmt in WHOLE_FILE_FORMATS
        self._pcm = bytearray()  # wav held for `finish` when whole
        self._to_s16 = av.AudioResampler(format="s16", layout="mono", rate=rate)
        self._container: Any = None
        if fmt in _CONTAINERS:
            container_format, codec = _CONTAINERS[fmt]
            # A seekable buffer lets the muxer go back and complete the header at the end.
            self._sink: _Sink | io.BytesIO = io.BytesIO() if self._whole else _Sink()
            self._container = av.open(self._sink, mode="w", format=container_format)
            self._stream = self._container.add_stream(codec, rate=rate, layout="mono")
        elif fmt not in ("wav", "pcm"):
            raise InvalidRequestError(
                f"response_format must be one of {', '.join(AUDIO_FORMATS)}; got {fmt!r}",
                param="response_format",
            )

    def _frames(self, samples: np.ndarray | None) -> list[Any]:
        if samples is None:
            return list(self._to_s16.resample(None))
        pcm = np.clip(samples, -1.0, 1.0).astype(np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
        frame.sample_rate = self._source_rate
        return list(self._to_s16.resample(frame))

    def _raw(self, frames: list[Any], flush: bool) -> bytes:
        data = b"".join(frame.to_ndarray().tobytes() for frame in frames)
        if self.fmt == "pcm":
            return data
        if self._whole:
            self._pcm += data
            return (wav_header(self.rate, len(self._pcm)) + bytes(self._pcm)) if flush else b""
        if not self._started:
            self._started = True
            data = wav_header(self.rate) + data
        return data

    def _encode(self, frames: list[Any], flush: bool) -> bytes:
        if self._container is None:
            return self._raw(frames, flush)
        for frame in frames:
            frame.pts = self._pts
            self._pts += frame.samples
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        if flush:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()  # writes the trailer; in a seekable buffer, the header too
            if isinstance(self._sink, io.BytesIO):
                return self._sink.getvalue()
        return self._sink.drain() if isinstance(self._sink, _Sink) else b""

    def encode(self, samples: np.ndarray) -> bytes:
        return self._encode(self._frames(samples), flush=False)

    def finish(self) -> bytes:
        return self._encode(self._frames(None), flush=True)


def encode_audio(samples: np.ndarray, source_rate: int, fmt: str, rate: int = OUTPUT_RATE) -> bytes:
    """A whole clip in one call (music jobs, tests and benchmarks), its header complete."""
    encoder = AudioEncoder(fmt, source_rate, rate, streaming=False)
    return encoder.encode(samples) + encoder.finish()

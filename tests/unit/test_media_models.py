"""The video and music adapters on tiny random-weight checkpoints, loaded through the same
`from_pretrained` paths as real models (their output is noise: these tests check files,
frame counts, durations, progress, cancellation, determinism and validation)."""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from engine.contracts.base import LoadContext
from engine.contracts.media import MediaResult
from engine.core.audio_codec import decode_audio
from engine.core.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelUnavailableError,
    RequestCancelledError,
)
from engine.core.registry import ModelEntry, Registry
from models.music import MusicGen
from models.video import TextToVideo, encode_mp4
from tests.tiny_models import build_tiny_musicgen, build_tiny_text_to_video

VIDEO_OPTIONS: dict[str, Any] = {
    "default_size": [64, 48], "size_multiple": 8, "max_side": 128, "min_side": 32,
    "default_fps": 8, "max_fps": 24, "default_duration": 1.0, "max_duration": 2.0,
    "frame_rule": "4k+1", "max_frames": 17, "default_steps": 3, "max_steps": 10,
    "default_guidance": 7.5,
}
MUSIC_OPTIONS: dict[str, Any] = {"default_duration": 0.5, "max_duration": 2.0}
MUSIC_RATE = 32_000
REGISTRY = Path(__file__).resolve().parents[2] / "configs" / "models.yaml"


def video_entry(source: str, **options: Any) -> ModelEntry:
    return ModelEntry(id="tiny-video", task="video", adapter="models.video:TextToVideo",
                      source=source, options={**VIDEO_OPTIONS, **options})


def music_entry(source: str) -> ModelEntry:
    return ModelEntry(id="tiny-music", task="music", adapter="models.music:MusicGen",
                      source=source, options=MUSIC_OPTIONS)


@pytest.fixture(scope="module")
def video_model(tmp_path_factory: pytest.TempPathFactory) -> TextToVideo:
    folder = build_tiny_text_to_video(tmp_path_factory.mktemp("tiny-video"))
    context = LoadContext("cpu", torch.float32, tmp_path_factory.mktemp("models"))
    model = TextToVideo(video_entry(str(folder)), context)
    model.load()
    return model


@pytest.fixture(scope="module")
def music_model(tmp_path_factory: pytest.TempPathFactory) -> MusicGen:
    folder = build_tiny_musicgen(tmp_path_factory.mktemp("tiny-musicgen"))
    context = LoadContext("cpu", torch.float32, tmp_path_factory.mktemp("models"))
    model = MusicGen(music_entry(str(folder)), context)
    model.load()
    return model


class Recorder:
    """The progress callback a job runner passes; optionally cancels after `cancel_after`
    reports, as a user pressing cancel mid-run would."""

    def __init__(self, cancel_after: int | None = None):
        self.fractions: list[float] = []
        self.cancelled = threading.Event()
        self._cancel_after = cancel_after

    def __call__(self, fraction: float) -> None:
        self.fractions.append(fraction)
        if self._cancel_after is not None and len(self.fractions) >= self._cancel_after:
            self.cancelled.set()


def run(model: TextToVideo | MusicGen, params: dict[str, Any],
        recorder: Recorder | None = None) -> MediaResult:
    recorder = recorder or Recorder()
    return model.run(model.validate(model.entry, params), recorder, recorder.cancelled)


def count_calls(module: torch.nn.Module) -> tuple[list[int], Callable[[], None]]:
    """How many times `module` runs forward; call the second value to stop counting."""
    calls = [0]

    def hook(*_args: Any) -> None:
        calls[0] += 1

    handle = module.register_forward_hook(hook)
    return calls, handle.remove


@pytest.fixture(scope="module")
def first_video(video_model: TextToVideo) -> tuple[MediaResult, Recorder]:
    recorder = Recorder()
    result = run(video_model, {"prompt": "a red kite", "resolution": "64x48", "seed": 7},
                 recorder)  # the default size, spelled out
    return result, recorder


# -- video --------------------------------------------------------------------------------


def test_video_is_an_h264_mp4_with_the_frames_fps_and_size(
    first_video: tuple[MediaResult, Recorder],
) -> None:
    result, _ = first_video
    # 1 s at 8 fps is 8 frames; the "4k+1" rule makes it 9, and the metadata says so.
    assert result.media_type == "video/mp4" and result.suffix == ".mp4"
    assert result.metadata["frames"] == 9 and result.metadata["fps"] == 8
    assert result.metadata["duration_s"] == pytest.approx(9 / 8)
    assert (result.metadata["width"], result.metadata["height"]) == (64, 48)
    with av.open(io.BytesIO(result.data), mode="r") as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" == result.metadata["codec"]
        assert stream.average_rate == 8
        assert (stream.width, stream.height) == (64, 48)
        assert stream.codec_context.pix_fmt == "yuv420p"
        frames = list(container.decode(stream))
    assert len(frames) == 9
    assert frames[-1].time == pytest.approx(8 / 8)


def test_mpeg4_fallback_keeps_frames_and_fps() -> None:
    # What a PyAV build without libx264 produces.
    frames = np.linspace(0, 1, 5 * 32 * 48 * 3, dtype=np.float32).reshape(5, 32, 48, 3)
    data, codec = encode_mp4(frames, 12, codec="mpeg4")
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        assert codec == stream.codec_context.name == "mpeg4" and stream.average_rate == 12
        assert (stream.width, stream.height) == (48, 32)
        assert len(list(container.decode(stream))) == 5


def test_video_progress_rises_step_by_step_to_one(
    first_video: tuple[MediaResult, Recorder],
) -> None:
    fractions = first_video[1].fractions
    assert len(fractions) == 3 + 1  # each of the 3 steps, then the encoded file
    assert all(a < b for a, b in itertools.pairwise(fractions))
    assert fractions[0] > 0 and fractions[-1] == 1.0


def test_video_same_seed_same_bytes_other_seed_other_bytes(
    video_model: TextToVideo, first_video: tuple[MediaResult, Recorder],
) -> None:
    params = {"prompt": "a red kite", "resolution": "64x48"}
    again = run(video_model, {**params, "seed": 7})
    assert again.data == first_video[0].data
    assert run(video_model, {**params, "seed": 8}).data != again.data


def test_video_cancel_stops_within_one_step(video_model: TextToVideo) -> None:
    recorder = Recorder(cancel_after=1)
    calls, stop_counting = count_calls(video_model.model.unet)
    try:
        with pytest.raises(RequestCancelledError, match="after 1 of 5 steps"):
            run(video_model, {"prompt": "a kite", "num_inference_steps": 5, "seed": 1}, recorder)
    finally:
        stop_counting()
    assert calls[0] == 1 and recorder.fractions == [1 / 6]


def test_video_cancelled_before_start_runs_nothing(video_model: TextToVideo) -> None:
    recorder = Recorder()
    recorder.cancelled.set()
    calls, stop_counting = count_calls(video_model.model.unet)
    try:
        with pytest.raises(RequestCancelledError):
            run(video_model, {"prompt": "a kite"}, recorder)
    finally:
        stop_counting()
    assert calls[0] == 0 and recorder.fractions == []


def test_video_validate_fills_the_model_defaults() -> None:
    params = TextToVideo.validate(video_entry("unused"), {"prompt": "waves", "model": "x"})
    seed = params.pop("seed")
    assert isinstance(seed, int) and seed >= 0  # chosen now, so a re-run repeats the job
    assert params == {
        "prompt": "waves", "negative_prompt": None, "duration": 1.0, "fps": 8, "frames": 9,
        "resolution": "64x48", "width": 64, "height": 48, "num_inference_steps": 3,
        "guidance_scale": 7.5,
    }
    params["seed"] = seed
    assert TextToVideo.validate(video_entry("unused"), params) == params  # idempotent


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""), ("prompt", "   "), ("prompt", None), ("prompt", 3),
        ("duration", 0), ("duration", -1), ("duration", 2.5), ("duration", "1"),
        ("duration", True),
        ("fps", 0), ("fps", 25), ("fps", 7.5),
        ("resolution", "60x48"), ("resolution", "256x64"), ("resolution", "16x16"),
        ("resolution", "big"), ("resolution", 64), ("resolution", "2000p"),
        ("num_inference_steps", 0), ("num_inference_steps", 11),
        ("guidance_scale", -1), ("seed", -1), ("negative_prompt", 5),
    ],
)
def test_video_validate_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    params = {"prompt": "waves", field: value}
    with pytest.raises(InvalidRequestError) as caught:
        TextToVideo.validate(video_entry("unused"), params)
    assert caught.value.param == field and field in caught.value.message


def test_video_frames_over_the_model_limit_name_duration() -> None:
    # 2 s at 24 fps is 48 frames, over max_frames 17, though within max_duration.
    with pytest.raises(InvalidRequestError, match="at most 17") as caught:
        TextToVideo.validate(video_entry("unused"), {"prompt": "x", "duration": 2, "fps": 24})
    assert caught.value.param == "duration"


def test_video_resolution_presets_keep_the_model_aspect() -> None:
    entry = video_entry("unused", default_size=[96, 64], max_side=256, size_multiple=16)
    params = TextToVideo.validate(entry, {"prompt": "x", "resolution": "128p"})
    assert (params["width"], params["height"]) == (192, 128)
    params = TextToVideo.validate(entry, {"prompt": "x", "resolution": "100P"})
    assert (params["width"], params["height"]) == (144, 96)  # 150x100 on the 16-pixel grid


def test_packaged_video_presets_give_their_documented_shapes() -> None:
    registry = Registry.from_file(REGISTRY)
    expected = {  # id: (width, height, fps, frames) for the defaults
        "wan2.1-t2v-1.3b": (832, 480, 16, 81),
        "ltx-video": (768, 512, 24, 121),
        "cogvideox-2b": (720, 480, 8, 49),
        "zeroscope-v2-576w": (576, 320, 8, 24),
    }
    for model_id, shape in expected.items():
        params = TextToVideo.validate(registry.resolve(model_id, "video"), {"prompt": "x"})
        assert (params["width"], params["height"], params["fps"], params["frames"]) == shape
    assert registry.resolve("text-to-video", "video").default
    wan = registry.resolve("wan2.1-t2v-1.3b", "video")
    assert TextToVideo.validate(wan, {"prompt": "x", "resolution": "480p"})["width"] == 832
    ltx = registry.resolve("ltx-video", "video")
    assert TextToVideo.validate(ltx, {"prompt": "x", "duration": 2})["frames"] == 49  # 8k+1
    music = registry.resolve("musicgen", "music")
    assert MusicGen.validate(music, {"prompt": "x"})["duration"] == 10.0


def test_video_load_errors_are_clear(tmp_path: Path) -> None:
    context = LoadContext("cpu", torch.float32, tmp_path)
    with pytest.raises(ModelUnavailableError, match="ember pull"):
        TextToVideo(video_entry("ember-test/not-downloaded-video"), context).load()
    with pytest.raises(ModelLoadError):
        TextToVideo(video_entry(str(tmp_path)), context).load()  # a folder with no pipeline


def test_video_memory_counts_every_component(video_model: TextToVideo) -> None:
    unet = sum(p.numel() * 4 for p in video_model.model.unet.parameters())
    assert video_model.memory_bytes() > unet > 0


# -- music --------------------------------------------------------------------------------


@pytest.mark.parametrize("response_format", ["wav", "mp3", "flac"])
def test_music_decodes_to_the_duration_asked_for(
    music_model: MusicGen, response_format: str,
) -> None:
    result = run(music_model, {"prompt": "lofi piano", "duration": 0.6, "seed": 3,
                               "response_format": response_format})
    assert result.suffix == f".{response_format}"
    assert result.media_type.startswith("audio/")
    assert result.metadata["sample_rate"] == MUSIC_RATE  # native rate, nothing resampled
    assert result.metadata["duration_s"] == pytest.approx(0.6, abs=1e-3)
    samples = decode_audio(result.data, sample_rate=MUSIC_RATE, max_seconds=5)
    assert samples.size / MUSIC_RATE == pytest.approx(0.6, abs=0.1)
    assert float(abs(samples).max()) > 0  # audio, not silence


def test_music_progress_rises_token_by_token_to_one(music_model: MusicGen) -> None:
    recorder = Recorder()
    run(music_model, {"prompt": "drums", "duration": 0.3}, recorder)
    tokens = music_model.max_new_tokens(0.3)
    assert tokens == 15 + 3  # 0.3 s x 50 frames/s, plus the codebook delay pattern
    fractions = recorder.fractions
    assert len(fractions) == tokens + 1
    assert all(a < b for a, b in itertools.pairwise(fractions))
    assert fractions[-1] == 1.0


def test_music_same_seed_same_bytes_other_seed_other_bytes(music_model: MusicGen) -> None:
    params = {"prompt": "jazz", "duration": 0.4}
    first = run(music_model, {**params, "seed": 11}).data
    assert run(music_model, {**params, "seed": 11}).data == first
    assert run(music_model, {**params, "seed": 12}).data != first


def test_music_same_seed_same_bytes_without_guidance(music_model: MusicGen) -> None:
    params = {"prompt": "jazz", "duration": 0.2, "seed": 5, "guidance_scale": 1}
    assert run(music_model, params).data == run(music_model, params).data


def test_music_cancel_stops_within_one_step(music_model: MusicGen) -> None:
    recorder = Recorder(cancel_after=1)
    calls, stop_counting = count_calls(music_model.model.decoder)
    try:
        with pytest.raises(RequestCancelledError, match="after 1 of"):
            run(music_model, {"prompt": "drums", "duration": 1.0}, recorder)
    finally:
        stop_counting()
    # Stopped at the first of 53 tokens: the decoder ran for the prompt (transformers 5 runs
    # that prefill twice) and never again.
    assert len(recorder.fractions) == 1 and calls[0] <= 2


def test_music_validate_fills_the_model_defaults() -> None:
    params = MusicGen.validate(music_entry("unused"), {"prompt": "ambient"})
    assert isinstance(params.pop("seed"), int)
    assert params == {"prompt": "ambient", "duration": 0.5, "response_format": "wav",
                      "guidance_scale": 3.0}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""), ("duration", 0), ("duration", 2.5), ("duration", "long"),
        ("response_format", "ogg"), ("guidance_scale", 31), ("seed", "x"),
    ],
)
def test_music_validate_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        MusicGen.validate(music_entry("unused"), {"prompt": "ambient", field: value})
    assert caught.value.param == field and field in caught.value.message

"""Text to video on diffusers pipelines (LTX-Video, CogVideoX, Wan, zeroscope, ...), encoded to
an H.264 mp4 with PyAV.

Registry `options`: `VideoOptions` (engine/contracts/media.py), the model's right defaults
and limits, read at submit time without the model: `default_size` [w, h], `size_multiple`
(each side's multiple, default 8), `max_side`, `min_side`, `default_fps`, `max_fps`,
`default_duration`, `max_duration` (seconds), `frame_rule`, `max_frames`, `default_steps`,
`max_steps`, `default_guidance`, `default_negative_prompt`, `max_prompt_chars`; and for
loading: `vae_dtype` (run the VAE in
another precision, e.g. float32 for Wan), `vae_tiling` (decode in tiles to save memory) and
`pipeline_kwargs` (extra call arguments, passed when the pipeline takes them).

Frame rule: video VAEs compress time in blocks, so a model makes only certain frame counts.
`"8k+1"` (LTX-Video) allows 9, 17, 25, ...; `"4k+1"` (Wan, CogVideoX) 5, 9, 13, ...; `"any"`
(the default, zeroscope) any count. duration x fps is rounded to the nearest allowed count
(never fewer than one block); the fps stays exact, so the actual duration is frames / fps and
is what the result's metadata reports.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, cast

import av
import numpy as np
import torch
from av.video.stream import VideoStream

from engine.contracts.base import AdapterOptions
from engine.contracts.media import FRAME_RULE, MediaResult, VideoOptions
from engine.core.errors import EmberError, InvalidRequestError, ModelLoadError
from engine.core.registry import ModelEntry
from models.media import MediaAdapter, StepProgress, integer_param, optional_text_param

log = logging.getLogger(__name__)

DEFAULT_MIN_SIDE = 64
_PRESET_RESOLUTION = re.compile(r"^\s*(\d+)\s*p\s*$", re.IGNORECASE)
_EXPLICIT_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class FrameRule:
    """Frame counts of the form step * k + offset, k >= 1."""

    step: int
    offset: int

    @classmethod
    def parse(cls, rule: str, model_id: str) -> FrameRule:
        if rule.strip().lower() == "any":
            return cls(1, 0)
        match = FRAME_RULE.match(rule)
        if match is None or int(match.group(1)) < 1:
            # A registry mistake, not the caller's: a server error naming the entry.
            raise EmberError(
                f"registry entry {model_id!r}: options.frame_rule {rule!r} is not of the form "
                "'8k+1', '4k+1' or 'any'"
            )
        return cls(int(match.group(1)), int(match.group(2) or 0))

    def nearest(self, frames: float) -> int:
        """The allowed count nearest `frames` (halves round up), at least one block."""
        k = max(1, math.floor((frames - self.offset) / self.step + 0.5))
        return self.step * k + self.offset

    def at_most(self, frames: int) -> int:
        """The largest allowed count <= frames (0 if none)."""
        k = (frames - self.offset) // self.step
        return self.step * k + self.offset if k >= 1 else 0


def _resolution(value: Any, options: VideoOptions) -> tuple[int, int]:
    """`"720p"` (the model's default aspect ratio, short side 720, rounded to its size
    multiple) or `"WIDTHxHEIGHT"` (exact; each side a multiple of the size multiple)."""
    default_width, default_height = options.default_size
    multiple = options.size_multiple
    max_side = options.max_side or max(default_width, default_height)
    # The model's own default size is always allowed.
    smallest = min(DEFAULT_MIN_SIDE, default_width, default_height)
    min_side = options.min_side or max(smallest, multiple)
    if value is None:
        return default_width, default_height
    if not isinstance(value, str):
        raise InvalidRequestError(
            f'resolution must be a string like "480p", "720p" or "832x480"; got {value!r}',
            param="resolution",
        )
    if (preset := _PRESET_RESOLUTION.match(value)) is not None:
        short = int(preset.group(1))
        scale = short / min(default_width, default_height)

        def snap(side: float) -> int:
            return max(multiple, round(side / multiple) * multiple)

        width, height = snap(default_width * scale), snap(default_height * scale)
    elif (explicit := _EXPLICIT_RESOLUTION.match(value)) is not None:
        width, height = int(explicit.group(1)), int(explicit.group(2))
        if width % multiple or height % multiple:
            near = f"{max(multiple, round(width / multiple) * multiple)}x" \
                   f"{max(multiple, round(height / multiple) * multiple)}"
            raise InvalidRequestError(
                f"resolution {width}x{height}: each side must be a multiple of {multiple} for "
                f"this model (try {near})", param="resolution",
            )
    else:
        raise InvalidRequestError(
            f'resolution must look like "480p", "720p" or "WIDTHxHEIGHT" (e.g. '
            f'"{default_width}x{default_height}"); got {value!r}', param="resolution",
        )
    for side in (width, height):
        if not min_side <= side <= max_side:
            raise InvalidRequestError(
                f"resolution {width}x{height} is out of range for this model: each side must "
                f"be between {min_side} and {max_side} pixels", param="resolution",
            )
    return width, height


def encode_mp4(frames: np.ndarray, fps: int, codec: str | None = None) -> tuple[bytes, str]:
    """(frames, height, width, 3) RGB, uint8 or floats in [0, 1] → an mp4 playing at exactly
    `fps` (time base 1/fps, one tick per frame) and the codec used: `codec`, or H.264
    (libx264) when the PyAV build has it, else MPEG-4 part 2. yuv420p, so every player can
    show it; the index is written first (faststart) so browsers can play while downloading.
    The same frames give the same bytes."""
    count, height, width, _ = frames.shape
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    # x264's macroblock-tree rate control gives different bytes run to run (PyAV's bundled
    # x264, any thread count); without it a seed reproduces the file, at a few % more bits.
    options = {"crf": "18", "preset": "medium", "x264-params": "mbtree=0"} \
        if codec == "libx264" else {}
    # The muxer rewrites the file to move the index first, which needs a real file.
    with tempfile.TemporaryDirectory(prefix="ember-video-") as folder:
        path = Path(folder) / "video.mp4"
        with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as container:
            stream = cast(VideoStream, container.add_stream(codec, rate=fps, options=options))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = Fraction(1, fps)
            if codec == "mpeg4":  # its default bit rate (200 kb/s) smears anything large
                stream.bit_rate = max(1_000_000, width * height * fps // 4)
            for index in range(count):
                frame = frames[index]
                if frame.dtype != np.uint8:
                    frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
                video_frame = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(frame), format="rgb24"
                )
                video_frame.pts = index
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return path.read_bytes(), codec


class TextToVideo(MediaAdapter):
    """A diffusers text-to-video pipeline; one job at a time (the job queue calls `run`)."""

    options_model: ClassVar[type[AdapterOptions]] = VideoOptions
    options: VideoOptions
    label = "video"

    @classmethod
    def task_params(cls, entry: ModelEntry, options: VideoOptions, params: Mapping[str, Any],
                    duration: float) -> dict[str, Any]:
        negative_prompt = optional_text_param(
            params, "negative_prompt", options.default_negative_prompt
        )
        fps = integer_param(params, "fps", options.default_fps, low=1, high=options.max_fps)
        rule = FrameRule.parse(options.frame_rule, entry.id)
        frames = rule.nearest(duration * fps)
        max_frames = options.max_frames
        if max_frames is not None and frames > max_frames:
            longest = rule.at_most(max_frames) / fps
            raise InvalidRequestError(
                f"duration {duration:g} s at {fps} fps needs {frames} frames; {entry.id!r} "
                f"makes at most {max_frames} (at most {longest:.2f} s at {fps} fps)",
                param="duration",
            )
        width, height = _resolution(params.get("resolution"), options)
        steps = integer_param(params, "num_inference_steps", options.default_steps,
                              low=1, high=options.max_steps)
        return {
            "negative_prompt": negative_prompt,
            "fps": fps,
            "frames": frames,
            "resolution": f"{width}x{height}",
            "width": width,
            "height": height,
            "num_inference_steps": steps,
        }

    def load(self) -> None:
        from diffusers import DiffusionPipeline

        pipeline, path = self.diffusers_pipeline(DiffusionPipeline)
        self._call_arguments = set(inspect.signature(pipeline.__call__).parameters)
        if "num_frames" not in self._call_arguments:
            raise ModelLoadError(
                f"{self.entry.id!r}: {type(pipeline).__name__} at {path} is not a text-to-video "
                "pipeline (it takes no num_frames)"
            )
        options = self.options
        if options.vae_tiling and hasattr(pipeline.vae, "enable_tiling"):
            pipeline.vae.enable_tiling()
        self.model = pipeline.to(self.context.device)
        if options.vae_dtype:  # e.g. Wan's VAE is only accurate in float32
            pipeline.vae.to(dtype=getattr(torch, options.vae_dtype))

    def steps(self, params: dict[str, Any]) -> int:
        return int(params["num_inference_steps"])

    @torch.inference_mode()
    def generate(self, params: dict[str, Any], tracker: StepProgress) -> MediaResult:
        steps = tracker.total_steps
        arguments: dict[str, Any] = {
            "prompt": params["prompt"],
            "negative_prompt": params["negative_prompt"],
            "num_frames": params["frames"],
            "width": params["width"],
            "height": params["height"],
            "num_inference_steps": steps,
            "guidance_scale": params["guidance_scale"],
            # Seeded on the CPU: the same seed gives the same noise on any device.
            "generator": torch.Generator("cpu").manual_seed(params["seed"]),
            "output_type": "np",
        }
        if "frame_rate" in self._call_arguments:  # LTX-Video conditions on it
            arguments["frame_rate"] = params["fps"]
        extra = self.options.pipeline_kwargs
        arguments.update({k: v for k, v in extra.items() if k in self._call_arguments})
        # Raising from the step callback stops the loop at once; diffusers' own interrupt
        # flag would skip the remaining steps but still decode the latents.
        if "callback_on_step_end" in self._call_arguments:

            def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: Any) -> Any:
                tracker.step(step + 1)
                return tensors

            arguments["callback_on_step_end"] = on_step_end
        else:  # older pipelines (TextToVideoSDPipeline) have only the legacy callback

            def on_step(step: int, _timestep: Any, _latents: Any) -> None:
                tracker.step(step + 1)

            arguments.update(callback=on_step, callback_steps=1)
        video = self.model(**arguments).frames[0]
        frames = np.asarray(video)
        data, codec = encode_mp4(frames, params["fps"])
        tracker.finish()
        count, height, width = frames.shape[:3]
        return MediaResult(
            data=data,
            media_type="video/mp4",
            suffix=".mp4",
            metadata={
                "format": "mp4",
                "codec": "h264" if codec == "libx264" else codec,
                "frames": count,
                "fps": params["fps"],
                "duration_s": count / params["fps"],
                "requested_duration_s": params["duration"],
                "width": width,
                "height": height,
                "seed": params["seed"],
                "num_inference_steps": steps,
                "guidance_scale": params["guidance_scale"],
            },
        )

"""Image generation on diffusers pipelines: text to image, image to image and inpainting from
one loaded checkpoint (the image-to-image and inpainting pipelines share its components).

Each image is one item for the engine's `Batcher`: the `n` images of a request, and images of
concurrent requests with the same mode, size, steps and guidance, run in one pipeline call.
Every image has its own seeded generator, so a seed gives the same image whatever it was
batched with. Steps are logged for long generations, and a batch whose callers have all gone
stops at the next step.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from engine.contracts.base import AdapterOptions
from engine.contracts.images import (
    MAX_GUIDANCE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    DiffusionOptions,
    ImageRequest,
)
from engine.core.errors import InvalidRequestError, UnsupportedFeatureError
from engine.core.image_codec import decode_image
from models.base import ModelAdapter

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 5.0


@dataclass(frozen=True)
class ImageJob:
    """One image to make, with everything its pipeline call needs."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    mode: str  # "text", "image" (image to image) or "inpaint"
    strength: float = 1.0
    init_image: Any = None
    mask: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)

    @property
    def group(self) -> tuple[Any, ...]:
        """Jobs that can share one pipeline call."""
        return (self.mode, self.width, self.height, self.steps, self.guidance, self.strength)


class DiffusionImages(ModelAdapter):
    """An `ImageGenerator`. Options: `DiffusionOptions` (engine/contracts/images.py), the
    model's right defaults and limits."""

    options_model: ClassVar[type[AdapterOptions]] = DiffusionOptions
    options: DiffusionOptions

    def load(self) -> None:
        from diffusers import AutoPipelineForText2Image

        pipeline, _ = self.diffusers_pipeline(AutoPipelineForText2Image)
        self.model = pipeline.to(self.context.device)
        self._pipelines: dict[str, Any] = {"text": self.model}
        options = self.options
        self.default_size = options.default_size
        self.max_side = options.max_side or max(self.default_size)
        self.default_steps = options.default_steps
        self.max_steps = options.max_steps
        self.default_guidance = options.default_guidance
        self.max_prompt_chars = options.max_prompt_chars

    def unload(self) -> None:
        self._pipelines = {}
        super().unload()

    def warmup(self) -> None:
        side = max(MIN_SIDE, min(self.default_size) // 4 // 8 * 8)
        self.batch([ImageJob("warm up", None, side, side, 1, self.default_guidance, 0, "text")])

    def _pipeline(self, mode: str) -> Any:
        if mode not in self._pipelines:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            factory = AutoPipelineForImage2Image if mode == "image" else AutoPipelineForInpainting
            kind = "image-to-image" if mode == "image" else "inpainting"
            try:
                pipeline = factory.from_pipe(self.model)
            except (ValueError, KeyError) as exc:
                raise UnsupportedFeatureError(
                    f"{self.entry.id!r} has no {kind} pipeline", param="image"
                ) from exc
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[mode] = pipeline
        return self._pipelines[mode]

    # -- the request thread ------------------------------------------------------------------

    def _check_side(self, width: int, height: int) -> None:
        for side in (width, height):
            if side % SIDE_MULTIPLE or not MIN_SIDE <= side <= self.max_side:
                raise InvalidRequestError(
                    f"size {width}x{height} is not supported by {self.entry.id!r}: each side "
                    f"must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and "
                    f"{self.max_side}",
                    param="size",
                )

    def _steps(self, request: ImageRequest) -> int:
        if request.steps is not None:
            steps = request.steps
        elif request.quality in ("hd", "high") and self.default_steps >= 10:
            steps = min(self.max_steps, self.default_steps * 2)  # more steps, more detail
        elif request.quality == "low":
            steps = max(1, self.default_steps // 2)
        else:
            steps = self.default_steps
        if not 1 <= steps <= self.max_steps:
            raise InvalidRequestError(
                f"num_inference_steps must be between 1 and {self.max_steps}; got {steps}",
                param="num_inference_steps",
            )
        return steps

    def prepare(self, request: ImageRequest) -> list[ImageJob]:
        """Validate against this model's limits and decode input images: one job per image.
        (What needs no model, engine.images.check_image_request checked before the lease.)"""
        if len(request.prompt) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"prompt has {len(request.prompt)} characters; {self.entry.id!r} accepts at "
                f"most {self.max_prompt_chars}", param="prompt",
            )
        guidance = self.default_guidance if request.guidance_scale is None \
            else request.guidance_scale
        if not 0 <= guidance <= MAX_GUIDANCE:  # the entry's own default_guidance
            raise InvalidRequestError(
                f"guidance_scale must be between 0 and {MAX_GUIDANCE:g}; got {guidance}",
                param="guidance_scale")
        strength = 1.0 if request.strength is None else request.strength
        steps = self._steps(request)
        init_image = mask = None
        width, height = request.width, request.height
        mode = "text"
        if request.image is not None:
            init_image = decode_image(request.image, "image").convert("RGB")
            if width is None or height is None:  # keep the input's size, on the 8-pixel grid
                scale = min(1.0, self.max_side / max(init_image.size))
                width, height = (max(MIN_SIDE, int(side * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE)
                                 for side in init_image.size)
            mode = "image"
            if request.mask is not None:
                mask = self._inpaint_mask(decode_image(request.mask, "mask"), init_image)
                mode = "inpaint"
            # Variations keep the picture's composition; edits follow the prompt more.
            if request.strength is None:
                strength = 0.6 if request.mode == "variation" else 0.8
        width, height = width or self.default_size[0], height or self.default_size[1]
        self._check_side(width, height)
        if mode != "text" and steps * strength < 1:
            # Image to image runs steps x strength steps; fewer than one would denoise
            # nothing (1-step turbo models at strength 0.6), so take enough steps for one.
            if self.max_steps * strength < 1:
                raise InvalidRequestError(
                    f"strength {strength:g} leaves no denoising step: {self.entry.id!r} runs "
                    f"at most {self.max_steps} steps, so strength must be at least "
                    f"{1 / self.max_steps:.3g}", param="strength")
            steps = min(self.max_steps, math.ceil(1 / strength))
        if init_image is not None:
            init_image = init_image.resize((width, height))
            mask = mask.resize((width, height)) if mask is not None else None
        first_seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return [
            ImageJob(
                prompt=request.prompt, negative_prompt=request.negative_prompt, width=width,
                height=height, steps=steps, guidance=guidance, seed=first_seed + index,
                mode=mode, strength=strength if mode != "text" else 1.0,
                init_image=init_image, mask=mask,
            )
            for index in range(request.n)
        ]

    @staticmethod
    def _inpaint_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
        """OpenAI masks mark the area to repaint with transparent pixels; diffusers wants it
        white on black."""
        if mask.size != image.size:
            raise InvalidRequestError(
                f"mask is {mask.size[0]}x{mask.size[1]} but image is "
                f"{image.size[0]}x{image.size[1]}; they must match", param="mask",
            )
        if "A" not in mask.getbands():
            raise InvalidRequestError(
                "mask must be a PNG with an alpha channel (transparent = repaint)", param="mask"
            )
        return mask.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)

    @staticmethod
    def size_of(job: ImageJob) -> int:
        return job.width * job.height

    # -- the compute thread ------------------------------------------------------------------

    def batch(self, jobs: list[ImageJob]) -> list[Image.Image]:
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            groups[job.group].append(index)
        images: list[Any] = [None] * len(jobs)
        for indexes in groups.values():
            group = [jobs[i] for i in indexes]
            for i, image in zip(indexes, self._generate(group), strict=True):
                images[i] = image
        return images

    @torch.inference_mode()
    def _generate(self, jobs: list[ImageJob]) -> list[Image.Image]:
        first = jobs[0]
        pipeline = self._pipeline(first.mode)
        started = last_log = time.monotonic()

        def on_step_end(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            nonlocal last_log
            if all(job.cancelled.is_set() for job in jobs):
                pipe._interrupt = True  # diffusers checks it before the next step
            now = time.monotonic()
            if now - last_log >= PROGRESS_LOG_S:
                last_log = now
                log.info("%s: step %d/%d for %d image(s), %.0f s", self.entry.id, step + 1,
                         first.steps, len(jobs), now - started)
            return tensors

        arguments: dict[str, Any] = {
            "prompt": [job.prompt for job in jobs],
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "generator": [torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            "callback_on_step_end": on_step_end,
            "output_type": "pil",
        }
        if any(job.negative_prompt for job in jobs):
            arguments["negative_prompt"] = [job.negative_prompt or "" for job in jobs]
        if first.mode == "text" or first.mode == "inpaint":
            arguments.update(width=first.width, height=first.height)
        if first.mode != "text":
            arguments.update(image=[job.init_image for job in jobs], strength=first.strength)
        if first.mode == "inpaint":
            arguments["mask_image"] = [job.mask for job in jobs]
        images: list[Image.Image] = pipeline(**arguments).images
        return images

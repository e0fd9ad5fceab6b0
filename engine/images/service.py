"""Image generation: the one implementation every dialect calls. The checks that need no model
come first, before the model is looked up, so a bad field is a 400 even when the model is
unknown or not installed; the model's own limits (its largest side, steps, prompt length) are
checked by its adapter once it is loaded. Image decoding runs on worker threads, the pipeline on
the compute thread through the model's `Batcher`, and results are encoded (png, jpeg, webp)
off the event loop."""

from __future__ import annotations

import asyncio

from engine.contracts.images import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GeneratedImage,
    ImageGenerator,
    ImageRequest,
    ImageResult,
)
from engine.core import metrics
from engine.core.batcher import Batcher
from engine.core.errors import InvalidRequestError
from engine.core.image_codec import IMAGE_FORMATS, encode_image, opened_image
from engine.core.manager import ModelManager
from engine.core.settings import Settings
from engine.media.artifacts import ArtifactStore


def check_input_images(image: bytes | None, mask: bytes | None) -> None:
    """The input image and mask of an edit or variation, from their headers alone (cheap: no
    pixels are decoded): each must be an image within the pixel cap, and a mask must have the
    image's size and an alpha channel (transparent = repaint). Blocking: run it off the loop."""
    if image is None:
        return
    with opened_image(image, "image") as opened:
        size = opened.size
    if mask is None:
        return
    with opened_image(mask, "mask") as opened:
        if opened.size != size:
            raise InvalidRequestError(
                f"mask is {opened.size[0]}x{opened.size[1]} but image is {size[0]}x{size[1]}; "
                "they must match", param="mask",
            )
        if "A" not in opened.getbands():
            raise InvalidRequestError(
                "mask must be a PNG with an alpha channel (transparent = repaint)", param="mask"
            )


def check_image_request(request: ImageRequest) -> None:
    """The checks of an image request that need no model (made before it is looked up)."""
    if not 1 <= request.n <= MAX_IMAGES:
        raise InvalidRequestError(f"n must be between 1 and {MAX_IMAGES}; got {request.n}",
                                  param="n")
    if request.output_format not in IMAGE_FORMATS:
        raise InvalidRequestError(
            f"output_format must be one of {', '.join(IMAGE_FORMATS)}; got "
            f"{request.output_format!r}", param="output_format",
        )
    if request.mode != "variation" and not request.prompt.strip():
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if (request.width is None) != (request.height is None):
        raise InvalidRequestError("give both sides of the size, or neither", param="size")
    if request.width is not None and request.height is not None:
        for side in (request.width, request.height):
            if side % SIDE_MULTIPLE or side < MIN_SIDE:
                raise InvalidRequestError(
                    f"size {request.width}x{request.height} is not supported: each side must "
                    f"be a multiple of {SIDE_MULTIPLE}, at least {MIN_SIDE} (and at most the "
                    "model's largest side)",
                    param="size",
                )
    if request.steps is not None and request.steps < 1:
        raise InvalidRequestError(f"num_inference_steps must be at least 1; got {request.steps}",
                                  param="num_inference_steps")
    if request.guidance_scale is not None and not 0 <= request.guidance_scale <= MAX_GUIDANCE:
        raise InvalidRequestError(
            f"guidance_scale must be between 0 and {MAX_GUIDANCE:g}; got "
            f"{request.guidance_scale}", param="guidance_scale",
        )
    if request.strength is not None and not 0 < request.strength <= 1:
        raise InvalidRequestError(f"strength must be in (0, 1]; got {request.strength}",
                                  param="strength")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED - request.n:
        raise InvalidRequestError(f"seed must be between 0 and {MAX_SEED}", param="seed")


class ImageService:
    def __init__(self, settings: Settings, manager: ModelManager, files: ArtifactStore):
        self.settings = settings
        self.manager = manager
        self.files = files

    async def generate(self, request: ImageRequest, keep: bool = False) -> ImageResult:
        """The request's images, encoded; with `keep`, each is also stored in the file store
        and carries its `file_id` (the server builds its URL)."""
        check_image_request(request)  # before the model is looked up, loaded or found missing
        if request.image is not None:
            await asyncio.to_thread(check_input_images, request.image, request.mask)
        model = self.manager.registry.model_or_default(request.model, "image")
        async with self.manager.lease_as(model, "image", ImageGenerator, Batcher) as slot:
            jobs = await asyncio.to_thread(slot.backend.prepare, request)
            try:
                pictures = await slot.runner.submit_many(jobs)
            except BaseException:
                for job in jobs:  # a batch already running stops at its next step
                    job.cancelled.set()
                raise
            metrics.GENERATED_IMAGES.labels(slot.entry.id).inc(len(pictures))

        def encode_all() -> list[GeneratedImage]:
            encoded = []
            for job, picture in zip(jobs, pictures, strict=True):
                data, media_type = encode_image(picture, request.output_format)
                fmt = request.output_format
                file_id = self.files.put(data, media_type, fmt).id if keep else None
                encoded.append(GeneratedImage(data, media_type, fmt, job.seed, file_id))
            return encoded

        return ImageResult(prompt=request.prompt, images=await asyncio.to_thread(encode_all),
                           served_by=slot.entry.id)



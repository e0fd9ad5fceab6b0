"""Image generation: the one implementation every dialect calls. Validation and image decoding
run on worker threads, the pipeline on the compute thread through the model's `Batcher`, and
results are encoded (png, jpeg, webp) off the event loop."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from engine import metrics
from engine.errors import InvalidRequestError
from engine.manager import ModelManager
from engine.types import GeneratedImage, ImageRequest, ImageResult

MAX_IMAGES = 10  # OpenAI's limit on `n`
IMAGE_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
                 "webp": ("WEBP", "image/webp")}


# Decoded size cap. PIL only warns up to twice its own bomb limit (~179 megapixels); a
# caller's image is refused well before it costs that much memory.
MAX_IMAGE_PIXELS = 40_000_000


def decode_image(data: bytes, param: str) -> Image.Image:
    """A caller's image (chat image parts, edit inputs and masks) loaded with PIL, in its own
    mode; anything PIL cannot read, or too large, is a 400 naming `param`."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(
                    f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels "
                    "are accepted",
                    param=param,
                )
            opened.load()  # truncated data fails here, not later in a model
            return opened.copy()
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(
            f"{param} is not an image that can be decoded (PNG, JPEG, WebP, GIF, ...): {exc}",
            param=param,
        ) from exc


def encode_image(image: Any, fmt: str) -> tuple[bytes, str]:
    pil_format, media_type = IMAGE_FORMATS[fmt]
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format)
    return buffer.getvalue(), media_type


async def generate_images(manager: ModelManager, request: ImageRequest) -> ImageResult:
    if not 1 <= request.n <= MAX_IMAGES:
        raise InvalidRequestError(f"n must be between 1 and {MAX_IMAGES}; got {request.n}",
                                  param="n")
    if request.output_format not in IMAGE_FORMATS:
        raise InvalidRequestError(
            f"output_format must be one of {', '.join(IMAGE_FORMATS)}; got "
            f"{request.output_format!r}", param="output_format",
        )
    async with manager.lease(request.model, "image") as slot:
        jobs = await asyncio.to_thread(slot.adapter.prepare, request)
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
            encoded.append(GeneratedImage(data, media_type, request.output_format, job.seed))
        return encoded

    return ImageResult(prompt=request.prompt, images=await asyncio.to_thread(encode_all))

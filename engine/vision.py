"""Image inputs of chat requests: which model serves a request that carries images, and
fetching and decoding those images before the request is queued."""

from __future__ import annotations

import asyncio
import io

from PIL import Image, UnidentifiedImageError

from engine.errors import InvalidRequestError, ModelUnavailableError, UnsupportedFeatureError
from engine.fetch import fetch_image
from engine.registry import ModelEntry, Registry
from engine.settings import Settings
from engine.sources import is_installed
from engine.types import GenerationRequest, ImageInput

# Decoded size cap. PIL only warns up to twice its own bomb limit (~179 megapixels); a
# caller's image is refused well before it costs that much memory.
MAX_IMAGE_PIXELS = 40_000_000


def chat_entry(registry: Registry, request: GenerationRequest) -> ModelEntry:
    """The registry entry that serves a chat or completion request.

    Text goes to the named chat or vision model. A request with images goes to the named
    model if it is a vision model, else to the vision model its entry names in
    `options.vision_model`; otherwise it is a 400 that lists the vision models.
    """
    entry = registry.resolve(request.model)
    if entry.task != "vision":
        entry = registry.resolve(request.model, "chat")  # a 400 for embedding models & co.
    images = request.images()
    if not images or entry.task == "vision":
        return entry
    target = entry.options.get("vision_model")
    if target:
        seeing = registry.resolve(str(target), "vision", param="model")
        if not is_installed(seeing):  # say so before fetching any image for it
            raise ModelUnavailableError(
                f"Images sent to {request.model!r} are answered by the vision model "
                f"{seeing.id!r}, which is not installed. Install it with: {_install(seeing)}"
            )
        return seeing
    vision = [e for e in registry.entries() if e.task == "vision"]
    installed = [e.id for e in vision if is_installed(e)]
    if installed:
        hint = f"Send images to a vision model: {', '.join(installed)}."
    elif vision:
        hint = (f"No vision model is installed; install one of "
                f"{', '.join(e.id for e in vision)} (for example: {_install(vision[0])}).")
    else:
        hint = "The registry has no vision model; add one with `task: vision`."
    raise UnsupportedFeatureError(
        f"The model {request.model!r} cannot see images. {hint}", param=images[0].part
    )


def _install(entry: ModelEntry) -> str:
    return entry.install_hint or f"ember pull {entry.id}"


def decode_image(data: bytes, image: ImageInput) -> Image.Image:
    """Decode with PIL into RGB; anything PIL cannot read is a 400 naming the part."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(
                    f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels "
                    "are accepted",
                    param=image.part,
                )
            return opened.convert("RGB")  # convert() loads the pixels: truncated data fails here
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(
            f"{image.part} is not an image that can be decoded (PNG, JPEG, WebP, GIF, ...): "
            f"{exc}",
            param=image.part,
        ) from exc


async def load_images(request: GenerationRequest, settings: Settings) -> None:
    """Fetch (through the guarded fetcher) and decode every image of the request, in place.
    Runs before the request is queued, so a bad image is a 400 that costs no model time."""
    images = request.images()
    if len(images) > settings.max_images_per_request:
        raise InvalidRequestError(
            f"the request has {len(images)} images; at most {settings.max_images_per_request} "
            "are accepted per request",
            param=images[settings.max_images_per_request].part,
        )

    async def load(image: ImageInput) -> None:
        data = await fetch_image(image.url, settings, image.param)
        image.image = await asyncio.to_thread(decode_image, data, image)

    tasks = [asyncio.ensure_future(load(image)) for image in images]
    try:
        await asyncio.gather(*tasks)
    finally:  # the first refusal stops the other fetches
        for task in tasks:
            task.cancel()

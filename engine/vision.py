"""Image inputs of chat requests: which model serves a request that carries images, and
fetching and decoding those images before the request is queued."""

from __future__ import annotations

import asyncio

from PIL import Image

from engine.errors import InvalidRequestError, ModelUnavailableError, UnsupportedFeatureError
from engine.fetch import fetch_image
from engine.images import decode_image
from engine.registry import ModelEntry, Registry
from engine.settings import Settings
from engine.sources import is_installed
from engine.types import GenerationRequest, ImageInput


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


def decode_rgb(data: bytes, param: str) -> Image.Image:
    return decode_image(data, param).convert("RGB")


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
        image.image = await asyncio.to_thread(decode_rgb, data, image.part)

    tasks = [asyncio.ensure_future(load(image)) for image in images]
    try:
        await asyncio.gather(*tasks)
    finally:  # the first refusal stops the other fetches
        for task in tasks:
            task.cancel()

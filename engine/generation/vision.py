"""Image inputs of chat requests: which model serves a request that carries images, and
fetching and decoding those images before the request is queued.

The order, for every dialect: `vet_images` first (the count, and each URL checked without a
connection, data: URIs decoded), before the model is looked up, so a bad URL is a 400 even when
the model is missing or not installed; then `chat_entry` (the model, installed); only then
`load_images` fetches."""

from __future__ import annotations

import asyncio

from PIL import Image

from engine.contracts.chat import GenerationRequest, ImageInput
from engine.core.errors import InvalidRequestError, ModelUnavailableError, UnsupportedFeatureError
from engine.core.image_codec import decode_image
from engine.core.registry import ModelEntry, Registry
from engine.core.settings import Settings
from engine.core.sources import is_installed, resolve_source
from engine.media.fetch import IMAGE, fetch_image, vet_media_url


def chat_entry(registry: Registry, request: GenerationRequest) -> ModelEntry:
    """The registry entry that serves a chat or completion request.

    Text goes to the named chat or vision model. A request with images goes to the named
    model if it is a vision model, else to the vision model its entry names in
    `options.vision_model`; otherwise it is a 400 that lists the vision models.
    """
    name = registry.model_or_default(request.model, "chat")
    entry = registry.resolve(name)
    if entry.task != "vision":
        entry = registry.resolve(name, "chat")  # a 400 for embedding models & co.
    images = request.images()
    if entry.task == "vision":
        if images:
            resolve_source(entry)  # not installed: a 503 saying how, before fetching any image
        return entry
    if not images:
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


async def vet_images(request: GenerationRequest, settings: Settings) -> list[bytes | None]:
    """The request's images checked without connecting anywhere, before the model is looked
    up: their number, and each URL (`vet_media_url`). Returns each image's bytes where it came
    as a data: URI, None where `load_images` is to fetch it."""
    images = request.images()
    if len(images) > settings.max_images_per_request:
        raise InvalidRequestError(
            f"the request has {len(images)} images; at most {settings.max_images_per_request} "
            "are accepted per request",
            param=images[settings.max_images_per_request].part,
        )
    tasks = [asyncio.ensure_future(vet_media_url(image.url, settings, image.param, IMAGE))
             for image in images]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # the first refusal stops the other lookups
        for task in tasks:
            task.cancel()


async def load_images(request: GenerationRequest, settings: Settings,
                      vetted: list[bytes | None] | None = None) -> None:
    """Fetch (through the guarded fetcher) and decode every image of the request, in place.
    Runs before the request is queued, so a bad image is a 400 that costs no model time.
    `vetted` is what `vet_images` returned for the request (it is run here if not given)."""
    images = request.images()
    if vetted is None:
        vetted = await vet_images(request, settings)

    async def load(image: ImageInput, data: bytes | None) -> None:
        if data is None:
            data = await fetch_image(image.url, settings, image.param)
        image.image = await asyncio.to_thread(decode_rgb, data, image.part)

    tasks = [asyncio.ensure_future(load(image, data))
             for image, data in zip(images, vetted, strict=True)]
    try:
        await asyncio.gather(*tasks)
    finally:  # the first refusal stops the other fetches
        for task in tasks:
            task.cancel()

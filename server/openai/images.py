"""OpenAI's images API on the wire: generations (JSON), edits and variations (multipart), and
the response with `url` (a file in the artifact store) or `b64_json` items."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import Field

from engine.contracts.images import MAX_GUIDANCE, ImageMode, ImageRequest, ImageResult
from engine.core.errors import InvalidRequestError
from engine.service import Engine
from server.deps import file_url
from server.forms import read_form, validate_form
from server.openai.schemas import WireModel
from server.openapi import JSON_EXACT, NonBlank, Published
from server.wire import Size, parse_size


class ImageFields(WireModel):
    """Fields generations, edits and variations share. ember extensions: seed,
    negative_prompt, num_inference_steps, guidance_scale, strength (edits, variations)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: Size | None = None
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] = "auto"
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # Seeds the engine takes (seed + n - 1 <= MAX_SEED), stated within JSON's exact integers.
    seed: Annotated[int, Field(ge=0), Published(maximum=JSON_EXACT)] | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: Annotated[float, Field(ge=0), Published(maximum=MAX_GUIDANCE)] | None = None
    strength: float | None = Field(None, gt=0, le=1)


class ImageGenerationIn(ImageFields):
    prompt: NonBlank
    style: Literal["vivid", "natural"] | None = None


class ImageEditForm(ImageFields):
    prompt: NonBlank


class ImageVariationForm(ImageFields):
    pass


def image_request(
    body: ImageFields, mode: ImageMode, prompt: str = "",
    image: bytes | None = None, mask: bytes | None = None,
) -> ImageRequest:
    width, height = parse_size(body.size)
    return ImageRequest(
        model=body.model, prompt=prompt, mode=mode,
        n=body.n, width=width, height=height, steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        negative_prompt=body.negative_prompt, seed=body.seed, quality=body.quality,
        strength=body.strength, image=image, mask=mask, output_format=body.output_format,
    )


async def read_edit_form(
    request: Request, mode: Literal["edit", "variation"]
) -> tuple[ImageFields, ImageRequest]:
    fields, files = await read_form(request, ("image", "mask"))
    if "image" not in files:
        raise InvalidRequestError(
            "Missing required parameter: 'image' (a png, jpeg or webp file, sent as multipart "
            "form data).", param="image", code="missing_required_parameter",
        )
    if mode == "edit":
        edit = validate_form(ImageEditForm, fields)
        return edit, image_request(edit, "edit", edit.prompt, files["image"], files.get("mask"))
    variation = validate_form(ImageVariationForm, fields)
    return variation, image_request(variation, "variation", "", files["image"])


def keeps_files(body: ImageFields) -> bool:
    """Whether the images are to be kept in the file store (to be fetched by URL)."""
    return body.response_format != "b64_json"


def images_response(
    result: ImageResult, body: ImageFields, request: Request, engine: Engine
) -> dict[str, Any]:
    data = []
    for image in result.images:
        item: dict[str, Any] = {"revised_prompt": result.prompt, "seed": image.seed}
        if image.file_id is None:
            item["b64_json"] = base64.b64encode(image.data).decode()
        else:
            item["url"] = file_url(request, engine, image.file_id)
        data.append(item)
    return {"created": int(time.time()), "data": data, "output_format": body.output_format}

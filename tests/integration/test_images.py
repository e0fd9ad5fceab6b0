"""Image generation through the real `openai` client on a tiny random diffusion pipeline (its
pictures are noise: these tests check protocol, sizes, batching and determinism)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from PIL import Image

from engine.contracts.base import LoadContext
from engine.core.registry import ModelEntry
from models.diffusion import DiffusionImages, ImageJob
from tests.conftest import Served


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def batch_totals(served: Served) -> tuple[float, float]:
    metrics = (await served.http.get("/metrics")).text

    def value(name: str) -> float:
        match = re.search(rf'{name}{{model="tiny-diffusion"}} ([0-9.e+]+)', metrics)
        return float(match.group(1)) if match else 0.0

    return value("ember_batch_size_sum"), value("ember_batch_size_count")


async def test_b64_images_have_the_size_asked_for_and_n_share_one_batch(served: Served) -> None:
    before = await batch_totals(served)
    result = await served.openai.images.generate(
        model="dall-e-3", prompt="a lighthouse at dusk", n=4, size="128x64",
        response_format="b64_json",
    )
    after = await batch_totals(served)
    assert result.data is not None and len(result.data) == 4
    for item in result.data:
        assert item.revised_prompt == "a lighthouse at dusk"
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (128, 64)
    assert after[0] - before[0] == 4 and after[1] - before[1] == 1  # one pipeline call


async def test_url_response_serves_the_file_from_the_artifact_store(served: Served) -> None:
    result = await served.openai.images.generate(model="dall-e-2", prompt="a red bicycle")
    assert result.data is not None and result.data[0].url is not None
    url = result.data[0].url
    match = re.fullmatch(r"http://ember/v1/files/(file-[A-Za-z0-9_-]+)/content", url)
    assert match, url
    content = await served.http.get(url)
    assert content.status_code == 200 and content.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(content.content)).size == (64, 64)  # the model's default
    info = (await served.http.get(f"/v1/files/{match.group(1)}")).json()
    assert info["bytes"] == len(content.content) and info["expires_at"] > info["created_at"]


async def test_same_seed_gives_the_same_bytes(served: Served) -> None:
    async def make(seed: int) -> bytes:
        result = await served.openai.images.generate(
            prompt="a cat", response_format="b64_json", extra_body={"seed": seed},
        )
        assert result.data is not None and result.data[0].b64_json is not None
        return base64.b64decode(result.data[0].b64_json)

    first, again, other = await make(7), await make(7), await make(8)
    assert first == again
    assert first != other


async def test_concurrent_requests_with_the_same_shape_are_batched(served: Served) -> None:
    before = await batch_totals(served)
    await asyncio.gather(*(
        served.openai.images.generate(prompt=f"scene {i}", response_format="b64_json")
        for i in range(3)
    ))
    after = await batch_totals(served)
    assert after[0] - before[0] == 3 and after[1] - before[1] < 3


async def test_jpeg_output_and_extensions(served: Served) -> None:
    result = await served.openai.images.generate(
        prompt="a boat", size="96x96", response_format="b64_json",
        extra_body={"output_format": "jpeg", "num_inference_steps": 3, "guidance_scale": 2.0,
                    "negative_prompt": "blurry"},
    )
    assert result.data is not None
    image = decode(result.data[0].b64_json)
    assert image.format == "JPEG" and image.size == (96, 96)


async def test_edit_with_mask_and_variation(served: Served) -> None:
    picture = png_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))
    mask_image = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask_image.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent square: repaint here
    edited = await served.openai.images.edit(
        image=("in.png", picture), mask=("mask.png", png_bytes(mask_image)),
        prompt="a blue square", n=2, response_format="b64_json",
    )
    assert edited.data is not None and len(edited.data) == 2
    assert decode(edited.data[0].b64_json).size == (64, 64)
    no_mask = await served.openai.images.edit(
        image=("in.png", picture), prompt="make it green", response_format="b64_json",
    )
    assert no_mask.data is not None
    variation = await served.openai.images.create_variation(
        image=("in.png", picture), response_format="b64_json", size="256x256",
    )
    assert variation.data is not None and decode(variation.data[0].b64_json).size == (256, 256)


GENERATION_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"size": "100x100"}, "size"),  # not a multiple of 8
    ({"size": "big"}, "size"),
    ({"size": "512x512"}, "size"),  # over the model's max_side
    ({"n": 11}, "n"),
    ({"n": 0}, "n"),
    ({"num_inference_steps": 9}, "num_inference_steps"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"response_format": "jpeg"}, "response_format"),
    ({"guidance_scale": 50}, "guidance_scale"),
]


@pytest.mark.parametrize(("fields", "param"), GENERATION_ERRORS)
async def test_bad_generation_requests_get_400(
    served: Served, fields: dict[str, Any], param: str
) -> None:
    body = {"model": "dall-e-2", "prompt": "a cat", **fields}
    response = await served.http.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_bad_edit_requests_get_400(served: Served) -> None:
    picture = png_bytes(Image.new("RGB", (64, 64)))
    cases = [
        ({}, {"prompt": "x"}, "image"),
        ({"image": ("a.png", b"not an image")}, {"prompt": "x"}, "image"),
        ({"image": ("a.png", picture), "mask": ("m.png", png_bytes(Image.new("RGBA", (32, 32))))},
         {"prompt": "x"}, "mask"),
        ({"image": ("a.png", picture), "mask": ("m.png", picture)}, {"prompt": "x"}, "mask"),
        ({"image": ("a.png", picture)}, {}, "prompt"),
        # Under 1/max_steps (8 here) no denoising step is left: it was a 500 (schemathesis).
        ({"image": ("a.png", picture)}, {"prompt": "x", "strength": "0.01"}, "strength"),
    ]
    for files, data, param in cases:
        response = await served.http.post("/v1/images/edits", files=files, data=data)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param


# sd-turbo is in the registry but never pulled here; no-such-model is not in it at all.
ABSENT_IMAGE_MODELS = ["sd-turbo", "no-such-model"]
# Checks that need no model: each is a 400 even when the model is not installed (or unknown).
STATIC_GENERATION_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"size": "100x100"}, "size"),  # not a multiple of 8
    ({"size": "32x32"}, "size"),  # under 64 pixels a side
    ({"size": "big"}, "size"),
    ({"n": 11}, "n"),
    ({"n": 0}, "n"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"guidance_scale": 50}, "guidance_scale"),
    ({"output_format": "gif"}, "output_format"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
]


@pytest.mark.parametrize("model", ABSENT_IMAGE_MODELS)
@pytest.mark.parametrize(("fields", "param"), STATIC_GENERATION_ERRORS)
async def test_bad_fields_are_400_before_the_model_is_found_missing(
    served: Served, model: str, fields: dict[str, Any], param: str
) -> None:
    body = {"model": model, "prompt": "a cat", **fields}
    response = await served.http.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("model", ABSENT_IMAGE_MODELS)
async def test_bad_edits_and_variations_are_400_before_the_model_is_found_missing(
    served: Served, model: str,
) -> None:
    picture = png_bytes(Image.new("RGB", (64, 64)))
    small_mask = png_bytes(Image.new("RGBA", (32, 32)))
    cases: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
        ("edits", {"image": ("a.png", b"not an image")}, {"prompt": "x"}, "image"),
        ("edits", {"image": ("a.png", picture), "mask": ("m.png", small_mask)},
         {"prompt": "x"}, "mask"),
        ("edits", {"image": ("a.png", picture), "mask": ("m.png", picture)},  # no alpha
         {"prompt": "x"}, "mask"),
        ("edits", {"image": ("a.png", picture)}, {"prompt": " "}, "prompt"),
        ("edits", {"image": ("a.png", picture)}, {"prompt": "x", "size": "100x100"}, "size"),
        ("variations", {"image": ("a.png", b"GIF89a broken")}, {}, "image"),
        ("variations", {"image": ("a.png", picture)}, {"size": "72x10"}, "size"),
        ("variations", {"image": ("a.png", picture)}, {"strength": "0"}, "strength"),
    ]
    for route, files, data, param in cases:
        response = await served.http.post(f"/v1/images/{route}", files=files,
                                          data={"model": model, **data})
        assert response.status_code == 400, (route, param, response.text)
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("model", ABSENT_IMAGE_MODELS)
async def test_gateway_image_routes_check_fields_before_the_model(
    served: Served, model: str,
) -> None:
    """seed 001 `/v1/ai/image` and QuantCDN image-generation, in their own envelopes."""
    seed_cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": "  "}, "prompt"), ({"size": "100x100"}, "size"), ({"size": "huge"}, "size"),
        ({"n": 11}, "n")]
    for fields, param in seed_cases:
        response = await served.http.post(
            "/v1/ai/image", json={"model": model, "prompt": "a cat", **fields})
        assert response.status_code == 400, (fields, response.text)
        error = response.json()["error"]
        assert error["status"] == 400 and error["param"] == param, error
    picture = base64.b64encode(png_bytes(Image.new("RGB", (64, 64)))).decode()
    config = "imageGenerationConfig"
    quant_cases: list[tuple[dict[str, Any], str]] = [
        ({"taskType": "TEXT_IMAGE", "textToImageParams": {"text": "x"},
          config: {"width": 100, "height": 64}}, f"{config}.width"),
        ({"taskType": "TEXT_IMAGE", "textToImageParams": {"text": "   "}},
         "textToImageParams.text"),
        ({"taskType": "IMAGE_VARIATION",
          "imageVariationParams": {"images": [base64.b64encode(b"not an image").decode()]}},
         "imageVariationParams.images[0]"),
        ({"taskType": "IMAGE_VARIATION", "imageVariationParams": {"images": [picture]},
          config: {"width": 40, "height": 40}}, f"{config}.width"),
    ]
    for body, param in quant_cases:
        response = await served.http.post("/api/v3/organizations/acme/ai/image-generation",
                                          json={"modelId": model, **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()
        assert error["error"] is True and error["param"] == param, error


async def test_a_preset_that_was_never_pulled_says_how_to_get_it(served: Served) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await served.openai.images.generate(model="sd-turbo", prompt="a cat")
    assert caught.value.status_code == 503
    assert "ember pull sd-turbo" in str(caught.value)


async def test_unknown_and_malformed_file_ids_are_404(served: Served) -> None:
    for path in ("/v1/files/file-doesnotexistdoesnotexist/content",
                 "/v1/files/..%2F..%2Fetc%2Fpasswd/content", "/v1/files/%2Fetc%2Fpasswd"):
        response = await served.http.get(path)
        assert response.status_code == 404, path
    # The store is still usable afterwards.
    assert (await served.http.get("/health")).status_code == 200


def test_generation_stops_between_steps_when_every_caller_is_gone(tiny_diffusion_dir: Path) -> None:
    entry = ModelEntry(id="tiny", task="image", adapter="models.diffusion:DiffusionImages",
                       source=str(tiny_diffusion_dir), options={"default_guidance": 0.0})
    adapter = DiffusionImages(entry, LoadContext("cpu", torch.float32, tiny_diffusion_dir))
    adapter.load()
    calls = []
    adapter.model.unet.register_forward_hook(lambda *_: calls.append(1))
    job = ImageJob("a cat", None, 64, 64, steps=8, guidance=0.0, seed=1, mode="text")
    adapter.batch([job])
    assert len(calls) == 8
    calls.clear()
    gone = ImageJob("a cat", None, 64, 64, steps=8, guidance=0.0, seed=1, mode="text")
    gone.cancelled.set()
    adapter.batch([gone])
    assert len(calls) == 1


async def test_image_to_image_with_fewer_steps_than_one_denoise_still_runs(
    served: Served,
) -> None:
    picture = png_bytes(Image.new("RGB", (64, 64), (10, 200, 10)))
    variation = await served.openai.images.create_variation(
        image=("in.png", picture), response_format="b64_json",
        extra_body={"num_inference_steps": 1, "strength": 0.3},
    )
    assert variation.data is not None and decode(variation.data[0].b64_json).size == (64, 64)

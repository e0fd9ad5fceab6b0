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

from engine.registry import ModelEntry
from models.base import LoadContext
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
    ]
    for files, data, param in cases:
        response = await served.http.post("/v1/images/edits", files=files, data=data)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param


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

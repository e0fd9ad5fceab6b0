"""mRoPE vision models (the Qwen2-VL family) under the chat scheduler: after an image prompt's
prefill its rows decode at positions shifted by the model's rope delta, while they share the
batch with text rows. Checked against transformers' own `generate` on a tiny random Qwen2-VL.

The Qwen2-VL processor cannot be built without torchvision (its video half needs it), so
this test does the processor's two jobs by hand with the PIL image processor: pixel values
and grid sizes, and one `<|image_pad|>` per merged patch. (tests/gpu runs the real processor.)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from engine.contracts.base import LoadContext
from engine.contracts.chat import PromptInput, SamplingParams
from engine.core.compute import ComputeThread
from engine.core.errors import ModelExecutionError
from engine.core.registry import ModelEntry
from engine.generation.scheduler import ChatScheduler
from models.vision import VisionChat
from tests.tiny_models import tiny_qwen2_vl
from tests.vision_checks import TOKENS, generate_greedy, serve_greedy


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[VisionChat, Any]:
    model, tokenizer = tiny_qwen2_vl()
    entry = ModelEntry(id="tiny-qwen2-vl", task="vision", adapter="models.vision:VisionChat",
                       source="unused")
    context = LoadContext("cpu", torch.float32, Path(tmp_path_factory.mktemp("models")))
    adapter = VisionChat(entry, context)
    adapter.tokenizer = tokenizer
    adapter._adopt(model)
    return adapter, Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


def image_prompt(
    adapter: VisionChat, processor: Any, color: tuple[int, int, int]
) -> PromptInput:
    pixels = processor(images=[Image.new("RGB", (100, 60), color)], return_tensors="pt")
    tokens = int(pixels["image_grid_thw"].prod()) // 4  # 2x2 patches merge into one token
    text = ("<|im_start|>user\nWhat is <|vision_start|>" + "<|image_pad|>" * tokens
            + "<|vision_end|> this?<|im_end|>\n<|im_start|>assistant\n")
    ids = adapter.tokenizer(text, add_special_tokens=False).input_ids
    return PromptInput(ids=ids, text=text,
                       extras={**pixels, "mm_token_type_ids": image_types(adapter, ids)})


def image_types(adapter: VisionChat, ids: list[int]) -> torch.Tensor:
    image_id = adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return torch.tensor([[int(token == image_id) for token in ids]])


def test_image_rows_decode_at_shifted_positions_in_a_shared_batch(
    qwen: tuple[VisionChat, Any],
) -> None:
    adapter, processor = qwen
    prompts = [image_prompt(adapter, processor, (200, 20, 20)),
               PromptInput(ids=adapter.tokenizer("Hello world").input_ids, text=""),
               image_prompt(adapter, processor, (20, 20, 200))]
    expected = [generate_greedy(adapter, prompt) for prompt in prompts]
    assert expected[0] != expected[2]  # the model sees the images
    assert prompts[0].extras is not None
    _, _, shift = adapter.prefill_vision(prompts[0].ids, prompts[0].extras)
    assert shift < 0  # image tokens take fewer positions than tokens: text after is shifted
    assert adapter._rope_delta() == 0  # and the model's copy is cleared
    assert serve_greedy(adapter, prompts) == expected


def test_a_failing_image_prefill_fails_only_its_request(qwen: tuple[VisionChat, Any]) -> None:
    adapter, processor = qwen
    good = image_prompt(adapter, processor, (200, 20, 20))
    bad = image_prompt(adapter, processor, (20, 200, 20))
    # Two image tokens fewer than the image has features: the model refuses the prompt.
    image_id = adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    first_image = bad.ids.index(image_id)
    bad.ids = bad.ids[:first_image] + bad.ids[first_image + 2:]
    assert bad.extras is not None
    bad.extras["mm_token_type_ids"] = image_types(adapter, bad.ids)
    compute = ComputeThread()
    scheduler = ChatScheduler(adapter, "tiny-qwen2-vl", compute, max_batch_size=8,
                              max_queue=8, kv_cache_tokens=4096, prefill_chunk_tokens=512)
    try:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        first = scheduler.submit(good, params, lambda event: None, threading.Event())
        broken = scheduler.submit(bad, params, lambda event: None, threading.Event())
        with pytest.raises(ModelExecutionError, match="do not match"):
            broken.result(timeout=60)
        assert first.result(timeout=60).completion_tokens == TOKENS
    finally:
        scheduler.shutdown()
        compute.close()

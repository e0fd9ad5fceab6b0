"""GPU tier for vision chat: tiny random LLaVA, Qwen2-VL and SmolVLM checkpoints loaded by
VisionChat.load (AutoProcessor + AutoModelForImageTextToText), served on CUDA by the chat
scheduler with two image prompts and a text prompt sharing the batch, give what transformers'
`generate` gives on the same device and dtype. Qwen2-VL and SmolVLM processors need
torchvision (SmolVLM's also num2words); without them those cases are skipped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.contracts.base import LoadContext
from engine.core.registry import ModelEntry
from engine.generation.service import prompt_input
from models.vision import VisionChat
from tests.tiny_models import build_tiny_llava, build_tiny_qwen2_vl, build_tiny_smolvlm
from tests.vision_checks import generate_greedy, image_request, serve_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": build_tiny_llava, "qwen2-vl": build_tiny_qwen2_vl, "smolvlm": build_tiny_smolvlm,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_served_replies_match_generate_on_cuda(
    family: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    try:
        folder = BUILDERS[family](tmp_path / family)
    except ImportError as exc:  # torchvision / num2words missing
        pytest.skip(str(exc).strip().splitlines()[0])
    entry = ModelEntry(id=family, task="vision", adapter="models.vision:VisionChat",
                       source=str(folder))
    adapter = VisionChat(entry, LoadContext("cuda", dtype, tmp_path / "models"))
    adapter.load()
    adapter.warmup()
    requests = [image_request((220, 20, 20)), image_request(None, "Hello world"),
                image_request((20, 20, 220))]
    prompts = [prompt_input(adapter, request) for request in requests]
    assert len(prompts[0].ids) > len(prompts[1].ids)  # image tokens in the prompt
    expected = [generate_greedy(adapter, prompt) for prompt in prompts]
    assert expected[0] != expected[2]  # the model sees the images
    assert serve_greedy(adapter, prompts) == expected
    adapter.unload()

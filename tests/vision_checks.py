"""Shared by the vision tests: serve prompts through the real ChatScheduler, and the reference
answer from transformers' own `generate` on the same adapter's model."""

from __future__ import annotations

import threading
from typing import Any

import torch
from PIL import Image

from engine.contracts.chat import (
    ChatMessage,
    GenerationEvent,
    GenerationRequest,
    ImageInput,
    PromptInput,
    SamplingParams,
    TextDelta,
)
from engine.core.compute import ComputeThread
from engine.generation.scheduler import ChatScheduler
from models.chat import TransformersChat

TOKENS = 8


def image_request(color: tuple[int, int, int] | None, text: str = "What is this?",
                  size: tuple[int, int] = (40, 30)) -> GenerationRequest:
    """A one-message chat request: the text, then a plain-colored image (None: text only)."""
    parts: tuple[str | ImageInput, ...] = ()
    if color is not None:
        image = ImageInput(url="", param="", part="", image=Image.new("RGB", size, color))
        parts = (text, image)
    return GenerationRequest(model="tiny", params=SamplingParams(max_tokens=TOKENS),
                             messages=[ChatMessage("user", text, parts=parts)])


def serve_greedy(adapter: TransformersChat, prompts: list[PromptInput]) -> list[str]:
    """Submit every prompt at once (they share the batch); each one's greedy text."""
    texts = ["" for _ in prompts]
    compute = ComputeThread()
    scheduler = ChatScheduler(adapter, "tiny", compute, max_batch_size=8, max_queue=8,
                              kv_cache_tokens=8192, prefill_chunk_tokens=512)

    def collector(index: int) -> Any:
        def emit(event: GenerationEvent) -> None:
            if isinstance(event, TextDelta):
                texts[index] += event.text
        return emit

    try:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        futures = [scheduler.submit(prompt, params, collector(index), threading.Event())
                   for index, prompt in enumerate(prompts)]
        for future in futures:
            assert future.result(timeout=120).completion_tokens == TOKENS
    finally:
        scheduler.shutdown()
        compute.close()
    return texts


def generate_greedy(adapter: TransformersChat, prompt: PromptInput) -> str:
    """`model.generate` on the prompt alone, decoded as the server decodes its reply."""
    device = adapter.context.device
    ids = torch.tensor([prompt.ids], device=device)
    extra: dict[str, Any] = {}
    for name, value in (prompt.extras or {}).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(adapter.model.dtype)
        extra[name] = value
    out = adapter.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **extra,
                                 max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    text: str = adapter.tokenizer.decode(out[0, len(prompt.ids):], skip_special_tokens=True)
    # A trailing partial UTF-8 sequence decodes to U+FFFD here; the streaming detokenizer
    # holds it back instead.
    return text.rstrip("\ufffd")

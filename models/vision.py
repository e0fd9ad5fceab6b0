"""Vision chat: transformers image-text-to-text checkpoints (LLaVA, SmolVLM / Idefics3,
Qwen2-VL, Gemma 3, ...) through `AutoModelForImageTextToText` + `AutoProcessor`.

The adapter is a `TransformersChat`, so engine.scheduler.ChatScheduler serves it with the same
streaming, sampling, stop strings, cancellation and usage as text chat. What differs: prompts
are rendered with the processor's chat template (image placeholders included), a prompt with
images carries the processor's tensors (`PromptInput.extras`) and is prefilled
alone in one multimodal forward (`prefill_vision`); decode steps are the language model's,
shared with every other row of the batch. Text-only prompts take the plain text path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache

from engine.contracts.chat import (
    ChatMessage,
    ImageInput,
    PrefillChunk,
    PromptInput,
    StepPlan,
    ToolSpec,
)
from engine.contracts.chat_templates import ROLE_FOR_TEMPLATE
from engine.core.errors import InvalidRequestError, ModelLoadError, UnsupportedFeatureError
from engine.core.sources import resolve_source
from models.chat import TransformersChat
from models.chat_batching import KVBlock


class VisionChat(TransformersChat):
    """Any `AutoModelForImageTextToText` checkpoint with an `AutoProcessor` (local dir or HF
    repo id). Needs no torchvision for LLaVA-style processors; SmolVLM and Qwen2-VL
    processors need it (install the torchvision build that matches your torch)."""

    def load(self) -> None:
        path = resolve_source(self.entry)
        remote = self.entry.trust_remote_code
        try:
            self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=remote)
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=self.context.dtype, trust_remote_code=remote, use_safetensors=True
            )
        except (OSError, ImportError, ValueError) as exc:
            raise ModelLoadError(f"cannot load {self.entry.id!r} from {path}: {exc}") from exc
        self.tokenizer = self.processor.tokenizer
        self._template_text = self.processor.chat_template or self.tokenizer.chat_template
        # The processor tokenizes through the shared transformers tokenizer, which is not safe
        # to call from several request threads at once (see models.base.thread_safe_encoder).
        self._processor_lock = threading.Lock()
        self._adopt(model)

    def warmup(self) -> None:
        super().warmup()
        # The vision tower's first call pays its own lazy initialization.
        blank = ImageInput(url="", param="", part="", image=Image.new("RGB", (64, 64)))
        prompt = self.render_chat([ChatMessage("user", "Hi", parts=(blank, "Hi"))])
        self.execute(StepPlan(prefill=[PrefillChunk(-1, prompt.ids, 0, True, prompt.extras)]))
        self.release(-1)

    # -- prompts -----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[ChatMessage],
                    tools: Sequence[ToolSpec] = ()) -> PromptInput:
        if tools:
            raise UnsupportedFeatureError(
                f"{self.entry.id!r} (a vision model) takes no tools", param="tools")
        text = self._render(messages)
        images = [image for message in messages for image in message.images]
        if not images:
            return PromptInput(self._encoder.encode(text, add_special_tokens=False).ids, text)
        try:
            with self._processor_lock:
                inputs = self.processor(
                    text=[text], images=[[image.image for image in images]],
                    add_special_tokens=False, return_tensors="pt",
                )
        except (ValueError, TypeError) as exc:  # e.g. a template that drops some images
            raise InvalidRequestError(
                f"{self.entry.id!r} cannot take these images: {exc}", param=images[0].part
            ) from exc
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)  # one row, no padding: rebuilt at prefill
        return PromptInput(ids, text, extras=dict(inputs))

    def _render(self, messages: Sequence[ChatMessage]) -> str:
        """The chat template over content-part lists, `{"type": "image"}` marking each image
        (what image-text-to-text templates expect; most cannot take a plain string)."""
        if not self._template_text:
            raise UnsupportedFeatureError(
                f"{self.entry.id!r} has no chat template; use /v1/completions with a prompt",
                param="model",
            )
        turns = []
        for message in messages:
            parts = message.parts or (message.content,)
            content = [
                {"type": "image"} if isinstance(part, ImageInput)
                else {"type": "text", "text": part}
                for part in parts
            ]
            role = ROLE_FOR_TEMPLATE.get(message.role, message.role)
            turns.append({"role": role, "content": content})
        text: str = self.processor.apply_chat_template(
            turns, chat_template=self._template_text, add_generation_prompt=True,
            tokenize=False,
        )
        return text

    # -- the multimodal prefill, run by TransformersChat.execute -----------------------------

    @torch.no_grad()
    def prefill_vision(
        self, ids: list[int], extras: dict[str, Any]
    ) -> tuple[KVBlock, torch.Tensor, int]:
        """One forward over a prompt with images: vision tower, projector and language model.
        Returns its KV row, its last logits and the position offset its decode steps need."""
        device = self.context.device
        tokens = torch.tensor([ids], device=device)
        mask = torch.ones_like(tokens)
        inputs: dict[str, Any] = {}
        for name, value in extras.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if value.is_floating_point():
                    value = value.to(self.model.dtype)
            inputs[name] = value
        cache = DynamicCache()
        out = self.model(input_ids=tokens, attention_mask=mask, cache=cache,
                         use_cache=True, logits_to_keep=1, **inputs)
        return KVBlock.from_cache(cache, mask), out.logits[0, -1, :], self._rope_delta()

    def _rope_delta(self) -> int:
        """mRoPE models (the Qwen2-VL family) give the text after an image positions shifted
        from its token index; the model records that shift (`rope_deltas`) at prefill. Decode
        steps pass explicit positions, so the scheduler adds the shift to this prompt's rows.
        It is cleared here so no later forward picks up this prompt's value."""
        inner = getattr(self.model, "model", None)
        deltas = getattr(inner, "rope_deltas", None)
        if not isinstance(deltas, torch.Tensor):
            return 0
        inner.rope_deltas = None  # type: ignore[union-attr]
        return int(deltas.reshape(-1)[0])

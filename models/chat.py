"""Chat and text completion on transformers causal LMs, with our own decode loop so that the
engine owns sampling, stop strings, streaming and cancellation."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from engine.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelLoadError,
    UnsupportedFeatureError,
)
from engine.sources import file_fingerprint, resolve_source
from engine.types import (
    ChoiceFinished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    Usage,
)
from models.base import ModelAdapter
from models.decoding import (
    IncrementalDetokenizer,
    StopStringMatcher,
    apply_penalties,
    sample_next,
)

log = logging.getLogger(__name__)

# Roles a chat template knows; "developer" is OpenAI's newer name for "system".
_ROLE_FOR_TEMPLATE = {"developer": "system"}


@dataclass
class PreparedPrompt:
    """A request after tokenization and limit checks, ready to decode."""

    ids: list[int]
    text: str
    max_tokens: int


@dataclass
class _ChoiceState:
    detok: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0


class TransformersChat(ModelAdapter):
    """Any `AutoModelForCausalLM` checkpoint (safetensors dir, HF id, or a GGUF file that is
    de-quantized once into the model cache)."""

    def load(self) -> None:
        path = resolve_source(self.entry)
        if self.entry.gguf_file:
            path = str(self._dequantized_checkpoint(Path(path), self.entry.gguf_file))
        remote = self.entry.trust_remote_code
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.context.dtype, trust_remote_code=remote
            )
        except OSError as exc:
            raise ModelLoadError(f"cannot load {self.entry.id!r} from {path}: {exc}") from exc
        self.model = model.to(self.context.device).eval()
        config = self.model.config
        self.context_length = int(
            self.entry.limits.context_length
            or getattr(config, "max_position_embeddings", None)
            or self.tokenizer.model_max_length
        )
        self.vocab_size = int(config.vocab_size)
        self.eos_ids = self._eos_token_ids()

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(source)
        return ids

    def _dequantized_checkpoint(self, folder: Path, gguf_file: str) -> Path:
        """GGUF de-quantization takes 15-60 s; do it once and keep a safetensors folder."""
        gguf_path = folder / gguf_file
        if not gguf_path.is_file():
            raise ModelLoadError(f"{self.entry.id!r}: GGUF file {gguf_path} not found")
        target = self.context.models_dir / f"{self.entry.id}-{file_fingerprint(gguf_path)}"
        if (target / "config.json").is_file():
            return target
        log.info("de-quantizing %s once into %s (later starts skip this)", gguf_path, target)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
        # The de-quantized weights are plain tensors; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        self.context.models_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.context.models_dir))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            # If another process finished first, its copy is as good as ours.
            with contextlib.suppress(OSError):
                staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("de-quantized %s in %.1fs", self.entry.id, time.perf_counter() - started)
        return target

    def warmup(self) -> None:
        params = SamplingParams(max_tokens=2, temperature=0)
        prepared = self.prepare(GenerationRequest(model=self.entry.id, params=params, prompt="Hi"))
        self.generate(prepared, params, lambda event: None, threading.Event())

    # -- requests ----------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """Tokenize and check limits. Raises a 400-class error for anything the caller got wrong."""
        if request.messages is not None:
            ids, text = self._chat_prompt(request)
            param = "messages"
        elif isinstance(request.prompt, str):
            text = request.prompt
            ids = list(self.tokenizer(text).input_ids)
            param = "prompt"
        else:
            ids = list(request.prompt or [])
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary "
                    f"(0..{self.vocab_size - 1})",
                    param="prompt",
                )
            text = self.tokenizer.decode(ids)
            param = "prompt"
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        room = self.context_length - len(ids)
        asked = request.params.max_tokens
        if room <= 0 or (asked is not None and asked > room):
            wanted = f"{len(ids)} in the prompt" + (f" + {asked} to generate" if asked else "")
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"request needs {wanted} = {len(ids) + (asked or 0)} tokens. Shorten the "
                "prompt or lower max_tokens.",
                param=param if room <= 0 else "max_tokens",
            )
        return PreparedPrompt(ids=ids, text=text, max_tokens=asked if asked is not None else room)

    def _chat_prompt(self, request: GenerationRequest) -> tuple[list[int], str]:
        if not self.tokenizer.chat_template:
            raise UnsupportedFeatureError(
                f"{self.entry.id!r} has no chat template; use /v1/completions with a prompt",
                param="model",
            )
        messages = [
            {"role": _ROLE_FOR_TEMPLATE.get(m.role, m.role), "content": m.content}
            for m in request.messages or []
        ]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return ids, text

    @torch.no_grad()  # not inference_mode: transformers' caches mutate tensors in place
    def generate(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        emit: Callable[[GenerationEvent], None],
        cancelled: threading.Event,
    ) -> Usage:
        """Decode `params.n` choices of one prompt as one batch (no padding: same prompt),
        emitting text deltas as they become final. Returns the usage."""
        n = params.n
        device = self.context.device
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        choices = [_ChoiceState(IncrementalDetokenizer(self.tokenizer)) for _ in range(n)]
        stops = StopStringMatcher(params.stop)
        penalize = bool(params.presence_penalty or params.frequency_penalty)
        counts = torch.zeros((n, self.vocab_size), device=device) if penalize else None

        input_ids = torch.tensor([prompt.ids] * n, device=device)
        cache = DynamicCache()
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        for step in range(prompt.max_tokens):
            if cancelled.is_set():
                break
            logits = out.logits[:, -1, :].float()
            if counts is not None:
                apply_penalties(logits, counts, params)
            next_tokens = sample_next(logits, params, generator)
            if counts is not None:
                counts[torch.arange(n, device=device), next_tokens] += 1
            last_step = step == prompt.max_tokens - 1
            for index, (state, token) in enumerate(zip(choices, next_tokens.tolist(), strict=True)):
                if state.finish_reason is None:
                    self._advance(index, state, token, stops, params, last_step, emit)
            if all(state.finish_reason for state in choices):
                break
            out = self.model(input_ids=next_tokens[:, None], past_key_values=cache,
                             use_cache=True)
        completion_tokens = sum(state.completion_tokens for state in choices)
        return Usage(prompt_tokens=len(prompt.ids), completion_tokens=completion_tokens)

    def _advance(
        self,
        index: int,
        state: _ChoiceState,
        token: int,
        stops: StopStringMatcher,
        params: SamplingParams,
        last_step: bool,
        emit: Callable[[GenerationEvent], None],
    ) -> None:
        state.completion_tokens += 1
        if token in self.eos_ids and not params.ignore_eos:
            state.finish_reason = "stop"
        else:
            before = len(state.text)
            state.text += state.detok.add(token)
            cut = stops.find(state.text, before)
            if cut >= 0:
                state.text = state.text[:cut]
                state.finish_reason = "stop"
            elif last_step:
                state.finish_reason = "length"
        safe = len(state.text) if state.finish_reason else stops.safe_length(state.text)
        if safe > state.emitted:
            emit(TextDelta(index, state.text[state.emitted:safe]))
            state.emitted = safe
        if state.finish_reason:
            emit(ChoiceFinished(index, state.finish_reason))

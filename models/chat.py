"""Chat and text completion on transformers causal LMs: tokenizing and limit checks, plus the
batched prefill / decode / sampling primitives that engine.scheduler.ChatScheduler drives, so
the engine owns batching, sampling, stop strings, streaming and cancellation."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
)
from models.base import ModelAdapter, thread_safe_encoder
from models.chat_batching import KVBlock, positions_from_mask
from models.decoding import (
    IncrementalDetokenizer,
    StopStringMatcher,
    apply_penalties,
    sample_rows,
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
    # Processor outputs besides the ids (pixel values, image grid sizes, ...) of a prompt with
    # images; such a prompt is prefilled alone by `prefill_vision` (models/vision.py).
    vision_inputs: dict[str, Any] | None = None


@dataclass
class SequenceState:
    """One choice being generated: its sampling state, text so far and what was streamed."""

    index: int
    params: SamplingParams
    max_tokens: int
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # tokens generated so far, for penalties
    text: str = ""
    emitted: int = 0
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0 and self.counts is None


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
        self._adopt(model)

    def _adopt(self, model: Any) -> None:
        """Move the loaded model to its device and read its limits and special tokens."""
        self.model = model.to(self.context.device).eval()
        config = self.model.config.get_text_config()  # the language model's, for multimodal ones
        self.context_length = int(
            self.entry.limits.context_length
            or getattr(config, "max_position_embeddings", None)
            or self.tokenizer.model_max_length
        )
        self.vocab_size = int(config.vocab_size)
        self._encoder = thread_safe_encoder(self.tokenizer)
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
        block, logits = self.prefill([self._encoder.encode("Hi").ids])
        self.decode(block.to_cache(), block.mask, logits.argmax(dim=-1))

    # -- requests ----------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """Tokenize and check limits. Raises a 400-class error for anything the caller got wrong."""
        if request.messages is not None:
            ids, text = self._chat_prompt(request)
            param = "messages"
        elif isinstance(request.prompt, str):
            text = request.prompt
            ids = self._encoder.encode(text, add_special_tokens=True).ids
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
        return self._checked(ids, text, request, param)

    def _checked(
        self, ids: list[int], text: str, request: GenerationRequest, param: str
    ) -> PreparedPrompt:
        """The prompt, if it and max_tokens fit the context (nothing is truncated silently)."""
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
        ids = self._encoder.encode(text, add_special_tokens=False).ids
        return ids, text

    # -- batched decoding primitives, driven by engine.scheduler.ChatScheduler ---------------
    # torch.no_grad, not inference_mode: transformers' caches mutate tensors in place.

    def new_sequences(self, prompt: PreparedPrompt, params: SamplingParams) -> list[SequenceState]:
        """The `n` choices of one request. Choice i samples from seed + i, so a seeded request
        is reproducible and its choices still differ."""
        sequences = []
        for index in range(params.n):
            generator = None
            if params.seed is not None and params.temperature > 0:
                generator = torch.Generator(device=self.context.device)
                generator.manual_seed(params.seed + index)
            counts = None
            if params.presence_penalty or params.frequency_penalty:
                counts = torch.zeros(self.vocab_size, device=self.context.device)
            sequences.append(SequenceState(
                index=index, params=params, max_tokens=prompt.max_tokens,
                detok=IncrementalDetokenizer(self.tokenizer), stops=StopStringMatcher(params.stop),
                generator=generator, counts=counts,
            ))
        return sequences

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> tuple[KVBlock, torch.Tensor]:
        """One forward over several prompts, left-padded to the longest. Returns their KV rows
        and the logits of each prompt's last token."""
        device = self.context.device
        width = max(len(ids) for ids in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[row, width - len(prompt):] = 1
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return KVBlock.from_cache(cache, mask), out.logits[:, -1, :].float()

    def prefill_vision(self, prompt: PreparedPrompt) -> tuple[KVBlock, torch.Tensor, int]:
        """Prefill one prompt with images: models.vision.VisionChat. Text models get none."""
        raise NotImplementedError(f"{self.entry.id!r} cannot see images")

    @torch.no_grad()
    def prefill_chunk(self, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
        """Extend one prompt's cache by a chunk (long prompts prefill across scheduler steps,
        so running streams keep flowing). Returns the chunk's last logits."""
        tokens = torch.tensor([ids], device=self.context.device)
        out = self.model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def decode(
        self, cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every row of a left-padded batch. Returns (logits, the grown mask).
        `offsets` shifts rows' positions (rows whose prompt had images, on mRoPE models)."""
        positions = mask.sum(dim=1, keepdim=True)  # each row's real length = its next position
        if offsets is not None:
            positions = positions + offsets[:, None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float(), mask

    def choose_tokens(self, logits: torch.Tensor, sequences: list[SequenceState]) -> list[int]:
        """Next token per row: plain greedy rows in one argmax; rows with penalties or a
        temperature from their own (penalized) logits, the sampled ones in one batched draw
        with their own parameters and generators."""
        chosen = logits.argmax(dim=-1).tolist()
        special = [row for row, seq in enumerate(sequences) if not seq.greedy]
        if not special:
            return chosen
        part = logits.index_select(0, torch.tensor(special, device=logits.device))
        sampled: list[int] = []  # positions in `part`
        for position, row in enumerate(special):
            seq = sequences[row]
            if seq.counts is not None:
                apply_penalties(part[position:position + 1], seq.counts[None], seq.params)
            if seq.params.temperature > 0:
                sampled.append(position)
            else:
                chosen[row] = int(part[position].argmax())
        if sampled:
            rows = [special[position] for position in sampled]
            picks = sample_rows(
                part[sampled], [sequences[row].params for row in rows],
                [sequences[row].generator for row in rows],
            )
            for row, token in zip(rows, picks.tolist(), strict=True):
                chosen[row] = token
        return chosen

    def advance(
        self, seq: SequenceState, token: int, emit: Callable[[GenerationEvent], None]
    ) -> None:
        """Account one generated token: decide whether the choice is finished (eos, a stop
        string, max_tokens) and emit the text that is now final."""
        seq.completion_tokens += 1
        if seq.counts is not None:
            seq.counts[token] += 1
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
        else:
            before = len(seq.text)
            seq.text += seq.detok.add(token)
            cut = seq.stops.find(seq.text, before)
            if cut >= 0:
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
            elif seq.completion_tokens >= seq.max_tokens:
                seq.finish_reason = "length"
        safe = len(seq.text) if seq.finish_reason else seq.stops.safe_length(seq.text)
        if safe > seq.emitted:
            emit(TextDelta(seq.index, seq.text[seq.emitted:safe]))
            seq.emitted = safe
        if seq.finish_reason:
            emit(ChoiceFinished(seq.index, seq.finish_reason))

"""Chat and text completion on transformers causal LMs: the `ChatBackend` (engine/contracts/
chat.py) behind engine.generation.scheduler.ChatScheduler. It renders and tokenizes prompts and
runs each step's prefill and decode forwards over one left-padded KV cache shared by every
running sequence; the core owns everything else (sampling, stop strings, streaming, limits).
Runs on CPU and CUDA."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from engine.contracts.chat import ChatMessage, PrefillChunk, PromptInput, StepPlan, ToolSpec
from engine.contracts.chat_templates import detect_format, template_turns, tool_schemas
from engine.core.errors import ModelLoadError, UnsupportedFeatureError
from engine.core.sources import assemble, file_fingerprint
from models.base import ChatAdapter, thread_safe_encoder
from models.chat_batching import KVBlock, concat_blocks, positions_from_mask, select_rows

log = logging.getLogger(__name__)



@dataclass
class _Rows:
    """The running batch: one left-padded KV cache whose row i is sequence ids[i]; offsets
    shift a row's positions (prompts with images, on mRoPE models)."""

    block: KVBlock
    ids: list[int]
    offsets: list[int]


class TransformersChat(ChatAdapter):
    """A `ChatBackend`: any `AutoModelForCausalLM` checkpoint (safetensors dir, HF id, or a
    GGUF file that is de-quantized once into the model cache). Options: `ChatOptions`
    (engine/contracts/chat.py; the llama.cpp ones are for an entry llama.cpp may serve)."""


    def load(self) -> None:
        path = str(assemble(self.entry, self.context.models_dir))  # parts joined, if any
        if self.entry.gguf_file:
            path = str(self._dequantized_checkpoint(Path(path), self.entry.gguf_file))
        remote = self.entry.trust_remote_code
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.context.dtype, trust_remote_code=remote, use_safetensors=True
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
        self.eos_ids = frozenset(self._eos_token_ids())
        # A left-padded cache grows as needed: the KV budget and batch size are the engine's
        # scheduling limits, not hard ones.
        self.kv_capacity = self.context.kv_cache_tokens
        self.max_sequences = 1 << 16
        self._rows: _Rows | None = None
        self._chunked: dict[int, DynamicCache] = {}  # prompts prefilling across steps

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
        ids = self.tokenize("Hi")
        self.execute(StepPlan(prefill=[PrefillChunk(-1, ids, 0, True)]))
        self.release(-1)

    def generation_defaults(self) -> dict[str, Any]:
        """The sampling values the checkpoint's generation_config.json sets (when it asks to
        sample at all: a `do_sample: false` config means greedy)."""
        config = self.model.generation_config
        if not getattr(config, "do_sample", False):
            return {}
        values = {
            "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
            "min_p": config.min_p, "repetition_penalty": config.repetition_penalty,
        }
        explicit = config.to_diff_dict()  # only what the file sets, not library defaults
        return {k: v for k, v in values.items() if k in explicit and v is not None}

    # -- prompts -----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[ChatMessage],
                    tools: Sequence[ToolSpec] = ()) -> PromptInput:
        if not self.tokenizer.chat_template:
            raise UnsupportedFeatureError(
                f"{self.entry.id!r} has no chat template; use /v1/completions with a prompt",
                param="model",
            )
        fmt = detect_format(self.chat_template())
        turns = template_turns(messages, tools, fmt)
        text = self.tokenizer.apply_chat_template(
            turns, tools=tool_schemas(tools) if tools and fmt.native else None,
            add_generation_prompt=True, tokenize=False)
        return PromptInput(self._encoder.encode(text, add_special_tokens=False).ids, text)

    def chat_template(self) -> str | None:
        template = self.tokenizer.chat_template
        return template if isinstance(template, str) else None

    def grammar_tokenizer(self) -> Any:
        import llguidance.hf  # with structured output only

        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                            eos_token=sorted(self.eos_ids))

    def tokenize(self, text: str) -> list[int]:
        return list(self._encoder.encode(text, add_special_tokens=True).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # -- the ChatBackend step, driven by engine.generation.scheduler.ChatScheduler -----------
    # torch.no_grad, not inference_mode: transformers' caches mutate tensors in place.

    def live_sequences(self) -> set[int]:
        running = set(self._rows.ids) if self._rows else set()
        return running | set(self._chunked)

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> np.ndarray:
        """Prompts prefill (whole short ones in one left-padded forward, chunked ones on their
        own cache), then one decode forward over the running rows; new rows join after it."""
        logits: dict[int, torch.Tensor] = {}
        joining: list[tuple[KVBlock, list[int], list[int]]] = []
        whole = [c for c in plan.prefill if c.start == 0 and c.last and c.extras is None]
        if whole:
            block, rows = self._prefill([c.tokens for c in whole])
            joining.append((block, [c.seq_id for c in whole], [0] * len(whole)))
            logits.update({c.seq_id: rows[i] for i, c in enumerate(whole)})
        for chunk in plan.prefill:
            if chunk.extras is not None:
                block, row, offset = self.prefill_vision(chunk.tokens, chunk.extras)
                joining.append((block, [chunk.seq_id], [offset]))
                logits[chunk.seq_id] = row
            elif not (chunk.start == 0 and chunk.last):
                cache = self._chunked.setdefault(chunk.seq_id, DynamicCache())
                row = self._prefill_chunk(cache, chunk.tokens)
                if chunk.last:
                    del self._chunked[chunk.seq_id]
                    mask = torch.ones((1, chunk.start + len(chunk.tokens)), dtype=torch.long,
                                      device=row.device)
                    joining.append((KVBlock.from_cache(cache, mask), [chunk.seq_id], [0]))
                    logits[chunk.seq_id] = row
        if plan.decode:
            logits.update(self._decode(plan))
        for block, ids, offsets in joining:
            self._join(block, ids, offsets)
        rows = [logits[seq_id] for seq_id in plan.logit_seq_ids()]
        if not rows:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        return torch.stack(rows).float().cpu().numpy()

    def _prefill(self, prompts: list[list[int]]) -> tuple[KVBlock, torch.Tensor]:
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
                         cache=cache, use_cache=True, logits_to_keep=1)
        return KVBlock.from_cache(cache, mask), out.logits[:, -1, :]

    def prefill_vision(
        self, ids: list[int], extras: dict[str, Any]
    ) -> tuple[KVBlock, torch.Tensor, int]:
        """Prefill one prompt with images: models.vision.VisionChat. Text models get none."""
        raise UnsupportedFeatureError(f"{self.entry.id!r} cannot see images", param="messages")

    def _prefill_chunk(self, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
        """Extend one prompt's own cache by a chunk; the chunk's last logits."""
        tokens = torch.tensor([ids], device=self.context.device)
        out = self.model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1, :]

    def _decode(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """One token for every running row (the core decodes every running sequence each
        step); the logits by sequence."""
        rows = self._rows
        tokens_by_id = {d.seq_id: d.token for d in plan.decode}
        if rows is None or set(tokens_by_id) != set(rows.ids):
            raise RuntimeError("a decode step must cover exactly the running sequences")
        device = rows.block.mask.device
        tokens = torch.tensor([tokens_by_id[seq_id] for seq_id in rows.ids], device=device)
        cache, mask = rows.block.to_cache(), rows.block.mask
        positions = mask.sum(dim=1, keepdim=True)  # each row's real length = its next position
        if any(rows.offsets):
            positions = positions + torch.tensor(rows.offsets, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True)
        rows.block = KVBlock.from_cache(cache, mask)
        logits = out.logits[:, -1, :]
        return {seq_id: logits[i] for i, seq_id in enumerate(rows.ids)}

    def _join(self, block: KVBlock, ids: list[int], offsets: list[int]) -> None:
        if self._rows is None:
            self._rows = _Rows(block, list(ids), list(offsets))
            return
        self._rows.block = concat_blocks(self._rows.block, block)
        self._rows.ids += ids
        self._rows.offsets += offsets

    def fork(self, parent: int, children: Sequence[int]) -> None:
        rows = self._rows
        if rows is None or parent not in rows.ids:
            raise RuntimeError(f"sequence {parent} is not running")
        row = rows.ids.index(parent)
        copies = select_rows(rows.block, [row] * len(children))
        self._join(copies, list(children), [rows.offsets[row]] * len(children))

    def release(self, seq_id: int) -> None:
        self._chunked.pop(seq_id, None)
        rows = self._rows
        if rows is None or seq_id not in rows.ids:
            return
        keep = [i for i, other in enumerate(rows.ids) if other != seq_id]
        if not keep:
            self._rows = None
            return
        rows.block = select_rows(rows.block, keep)
        rows.ids = [rows.ids[i] for i in keep]
        rows.offsets = [rows.offsets[i] for i in keep]

"""Chat and text completion on llama.cpp: the `ChatBackend` (engine/contracts/chat.py) over a
GGUF file's own quantized weights, through llama-cpp-python's low-level ctypes API.

One llama context holds every running sequence, each in its own KV stream (a slot of
kv_cache_tokens / max_sequences cells; `options: {kv_unified: true}` pools them instead);
each step is one `llama_batch` with every prefill chunk and decode token, in one
`llama_decode`. The core owns sampling, stop strings and everything else, as with the
transformers backend.

Whether this build of llama.cpp runs at all on this CPU is decided before it is loaded, in a
child process (models/llamacpp_check.py): a native crash must never take the server down.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import llama_cpp
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.contracts.base import LoadContext
from engine.contracts.chat import ChatMessage, PrefillChunk, PromptInput, StepPlan, ToolSpec
from engine.contracts.chat_templates import detect_format, template_turns, tool_schemas
from engine.core.errors import InvalidRequestError, ModelLoadError, UnsupportedFeatureError
from engine.core.registry import ModelEntry
from engine.core.sources import gguf_path
from models.base import ChatAdapter

log = logging.getLogger(__name__)

# GGUF sampling metadata (general.sampling.*) -> SamplingParams field, and its type.
_SAMPLING_METADATA: dict[str, tuple[str, type]] = {
    "general.sampling.temp": ("temperature", float),
    "general.sampling.top_p": ("top_p", float),
    "general.sampling.top_k": ("top_k", int),
    "general.sampling.min_p": ("min_p", float),
    "general.sampling.penalty_repeat": ("repetition_penalty", float),
}

# A plan is at most the scheduler's prefill chunk (512 tokens by default) plus one decode
# token per sequence; a batch that size runs each step in a single llama_decode.
_PREFILL_TOKENS_PER_STEP = 512

# -- llama.cpp's own log -------------------------------------------------------------------
# llama.cpp prints hundreds of lines per load to stderr. Its warnings and errors go to our
# logger instead; the rest is dropped. The callback is global to the process.

_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5  # ggml.h enum ggml_log_level
_native_log_lock = threading.Lock()  # llama.cpp may log from several threads
_native_log_state: dict[str, Any] = {"level": 0, "pending": ""}
recent_native_errors: deque[str] = deque(maxlen=8)  # for error messages; cleared per call


def _emit_native_line(level: int, line: str) -> None:
    line = line.strip()
    if not line or level not in (_GGML_LOG_WARN, _GGML_LOG_ERROR):
        return
    if level == _GGML_LOG_ERROR:
        recent_native_errors.append(line)
        log.error("llama.cpp: %s", line)
    else:
        log.warning("llama.cpp: %s", line)


def _forward_native_log(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log callback: whole lines of warnings and errors to our logger. A message
    may come in pieces (level CONT continues the previous one)."""
    with _native_log_lock:
        state = _native_log_state
        if level != _GGML_LOG_CONT:  # a new message: the pending one is complete
            _emit_native_line(state["level"], state["pending"])
            state["level"], state["pending"] = level, ""
        if state["level"] not in (_GGML_LOG_WARN, _GGML_LOG_ERROR) or not text:
            return
        *lines, state["pending"] = (state["pending"]
                                    + text.decode("utf-8", errors="replace")).split("\n")
        for line in lines:
            _emit_native_line(state["level"], line)


# Referenced at module level: llama.cpp keeps only the raw pointer.
_NATIVE_LOG_CALLBACK = llama_cpp.llama_log_callback(_forward_native_log)
_init_lock = threading.Lock()
_initialized = False


def init_llama_cpp() -> None:
    """Once per process: the ggml backends, and llama.cpp's log routed to ours."""
    global _initialized
    with _init_lock:
        if not _initialized:
            llama_cpp.llama_log_set(_NATIVE_LOG_CALLBACK, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialized = True


def _native_error() -> str:
    """The first error llama.cpp logged since recent_native_errors was cleared: the cause
    ("invalid magic characters"), where the later ones only say "failed to load"."""
    return f": {recent_native_errors[0]}" if recent_native_errors else ""


def _usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_threads() -> int:
    """Every core but one: llama.cpp's threads meet at a barrier after each op, so one that
    shares its core with the HTTP server's event loop stalls them all (measured on 2 cores:
    2 threads under load fell to a fraction of 1 thread's speed)."""
    return max(1, _usable_cores() - 1)


def _raise_template_error(message: str) -> None:
    """Templates call raise_exception() for conversations they cannot render."""
    raise jinja2.exceptions.TemplateError(message)


def _to_json(value: Any, ensure_ascii: bool = False, indent: int | None = None,
             separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Templates' `tojson`, keeping non-ASCII text as it is (as transformers renders it)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled the way transformers compiles `tokenizer.chat_template`, so a
    GGUF renders the same prompt text on either backend."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _to_json
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class LlamaCppChat(ChatAdapter):
    """A `ChatBackend`: a chat model from a GGUF file, on llama.cpp. Sequence ids from the
    core are mapped onto llama.cpp's sequence slots 0 .. max_sequences - 1. Options:
    `ChatOptions` (engine/contracts/chat.py; `kv_unified`, `flash_attn`)."""


    def __init__(self, entry: ModelEntry, context: LoadContext):
        super().__init__(entry, context)
        self._ctx: Any = None
        self._vocab: Any = None
        self._mem: Any = None
        self._batch: llama_cpp.llama_batch | None = None
        # Tokenizing runs on request threads; the lock keeps it off a model being freed.
        self._vocab_lock = threading.Lock()
        self._slot_of: dict[int, int] = {}  # core sequence id -> llama seq slot
        self._free_slots: list[int] = []  # a heap
        self._template: jinja2.Template | None = None

    # -- loading -----------------------------------------------------------------------------

    def gguf_path(self) -> Path:
        path = gguf_path(self.entry, self.context.models_dir)
        return path if path is not None else Path(self.entry.source)

    def load(self) -> None:
        path = self.gguf_path()
        if not path.is_file() or path.suffix != ".gguf":
            raise ModelLoadError(f"{self.entry.id!r}: GGUF file {path} not found")
        flash_attention = self._flash_attention()
        self._kv_unified = self.options.kv_unified
        init_llama_cpp()
        threads = self.context.threads or default_threads()
        on_gpu = self.context.device.startswith("cuda")
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 999 if on_gpu else 0
        log.info("%s: loading %s on llama.cpp (%s, %d threads, %d KV cells, %d sequences)",
                 self.entry.id, path.name, "GPU" if on_gpu else "CPU", threads,
                 self.context.kv_cache_tokens, self.context.max_sequences)
        recent_native_errors.clear()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise ModelLoadError(
                f"{self.entry.id!r}: llama.cpp cannot load {path}{_native_error()}")
        self.model = model
        try:
            self._open_context(threads, flash_attention)
            self._read_vocab()
        except BaseException:
            self.unload()
            raise

    def _open_context(self, threads: int, flash_attention: int) -> None:
        params = llama_cpp.llama_context_default_params()
        sequences = max(1, min(self.context.max_sequences,
                               llama_cpp.llama_max_parallel_sequences()))
        cells = max(self.context.kv_cache_tokens, 256)
        params.n_ctx = cells
        params.n_seq_max = sequences
        params.n_batch = params.n_ubatch = min(cells, _PREFILL_TOKENS_PER_STEP + sequences)
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = False
        params.flash_attn_type = flash_attention
        # One KV stream per sequence (llama.cpp server's slots): a sequence's cells sit where
        # they would if it ran alone, so its attention sums round exactly as alone, and a
        # token attends over its own cells, not every sequence's. A unified pool rounds
        # differently as sequences interleave (greedy text then depends on the batch).
        params.kv_unified = self._kv_unified
        recent_native_errors.clear()
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise ModelLoadError(f"{self.entry.id!r}: llama.cpp cannot create a context of "
                                 f"{cells} KV cells{_native_error()}")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self.kv_capacity = int(llama_cpp.llama_n_ctx(ctx))
        self.max_sequences = int(llama_cpp.llama_n_seq_max(ctx))
        self._n_batch = int(llama_cpp.llama_n_batch(ctx))
        per_sequence = self.kv_capacity if self._kv_unified else (
            self.kv_capacity // self.max_sequences)
        self.context_length = int(min(
            self.entry.limits.context_length or llama_cpp.llama_model_n_ctx_train(self.model),
            per_sequence))
        self._free_slots = list(range(self.max_sequences))
        # One batch, reused every step; every token belongs to exactly one sequence.
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        batch = self._batch
        self._batch_tokens = np.ctypeslib.as_array(batch.token, shape=(self._n_batch,))
        self._batch_positions = np.ctypeslib.as_array(batch.pos, shape=(self._n_batch,))
        self._batch_wants_logits = np.ctypeslib.as_array(batch.logits, shape=(self._n_batch,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(self._n_batch,))[:] = 1
        self._batch_seq_ids = [batch.seq_id[i] for i in range(self._n_batch)]

    def _flash_attention(self) -> int:
        """`options: {flash_attn: auto | true | false}`, false by default: with it on (auto
        turns it on on the CPU too) a token's logits depend slightly on how its batch was cut
        (up to ~1 logit on SmolLM2), so greedy text would change with the traffic; off, every
        batching gives bit-identical logits, for a larger compute buffer."""
        modes = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                 True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                 False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
        return modes[self.options.flash_attn]

    def _read_vocab(self) -> None:
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._vocab = vocab
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        # Every end-of-generation token (EOS, EOT, <|im_end|>, ...): one pass over the
        # vocabulary at load (~50 ms for 50k tokens) beats guessing which ones are special.
        is_eog = llama_cpp.llama_vocab_is_eog
        self.eos_ids = frozenset(t for t in range(self.vocab_size) if is_eog(vocab, t))
        self._bos_text = self._special_text(int(llama_cpp.llama_vocab_bos(vocab)))
        self._eos_text = self._special_text(int(llama_cpp.llama_vocab_eos(vocab)))
        template = llama_cpp.llama_model_chat_template(self.model, None)
        self._template = None
        self._template_source = template.decode("utf-8", "replace") if template else None
        self._template_problem = "has no chat template"
        if template:
            try:
                self._template = compile_chat_template(template.decode("utf-8", "replace"))
            except jinja2.exceptions.TemplateError as exc:  # completions still work
                self._template_problem = f"has a chat template jinja2 cannot read ({exc})"
                log.warning("%s %s", self.entry.id, self._template_problem)

    def _special_text(self, token: int) -> str:
        if token == llama_cpp.LLAMA_TOKEN_NULL:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self._vocab, token)).decode(
            "utf-8", errors="replace")

    def warmup(self) -> None:
        ids = self.tokenize("Hi")
        self.execute(StepPlan(prefill=[PrefillChunk(-1, ids, 0, True)]))
        self.release(-1)

    def memory_bytes(self) -> int:
        """The weights' bytes (the KV cache is extra: kv_capacity cells)."""
        return int(llama_cpp.llama_model_size(self.model)) if self.model else 0

    def unload(self) -> None:
        with self._vocab_lock:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = self._mem = None
            if self.model:
                llama_cpp.llama_model_free(self.model)
            self._vocab = None
            self._slot_of.clear()
            super().unload()

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text (scalars only), or None."""
        size = 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, size)
            if length < 0:
                return None
            if length < size:
                return buffer.value.decode("utf-8", errors="replace")
            size = length + 1

    def generation_defaults(self) -> dict[str, Any]:
        """The sampling values a GGUF's general.sampling.* metadata sets (most set none)."""
        defaults: dict[str, Any] = {}
        for key, (name, kind) in _SAMPLING_METADATA.items():
            value = self.metadata(key)
            if value is None:
                continue
            try:
                defaults[name] = kind(float(value))
            except ValueError:
                log.warning("%s: ignoring GGUF %s = %r", self.entry.id, key, value)
        return defaults

    # -- prompts -----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[ChatMessage],
                    tools: Sequence[ToolSpec] = ()) -> PromptInput:
        if self._template is None:
            raise UnsupportedFeatureError(
                f"{self.entry.id!r} {self._template_problem}; use /v1/completions with a prompt",
                param="model",
            )
        fmt = detect_format(self._template_source)
        turns = template_turns(messages, tools, fmt)
        extra = {"tools": tool_schemas(tools)} if tools and fmt.native else {}
        try:
            text = self._template.render(messages=turns, add_generation_prompt=True,
                                         bos_token=self._bos_text, eos_token=self._eos_text,
                                         **extra)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(f"{self.entry.id!r} cannot take these messages: {exc}",
                                      param="messages") from exc
        # The template writes BOS itself where the model wants one.
        return PromptInput(self._tokenize(text, add_special=False, parse_special=True), text)

    def chat_template(self) -> str | None:
        return self._template_source

    def grammar_tokenizer(self) -> Any:
        from llguidance.llamacpp import lltokenizer_from_vocab  # structured output only

        with self._vocab_lock:
            if self._vocab is None:
                raise RuntimeError(f"{self.entry.id!r} is not loaded")
            return lltokenizer_from_vocab(self._vocab, n_vocab=self.vocab_size,
                                          eos_token=sorted(self.eos_ids))

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text, add_special=True, parse_special=False)

    def _tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        with self._vocab_lock:
            if self._vocab is None:
                raise RuntimeError(f"{self.entry.id!r} is not loaded")
            while True:
                ids = (llama_cpp.llama_token * capacity)()
                count = llama_cpp.llama_tokenize(self._vocab, data, len(data), ids, capacity,
                                                 add_special, parse_special)
                if count >= 0:
                    return list(ids[:count])
                capacity = -count  # too small: llama.cpp says how many it needs

    def detokenize(self, ids: Sequence[int]) -> str:
        # llama.cpp aborts the process on a token id outside its vocabulary.
        if any(not 0 <= token < self.vocab_size for token in ids):
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})",
                                      param="prompt")
        pieces = bytearray()
        buffer = ctypes.create_string_buffer(64)
        with self._vocab_lock:
            if self._vocab is None:
                raise RuntimeError(f"{self.entry.id!r} is not loaded")
            for token in ids:
                # special=False renders control tokens (BOS, <|im_end|>) as nothing.
                length = llama_cpp.llama_token_to_piece(self._vocab, token, buffer,
                                                        len(buffer), 0, False)
                if length < 0:
                    buffer = ctypes.create_string_buffer(-length)
                    length = llama_cpp.llama_token_to_piece(self._vocab, token, buffer,
                                                            len(buffer), 0, False)
                pieces += buffer.raw[:length]
        return pieces.decode("utf-8", errors="replace")

    # -- the ChatBackend step, on the compute thread -----------------------------------------

    def live_sequences(self) -> set[int]:
        return set(self._slot_of)

    def kv_tokens_used(self, seq_id: int) -> int:
        """KV positions a sequence holds (0 once released)."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            return 0
        return int(llama_cpp.llama_memory_seq_pos_max(self._mem, slot)) + 1

    def _new_slot(self, seq_id: int) -> int:
        """A fresh, empty llama slot for `seq_id` (emptied if the id held one already)."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            if not self._free_slots:
                raise RuntimeError(f"{self.entry.id!r}: all {self.max_sequences} llama.cpp "
                                   "sequence slots are in use")
            slot = heapq.heappop(self._free_slots)  # the lowest: reuse stays predictable
            self._slot_of[seq_id] = slot
        llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
        return slot

    def _slot(self, seq_id: int) -> int:
        try:
            return self._slot_of[seq_id]
        except KeyError:
            raise RuntimeError(f"{self.entry.id!r}: sequence {seq_id} was never "
                               "prefilled") from None

    def execute(self, plan: StepPlan) -> np.ndarray:
        """Every prefill chunk and decode token in one batch, ordered by slot; logits rows in
        plan.logit_seq_ids() order.

        With one KV stream per sequence, llama.cpp cuts a batch into micro-batches of
        consecutive slots holding equal token counts, so a batch in slot order over dense
        slots (see release) decodes every sequence's next token in one micro-batch; in plan
        order, or over gapped slots, it would run one micro-batch per run of slots."""
        entries: list[tuple[int, list[int], int, bool]] = []  # slot, tokens, start, logits
        for chunk in plan.prefill:
            if chunk.extras is not None:
                raise UnsupportedFeatureError(
                    f"{self.entry.id!r} on llama.cpp takes text prompts only", param="messages")
            if not chunk.tokens:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            if min(chunk.tokens) < 0 or max(chunk.tokens) >= self.vocab_size:
                raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})",
                                          param="prompt")
            slot = self._new_slot(chunk.seq_id) if chunk.start == 0 else self._slot(chunk.seq_id)
            entries.append((slot, chunk.tokens, chunk.start, chunk.last))
        for step in plan.decode:
            entries.append((self._slot(step.seq_id), [step.token], step.position, True))
        # Rows come back in batch order; plan_row[k] is the plan's row of the k-th of them.
        plan_rows = np.cumsum([wants for *_, wants in entries]) - 1
        in_batch_order = sorted(range(len(entries)), key=lambda index: entries[index][0])
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        wants_logits: list[bool] = []
        plan_row: list[int] = []
        for index in in_batch_order:
            slot, chunk_tokens, start, wants = entries[index]
            count = len(chunk_tokens)
            tokens += chunk_tokens
            positions += range(start, start + count)
            slots += [slot] * count
            wants_logits += [False] * (count - 1) + [wants]
            if wants:
                plan_row.append(int(plan_rows[index]))
        rows = [self._decode(tokens[i:i + self._n_batch], positions[i:i + self._n_batch],
                             slots[i:i + self._n_batch], wants_logits[i:i + self._n_batch])
                for i in range(0, len(tokens), self._n_batch)]
        if not rows:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        in_batch = rows[0] if len(rows) == 1 else np.concatenate(rows)
        logits = np.empty_like(in_batch)
        logits[plan_row] = in_batch
        return logits

    def _decode(self, tokens: list[int], positions: list[int], slots: list[int],
                wants_logits: list[bool]) -> np.ndarray:
        """One llama_decode of at most n_batch tokens; a copy of the logits it returns."""
        batch = self._batch
        assert batch is not None, "not loaded"
        count = len(tokens)
        self._batch_tokens[:count] = tokens
        self._batch_positions[:count] = positions
        self._batch_wants_logits[:count] = wants_logits
        for row, slot in zip(self._batch_seq_ids, slots, strict=False):
            row[0] = slot
        batch.n_tokens = count
        recent_native_errors.clear()
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            why = "no free KV cells for the batch" if status == 1 else "llama.cpp"
            raise RuntimeError(f"llama_decode failed with code {status} ({why}"
                               f"{_native_error()})")
        outputs = sum(wants_logits)
        if not outputs:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        logits = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(logits, shape=(outputs, self.vocab_size)).copy()

    def fork(self, parent: int, children: Sequence[int]) -> None:
        source = self._slot(parent)
        for child in children:
            llama_cpp.llama_memory_seq_cp(self._mem, source, self._new_slot(child), -1, -1)

    def release(self, seq_id: int) -> None:
        """Frees the sequence's slot and, with one KV stream per sequence, keeps the live
        slots dense (0 .. n-1) by moving the highest one into the gap: a gap would split
        every later step into two micro-batches (see execute). The move copies one stream's
        buffers (context_length cells) once, where a gap costs every step after it."""
        slot = self._slot_of.pop(seq_id, None)
        if slot is None:
            return
        llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
        highest = max(self._slot_of.items(), key=lambda item: item[1], default=None)
        if not self._kv_unified and highest is not None and highest[1] > slot:
            moved, source = highest
            llama_cpp.llama_memory_seq_cp(self._mem, source, slot, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._mem, source, -1, -1)
            self._slot_of[moved] = slot
            slot = source
        heapq.heappush(self._free_slots, slot)

"""The contract between the generation core (engine/scheduler.py) and a chat backend.

The core owns sequences: admission, the KV budget, `n`, sampling, stop strings, detokenizing,
usage, cancellation. A backend owns the weights and the KV cache, and knows nothing of
requests: it renders and tokenizes prompts, runs one step over a set of sequences (prompt
chunks to prefill, one token each to decode) and returns a logits row for each sequence that
needs its next token, forks a prompt's cache for `n` choices, and releases sequences.

Nothing here imports torch: logits cross the seam as float32 numpy rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine.types import ChatMessage, ToolSpec


@dataclass
class PromptInput:
    """A prompt as the backend tokenized it. `extras` is backend-private (a vision prompt's
    pixel tensors); a prompt with extras is prefilled whole, alone, in one step."""

    ids: list[int]
    text: str
    extras: dict[str, Any] | None = None


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens of one sequence, at positions start .. start + len(tokens) - 1.
    `last`: the prompt's final chunk; the logits of its last token are returned."""

    seq_id: int
    tokens: list[int]
    start: int
    last: bool
    extras: dict[str, Any] | None = None


@dataclass(frozen=True)
class DecodeToken:
    """The newest token of a running sequence, at `position` (its length before it)."""

    seq_id: int
    token: int
    position: int


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[DecodeToken] = field(default_factory=list)

    def logit_seq_ids(self) -> list[int]:
        """The sequences whose logits `execute` returns, in its rows' order: final prefill
        chunks first, then decoded tokens."""
        return [c.seq_id for c in self.prefill if c.last] + [d.seq_id for d in self.decode]

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


@runtime_checkable
class ChatBackend(Protocol):
    """What the core needs from a model. Attributes are read after `load`."""

    context_length: int  # longest sequence (prompt + completion) one sequence may have
    vocab_size: int  # width of a logits row
    eos_ids: frozenset[int]
    kv_capacity: int  # KV tokens the backend holds, summed over every sequence
    max_sequences: int  # sequences it can hold at once

    def render_chat(self, messages: Sequence[ChatMessage],
                    tools: Sequence[ToolSpec] = ()) -> PromptInput:
        """The chat template applied (generation prompt added) and tokenized, with `tools`
        in the template's own tool format (engine/tool_calls.py: template_turns). Raises
        UnsupportedFeatureError when the model has no template, InvalidRequestError for
        inputs it cannot take."""
        ...

    def chat_template(self) -> str | None:
        """The chat template's source (it says which tool-call format the model speaks)."""
        ...

    def grammar_tokenizer(self) -> Any:
        """An llguidance.LLTokenizer over this vocabulary, `vocab_size` wide, for the core's
        output grammars. Built once per model (about a second); raises
        UnsupportedFeatureError where the backend cannot give one."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """A completion prompt's ids (special tokens as the model adds them)."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped. May end in U+FFFD on a partial character."""
        ...

    def execute(self, plan: StepPlan) -> np.ndarray:
        """Run one step; float32 logits of shape (len(plan.logit_seq_ids()), vocab_size).
        A sequence first appears as a PrefillChunk with start 0; decoded tokens extend it."""
        ...

    def fork(self, parent: int, children: Sequence[int]) -> None:
        """After `parent`'s last prefill chunk: each child starts with a copy of its cache."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget a sequence (finished, cancelled or failed) and free its KV. An id it does
        not hold (cancelled before its first chunk) is a no-op."""
        ...

    def live_sequences(self) -> set[int]:
        """Sequences holding KV now (nothing is left once every request is done)."""
        ...

    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults the checkpoint ships (generation_config.json), by
        SamplingParams field name; {} when it has none."""
        ...

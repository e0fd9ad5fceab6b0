"""Pure pieces of the decode loop: sampling, penalties, incremental detokenization and stop
strings. Kept free of model code so they are unit-tested directly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.types import SamplingParams


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> None:
    """OpenAI's presence/frequency penalties over tokens generated so far, in place.
    `counts` is (batch, vocab) of how often each token was generated."""
    if params.frequency_penalty:
        logits -= params.frequency_penalty * counts
    if params.presence_penalty:
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of (batch, vocab) float logits, every row sampled with `params`."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    rows = logits.shape[0]
    return sample_rows(logits, [params] * rows, [generator] * rows)


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row, each row with its own temperature, top-k, top-p and generator, in
    a few batched ops: temperature → top-k → top-p (nucleus) → inverse-CDF sampling. Each row
    draws its one uniform number from its own generator, so a seeded row is reproducible
    whatever shares its batch. (torch.multinomial and exponential_ cost ~1 ms per 49k-token
    row on CPU; cumsum + searchsorted cost that for the whole batch.) Rows must have
    temperature > 0."""
    vocab = logits.shape[-1]
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temperatures[:, None]
    for row, p in enumerate(params):  # rare: row by row
        if 0 < p.top_k < vocab:
            kth = torch.topk(logits[row], p.top_k).values[-1]
            logits[row] = logits[row].masked_fill(logits[row] < kth, float("-inf"))
    nucleus = [row for row, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        index = torch.tensor(nucleus, device=logits.device)
        top_p = torch.tensor([params[row].top_p for row in nucleus], device=logits.device)
        part = logits.index_select(0, index)
        sorted_logits, order = torch.sort(part, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits.index_copy_(0, index, part.masked_fill(drop, float("-inf")))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    uniform = torch.rand(len(params), device=logits.device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(1, generator=generator, device=logits.device)[0]
    # (0, total]: never 0, so a zero-probability first token cannot be picked.
    targets = (1 - uniform)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, targets).squeeze(-1).clamp(max=vocab - 1)


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without re-decoding everything and without
    ever splitting a multi-byte character (a partial UTF-8 sequence decodes to U+FFFD, which
    is held back until the next token completes it)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self._tokenizer.decode(tokens, skip_special_tokens=self._skip))

    def add(self, token: int) -> str:
        self.tokens.append(token)
        # Decode a short window so tokenizers that merge spaces across tokens stay right.
        prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        full = self._decode(self.tokens[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.tokens)
            return full[len(prefix):]
        return ""


class StopStringMatcher:
    """Finds stop strings in generated text and says how much text is safe to stream: text that
    could be the start of a stop string is held back until it is decided."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_from: int) -> int:
        """Index of the earliest stop string that overlaps text[new_from:], or -1."""
        if not self.stops:
            return -1
        start = max(0, new_from - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def safe_length(self, text: str) -> int:
        """How much of text can be emitted: all of it minus a suffix that is a proper prefix of
        some stop string."""
        for keep in range(min(self._longest - 1, len(text)), 0, -1):
            suffix = text[-keep:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return len(text) - keep
        return len(text)

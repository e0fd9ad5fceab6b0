"""Choosing each sequence's next token from its logits row: penalties, temperature, top-k,
top-p, min-p and a seeded draw, per row, on any backend's float32 numpy logits.

Greedy rows share one argmax. A sampled row works on its few hundred most likely tokens
(argpartition is ~10x cheaper than sorting a 50k-token vocabulary) and falls back to the full
row only when those do not hold the top-p mass, so the result is exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.contracts.chat import Sampling

# Candidates a sampled row starts from; top-p falls back to the whole row when they hold
# less than its mass.
CANDIDATES = 256
SEED_MASK = 2**64 - 1


class SamplerState:
    """One sequence's sampling state: its settings, its random stream (seeded: reproducible
    whatever else shares the batch) and, for penalties, what it has generated and seen."""

    def __init__(self, sampling: Sampling, vocab_size: int, prompt: Sequence[int], index: int):
        self.sampling = sampling
        seed = None if sampling.seed is None else (sampling.seed + index) & SEED_MASK
        self.rng = np.random.default_rng(seed)
        self.counts: np.ndarray | None = None  # generated tokens, for presence/frequency
        self.seen: np.ndarray | None = None  # prompt + generated, for repetition_penalty
        if sampling.presence_penalty or sampling.frequency_penalty:
            self.counts = np.zeros(vocab_size, dtype=np.float32)
        if sampling.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            ids = np.asarray(prompt, dtype=np.int64)
            self.seen[ids[(ids >= 0) & (ids < vocab_size)]] = True

    def record(self, token: int) -> None:
        if self.counts is not None and 0 <= token < len(self.counts):
            self.counts[token] += 1
        if self.seen is not None and 0 <= token < len(self.seen):
            self.seen[token] = True


def apply_penalties(row: np.ndarray, state: SamplerState) -> np.ndarray:
    """A penalized copy of one logits row: HF's repetition penalty over the prompt and the
    output, then OpenAI's presence/frequency penalties over the output."""
    sampling = state.sampling
    row = row.copy()
    if state.seen is not None:
        penalty = sampling.repetition_penalty
        seen = row[state.seen]
        row[state.seen] = np.where(seen > 0, seen / penalty, seen * penalty)
    if state.counts is not None:
        row -= sampling.frequency_penalty * state.counts
        row -= sampling.presence_penalty * (state.counts > 0)
    return row


def _sample_row(row: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One draw from a row with temperature > 0: temperature → top-k → top-p → min-p."""
    logits = row.astype(np.float64) / sampling.temperature
    vocab = len(logits)
    top_k = sampling.top_k if 0 < sampling.top_k < vocab else 0
    candidates = np.argpartition(logits, -(top_k or min(CANDIDATES, vocab)))
    candidates = candidates[-(top_k or min(CANDIDATES, vocab)):]
    peak = logits[candidates].max()
    weights = np.exp(logits[candidates] - peak)
    # top-k renormalizes over its k tokens; otherwise probabilities are over the whole row.
    total = weights.sum() if top_k else np.exp(logits - peak).sum()
    if not top_k and _needs_whole_row(weights, total, sampling):
        candidates = np.arange(vocab)
        weights = np.exp(logits - peak)
    order = np.argsort(-weights, kind="stable")
    candidates, weights = candidates[order], weights[order]
    probs = weights / total
    keep = len(probs)
    if sampling.top_p < 1.0:
        # Keep a token while the mass before it is below top_p; the first always stays.
        before = np.cumsum(probs) - probs
        keep = max(1, int(np.count_nonzero(before < sampling.top_p)))
    if sampling.min_p > 0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= sampling.min_p * probs[0]))))
    cdf = np.cumsum(weights[:keep])
    target = (1.0 - rng.random()) * cdf[-1]  # in (0, total]: a zero-weight token never wins
    return int(candidates[min(int(np.searchsorted(cdf, target)), keep - 1)])


def _needs_whole_row(weights: np.ndarray, total: float, sampling: Sampling) -> bool:
    """Whether tokens outside the candidates could still be drawn."""
    if sampling.top_p < 1.0:
        return bool(weights.sum() / total < sampling.top_p)
    if sampling.min_p > 0:  # the weakest candidate still qualifies: so might others
        return bool(weights.min() >= sampling.min_p * weights.max())
    return True


def choose_tokens(logits: np.ndarray, states: Sequence[SamplerState]) -> list[int]:
    """The next token of each row (rows and states in the same order)."""
    chosen = logits.argmax(axis=1).tolist()
    for row, state in enumerate(states):
        sampling = state.sampling
        if sampling.greedy:
            continue
        values = apply_penalties(logits[row], state) if sampling.penalized else logits[row]
        if sampling.temperature == 0:
            chosen[row] = int(values.argmax())
        else:
            chosen[row] = _sample_row(values, sampling, state.rng)
    return chosen

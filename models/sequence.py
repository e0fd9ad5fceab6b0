"""Tokenized inputs for encoder classifiers (cross-encoder rerankers, moderation classifiers):
encoded on the request path with a thread-safe tokenizer copy, padded into one batch on the
compute thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.base import thread_safe_encoder

# Tokenizers that do not know their limit report a huge sentinel (int(1e30)) instead.
_NO_LIMIT = 10**9


@dataclass(frozen=True)
class Encoded:
    """One input (a text, or a query/document pair) as token ids, special tokens included."""

    ids: list[int]
    type_ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def token_limit(tokenizer: Any, config: Any, override: int | None) -> int:
    """The most tokens one input may have: the entry's `limits.context_length`, else the
    smaller of the tokenizer's and the position table's limits."""
    if override:
        return override
    limits = [int(tokenizer.model_max_length or _NO_LIMIT),
              int(getattr(config, "max_position_embeddings", None) or _NO_LIMIT)]
    return min(limits)


class EncoderInputs:
    """Encodes texts (or pairs) exactly as the model's tokenizer does, and pads a batch."""

    def __init__(self, tokenizer: Any):
        self._encoder = thread_safe_encoder(tokenizer)
        self._pad_id = int(tokenizer.pad_token_id or 0)
        # BERT-style models take segment ids; RoBERTa-style ones do not.
        self._type_ids = "token_type_ids" in tokenizer.model_input_names

    def encode(self, text: str, pair: str | None = None) -> Encoded:
        encoding = self._encoder.encode(text, pair)
        return Encoded(list(encoding.ids), list(encoding.type_ids))

    def collate(self, items: list[Encoded], device: Any) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, `attention_mask` (and `token_type_ids`) on `device`."""
        width = max(len(item) for item in items)
        input_ids = torch.full((len(items), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        type_ids = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : len(item)] = torch.tensor(item.ids)
            attention_mask[row, : len(item)] = 1
            type_ids[row, : len(item)] = torch.tensor(item.type_ids)
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._type_ids:
            features["token_type_ids"] = type_ids
        return {name: tensor.to(device) for name, tensor in features.items()}

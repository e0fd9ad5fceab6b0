"""KV-cache mechanics for continuous batching on any transformers causal LM.

Rows of one running batch share a left-padded `DynamicCache`: every row's newest token sits in
the same (last) column, so one forward pass advances all rows by a token. A 2-D attention mask
hides each row's padding and explicit position ids keep each row's own positions. Joining
(after a newcomer's prefill) pads the shorter side on the left and concatenates on the batch
dimension; leaving selects the remaining rows and trims columns that became padding for all.
Copies happen only when rows join or leave, never per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class KVBlock:
    """Keys/values of some rows: per layer (keys, values) of shape (rows, heads, length, dim),
    with the (rows, length) mask of which columns are real tokens."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @classmethod
    def from_cache(cls, cache: DynamicCache, mask: torch.Tensor) -> KVBlock:
        return cls([(layer.keys, layer.values) for layer in cache.layers], mask)

    def to_cache(self) -> DynamicCache:
        return DynamicCache(ddp_cache_data=self.layers)

    def left_pad(self, length: int) -> KVBlock:
        pad = length - self.length
        if pad <= 0:
            return self
        layers = []
        for keys, values in self.layers:
            shape = (keys.shape[0], keys.shape[1], pad, keys.shape[3])
            layers.append((torch.cat([keys.new_zeros(shape), keys], dim=2),
                           torch.cat([values.new_zeros(shape), values], dim=2)))
        mask = torch.cat([self.mask.new_zeros((self.rows, pad)), self.mask], dim=1)
        return KVBlock(layers, mask)

    def repeat_rows(self, times: int) -> KVBlock:
        if times == 1:
            return self
        return KVBlock(
            [(k.repeat_interleave(times, dim=0), v.repeat_interleave(times, dim=0))
             for k, v in self.layers],
            self.mask.repeat_interleave(times, dim=0),
        )


def concat_blocks(first: KVBlock, second: KVBlock) -> KVBlock:
    length = max(first.length, second.length)
    a, b = first.left_pad(length), second.left_pad(length)
    layers = [(torch.cat([ka, kb]), torch.cat([va, vb]))
              for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True)]
    return KVBlock(layers, torch.cat([a.mask, b.mask]))


def select_rows(block: KVBlock, keep: list[int]) -> KVBlock:
    """The kept rows, with leading columns that are padding in every kept row trimmed off."""
    index = torch.tensor(keep, dtype=torch.long, device=block.mask.device)
    mask = block.mask.index_select(0, index)
    real_columns = mask.any(dim=0).nonzero()
    start = int(real_columns[0]) if len(real_columns) else mask.shape[1]
    layers = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
              for k, v in block.layers]
    return KVBlock(layers, mask[:, start:])


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of every column of a left-padded mask (padding gets 0)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)

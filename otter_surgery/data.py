"""Batching for training: examples are dicts of token id lists (already tokenized); collate pads them."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


def _ids(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded to the longest sequence on `side`."""
    seqs = [_ids(s) for s in seqs]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an example has no tokens")
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row, for left or right padding."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(dim=1)


def batched(items: Sequence, size: int, order: Iterable[int] | None = None):
    order = list(order) if order is not None else list(range(len(items)))
    for start in range(0, len(order), size):
        yield [items[i] for i in order[start:start + size]]

"""Deterministic stratified train/validation split shared by the in-memory data modules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def stratified_split(labels: Tensor, val_count: Callable[[int], int], seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, val): per class, a seeded permutation whose first ``val_count(class size)`` go to val."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = val_count(len(idx))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train), torch.cat(val)

"""The shuffled training order of every built-in DataModule: a pure function of (seed, epoch).

``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from a generator that advances across
epochs, so a run resumed from a checkpoint (a new generator) replays epoch 0's order. Lightning calls
``set_epoch`` on the sampler at every epoch start (as for ``DistributedSampler``), so deriving the order
from the epoch makes a resumed run see exactly the batches an uninterrupted one sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffleSampler", "train_loader"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` seeded by ``(seed, epoch)``.

    keyed: yield ``epoch * n + i`` instead of ``i``, for datasets whose random augmentation is seeded by the
    key (see :class:`~ssl_lightning.data.modules.CIFARDataModule`), so augmentations replay on resume too.
    """

    def __init__(self, n: int, seed: int = 0, keyed: bool = False) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        self.n, self.seed, self.keyed, self.epoch = n, int(seed), keyed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        if self.keyed:
            order = order + self.epoch * self.n
        return iter(order.tolist())


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch) pair (a multiplicative hash: neighbouring pairs do not collide)."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, keyed: bool = False) -> DataLoader:
    """The shuffled training loader of the built-in DataModules (see the module docstring)."""
    assert isinstance(dataset, Sized)
    sampler = EpochShuffleSampler(len(dataset), seed, keyed=keyed)
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers)

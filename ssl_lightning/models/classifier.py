"""A generic image-classification LightningModule: cross-entropy, torchmetrics accuracy, SGD + step LR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.compaction import CompactionCheckpointing


class ImageClassifier(CompactionCheckpointing, pl.LightningModule):
    """Wraps any ``nn.Module`` classifier. SGD with momentum and a multi-step LR decay, as in the paper.

    After ``clf.model = ssl_lightning.compact(clf.model, x)`` its checkpoints carry the compaction plan, so
    ``load_from_checkpoint`` and ``Trainer.fit(ckpt_path=...)`` rebuild the compacted structure."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._data_checked = False

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _checked_logits(self, x: Tensor, y: Tensor) -> Tensor:
        """The logits; on the first batch, data that cannot fit the model is a clear ValueError, not a shape or
        index error from deep inside the network or the loss."""
        if self._data_checked:
            return self(x)
        num_classes = int(self.hparams["num_classes"])
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels range over {int(y.min())}..{int(y.max())} but the model has num_classes={num_classes} "
                f"(labels 0..{num_classes - 1}): set model.num_classes (and the network's output size) to match "
                "the data, or check the label files"
            )
        try:
            logits = self(x)
        except RuntimeError as err:
            raise ValueError(
                f"{type(self.model).__name__} cannot take the data's images of shape {tuple(x.shape[1:])} "
                f"({str(err).splitlines()[0]}): choose a network for this input size or resize the data"
            ) from err
        if logits.dim() != 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"{type(self.model).__name__} outputs {tuple(logits.shape[1:])} per image but num_classes is "
                f"{num_classes}: the network's last layer must output num_classes logits"
            )
        self._data_checked = True
        return logits

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        try:
            return F.cross_entropy(logits, y)
        except IndexError as err:  # a label past the first batch out of range (CPU; CUDA asserts on the device)
            raise ValueError(
                f"a label is outside 0..{logits.shape[1] - 1} ({err}): set model.num_classes to match the data, or "
                "check the label files"
            ) from err

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._loss(self._checked_logits(x, y), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self._checked_logits(x, y)
        self.val_acc(logits, y)
        self.log("val_loss", self._loss(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if not hp.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(hp.milestones), hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

"""SSL on your own LightningModule: coupled filter + shape group lasso during training, then a compacted,
equivalence-checked model for inference. Runs in about a minute on 2 CPU cores on the embedded MNIST 5k data.

    python examples/own_lightning_module.py [--epochs 6] [--limit-batches N]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning import StructuredSparsity, compact_with_info, compaction_report
from ssl_lightning.data import MNIST5kDataModule


class DigitNet(pl.LightningModule):
    """Any LightningModule works; the callback finds its convs, BNs and linears by itself."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(64 * 7 * 7, 10)
        # lets the callback check its graph analysis against a real run (and follow code torch.fx cannot trace)
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], _: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit-batches", type=int, default=None, help="train batches per epoch (a quick check)")
    args = parser.parse_args()
    pl.seed_everything(0)
    ssl = StructuredSparsity(
        {"filter": 0.3, "shape": 0.2},  # why: a 6-epoch run needs a strong λ to zero whole filters
        couple=True,  # a filter's group also holds its BN channel and the next layer's input channel
        phases={"dense": [0, 1], "ssl": [1, args.epochs - 1], "finetune": [args.epochs - 1, None]},
    )
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[ssl], logger=False, enable_checkpointing=False,
                         limit_train_batches=args.limit_batches, enable_model_summary=False)  # fmt: skip
    model, data = DigitNet(), MNIST5kDataModule(batch_size=64)
    trainer.fit(model, datamodule=data)

    x = next(iter(data.val_dataloader()))[0][:8]
    info = compact_with_info(model, x)  # raises CompactionError if the compacted model differs
    print(f"val acc {100 * float(trainer.callback_metrics['val_acc']):.2f} %")
    print(f"channels kept: features.0 {model.features[0].out_channels} -> {info.model.features[0].out_channels}, "
          f"features.4 {model.features[4].out_channels} -> {info.model.features[4].out_channels}")  # fmt: skip
    print(compaction_report(model, info.model, x))


if __name__ == "__main__":
    main()

"""A short SSL training on the embedded MNIST 5k data, run as a separate process by ``test_resume.py``.

    python tests/resume_job.py OUT_DIR [--kill-at-step N] [--kill-in-checkpoint-write N] [--resume]

Dense epoch 0, SSL epochs 1-2 (pruned at the start of epoch 3), fine-tune epoch 3; 8 steps per epoch.
Writes ``OUT_DIR/final.pt`` (parameters and masks) when training ends. ``--kill-at-step`` SIGKILLs the process
when that optimizer step has run; ``--kill-in-checkpoint-write`` SIGKILLs it halfway through writing the
N-th checkpoint file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from ssl_lightning import StructuredSparsity
from ssl_lightning.data import MNIST5kDataModule


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, stride=2)
        self.conv2 = nn.Conv2d(6, 8, 5, stride=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class KillAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_in_checkpoint_write(nth: int) -> None:
    """SIGKILL halfway through the bytes of the nth checkpoint file written (local filesystem writes)."""
    from fsspec.implementations.local import LocalFileOpener

    write, seen = LocalFileOpener.write, [0]

    def half_then_kill(self: Any, data: bytes) -> int:
        seen[0] += 1
        if seen[0] == nth:
            write(self, data[: len(data) // 2])
            self.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, data)

    LocalFileOpener.write = half_then_kill  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-checkpoint-write", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    ssl = StructuredSparsity(
        {"filter": 0.5, "shape": 0.5}, phases={"dense": [0, 1], "ssl": [1, 3], "finetune": [3, None]}
    )
    ckpt = ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, save_top_k=-1)
    callbacks: list[pl.Callback] = [ssl, ckpt]
    if args.kill_at_step is not None:
        callbacks.append(KillAtStep(args.kill_at_step))
    if args.kill_in_checkpoint_write is not None:
        kill_in_checkpoint_write(args.kill_in_checkpoint_write)
    trainer = pl.Trainer(
        default_root_dir=args.out,
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    model = Lit()
    resume = args.out / "ckpt" / "last.ckpt" if args.resume else None
    trainer.fit(model, MNIST5kDataModule(batch_size=500), ckpt_path=resume)
    masks = {k: v.clone() for k, v in ssl.masks.items()}
    torch.save({"params": dict(model.named_parameters()), "masks": masks}, args.out / "final.pt")
    sys.exit(0)


if __name__ == "__main__":
    main()

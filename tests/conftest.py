"""Shared helpers: tiny deterministic models and data, the ops test-skip helper, a W&B offline reader."""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def requires_cuda_kernels() -> pytest.MarkDecorator:
    """Skip helper for tests that need the CUDA build of ssl_lightning._C on a GPU."""
    from ssl_lightning._ext import has_cuda_kernels

    return pytest.mark.skipif(
        not (torch.cuda.is_available() and has_cuda_kernels()), reason="needs a GPU and the CUDA build of _C"
    )


class SmallNet(nn.Module):
    """conv-BN-ReLU → conv → pool → flatten → Linear → Linear: every group type but depth applies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net if net is not None else SmallNet()
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def loader(n: int = 64, batch: int = 16, seed: int = 0, shape: tuple[int, ...] = (3, 8, 8)) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(tmp_path: Path, **kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def read_wandb_history(save_dir: Path) -> list[dict[str, Any]]:
    """History rows of every offline run under ``save_dir`` (parses the .wandb leveldb-log records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows: list[dict[str, Any]] = []
    for path in glob.glob(str(save_dir / "wandb" / "offline-run-*" / "run-*.wandb")):
        data = Path(path).read_bytes()
        pos, block, buf = 7, 32768, b""  # 7-byte file header, then 32 KiB blocks of records
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            pos += 7
            if kind == 0 and length == 0:
                pos += left - 7
                continue
            chunk = data[pos : pos + length]
            pos += length
            if kind in (1, 2):
                buf = chunk
            else:
                buf += chunk
            if kind in (1, 4):
                rec = pb.Record()
                rec.ParseFromString(buf)
                if rec.WhichOneof("record_type") == "history":
                    rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows

"""Shared helpers: tiny deterministic models and data, the ops test-skip helper, a W&B offline reader, a virtual
clock for timing tests."""

from __future__ import annotations

import os
from collections.abc import Callable

# Compacted layers time their implementations on their first inference call per input shape (autotune); the
# tests run thousands of such calls on throwaway shapes, so they use the deterministic cost model instead
# (subprocesses too), and tests of the autotune turn it on themselves (tests/test_kernel_choice.py).
os.environ["SSL_LIGHTNING_AUTOTUNE"] = "0"

import glob
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

_F = TypeVar("_F", bound=Callable[..., object])

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


class VirtualClock:
    """A clock that only the timed code moves: ``work(s)`` is a function that advances it ``s`` seconds per call.
    Timing tests run torch's Timer on it (fixture ``virtual_clock``), so what they measure is exact whatever
    else the machine runs: a test that compares wall-clock times fails on a loaded machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float) -> Callable[..., None]:
        def f(*_: object) -> None:
            self.now += seconds

        return f


@pytest.fixture
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    """Every timing of ``ssl_lightning.timing`` (interleaved_times, fastest) reads this clock instead of the wall."""
    from functools import partial

    from torch.utils.benchmark import Timer

    import ssl_lightning.timing

    clock = VirtualClock()
    monkeypatch.setattr(ssl_lightning.timing, "Timer", partial(Timer, timer=clock))
    return clock


def cuda_kernels_here() -> bool:
    """A GPU and the CUDA build of ssl_lightning._C are both present."""
    from ssl_lightning._ext import has_cuda_kernels

    return torch.cuda.is_available() and has_cuda_kernels()


def requires_cuda_kernels() -> Callable[[_F], _F]:
    """Marks a test ``cuda`` (the selection ``benchmarks/gpu_check.sh`` runs: ``pytest -m cuda``) and skips it
    unless :func:`cuda_kernels_here`."""
    skip = pytest.mark.skipif(not cuda_kernels_here(), reason="needs a GPU and the CUDA build of _C")

    def mark(test: _F) -> _F:
        return pytest.mark.cuda(skip(test))

    return mark


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


class PlainSGD(Module):
    """SGD without momentum: a PSP α then decays monotonically (momentum makes it overshoot 0 and oscillate)."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=1e-4)


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


def _wandb_records(path: str) -> tuple[list[Any], bool]:
    """Records of one offline ``.wandb`` transaction log (LevelDB-log framing: a 7-byte file header, then
    32 KiB blocks of CRC-32 framed fragments) and whether the log is complete (ends with the run's exit
    record). A torn or not-yet-written tail ends the parse instead of raising."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    records: list[Any] = []
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer, zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break  # the writer has not flushed this far yet
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    complete = bool(records) and records[-1].WhichOneof("record_type") == "exit"
    return records, complete


def read_wandb_history(save_dir: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """History rows of every offline run under ``save_dir``.

    wandb's service process writes the log and may still be flushing it when ``wandb.finish()`` returns,
    so this waits (up to ``timeout`` s) until every run's log ends with its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        paths = glob.glob(str(save_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        parsed = [_wandb_records(p) for p in paths]
        if (paths and all(done for _, done in parsed)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not paths or not all(done for _, done in parsed):
        sizes = {p: Path(p).stat().st_size for p in paths}
        raise AssertionError(f"no complete wandb offline log under {save_dir} after {timeout} s: {sizes}")
    rows: list[dict[str, Any]] = []
    for records, _ in parsed:
        for rec in records:
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def read_wandb_runs(save_dir: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every offline run under ``save_dir``: its name, group, job type, config (flat keys) and history rows."""
    read_wandb_history(save_dir, timeout)  # waits until every log is complete
    runs = []
    for path in sorted(glob.glob(str(save_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        run: dict[str, Any] = {"config": {}, "history": []}
        for rec in _wandb_records(path)[0]:
            kind = rec.WhichOneof("record_type")
            items = []
            if kind == "history":
                run["history"].append(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                )
            elif kind == "run":
                run.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type)
                items = list(rec.run.config.update)
            elif kind == "config":
                items = list(rec.config.update)
            for i in items:
                run["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        runs.append(run)
    return runs

"""Train-step time of ResNet-20 (CIFAR-shaped batches) with vs without StructuredSparsity, on CPU.

    python benchmarks/bench_callback_overhead.py [--batch 64 --steps 40 --rounds 3 --method proximal]

All group types are on (filter, channel, shape, kernel2d, depth, neuron_in). Runs without and with the
callback are interleaved in one process (A B A B ...); each step is timed from on_train_batch_start to
on_train_batch_end (forward, backward, penalty, optimizer step, mask/prox work, and the callback's own
logging every ``--log-every`` steps). The overhead is the ratio of median step times.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ssl_lightning import StructuredSparsity
from ssl_lightning.models import ImageClassifier, resnet20


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t0 = warmup, [], 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t0)


def run(with_ssl: bool, args: argparse.Namespace, data: DataLoader) -> list[float]:
    torch.manual_seed(0)
    timer = StepTimer(warmup=3)
    callbacks: list[pl.Callback] = [timer]
    if with_ssl:
        lam = 1e-4
        kinds = ("filter", "channel", "shape", "kernel2d", "depth", "neuron_in")
        callbacks.insert(
            0, StructuredSparsity(dict.fromkeys(kinds, lam), method=args.method, log_every_n_steps=args.log_every)
        )
    trainer = pl.Trainer(
        max_steps=args.steps + 3, callbacks=callbacks, accelerator="cpu", devices=1,
        logger=CSVLogger(tempfile.mkdtemp()), log_every_n_steps=args.log_every, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(ImageClassifier(resnet20(), lr=0.1), data)
    return timer.times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--method", default="proximal", choices=["proximal", "gradient"])
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 3)
    data = DataLoader(
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=args.batch,
    )
    base: list[float] = []
    ssl: list[float] = []
    for _ in range(args.rounds):
        base += run(False, args, data)
        ssl += run(True, args, data)
    mb, ms = statistics.median(base), statistics.median(ssl)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"ResNet-20, batch {args.batch}x3x32x32, method {args.method}, {len(base)} steps per arm")
    print(f"median step without callback: {1000 * mb:.1f} ms")
    print(f"median step with callback:    {1000 * ms:.1f} ms")
    print(f"overhead ratio (with / without): {ms / mb:.3f}  ({100 * (ms / mb - 1):+.1f} %)")


if __name__ == "__main__":
    main()

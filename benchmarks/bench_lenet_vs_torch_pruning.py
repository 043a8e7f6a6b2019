"""LeNet end to end: SSL (filter + channel group lasso, then ``compact``) against Torch-Pruning at the SSL paper's
LeNet-3 structure (3 and 12 filters: 5.3 % of the conv MACs), on the embedded MNIST 5k, several seeds.

    pip install torch-pruning          # benchmark-only dependency (extra "bench")
    python benchmarks/bench_lenet_vs_torch_pruning.py [--seeds 0 1 2] [--batch 1 256] [--markdown out.md]

Per seed, the same data split, optimizer (SGD 0.9, lr 0.02, weight decay 5e-4, batch 64) and 20-epoch budget:
    SSL            2 dense, 14 group-lasso (filter and channel groups of conv1/conv2, λ ``--lam``), 4 fine-tune
                   epochs (``StructuredSparsity``); then ``compact`` (channels removed across layers, remaining
                   zero rows / columns as ``CompactConv2d``): the default (``align="auto"``: each channel count
                   exact or rounded up to 8, whichever its layers run faster here), and fixed ``align`` 8 and 1
    Torch-Pruning  10 dense epochs, one-shot L1-magnitude pruning of conv1 to 3 and conv2 to 12 filters
                   (``MagnitudePruner``: conv2's inputs and fc1's columns follow), 10 fine-tune epochs
Every model is then timed side by side in one process (``interleaved_times``: round robin, best block of each)
with the dense LeNet as noise control: a speedup whose dense or model blocks spread more than
``NOISE_LIMIT`` is marked. Conv MACs are counted with ``torch.utils.flop_counter`` (the fused op has a formula).
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_lightning import CompactConv2d, StructuredSparsity, compact
from ssl_lightning.data import MNIST5kDataModule
from ssl_lightning.models import ImageClassifier, LeNet
from ssl_lightning.timing import NOISE_LIMIT, interleaved_times

LENET3 = {"conv1": 3, "conv2": 12}  # SSL paper Table 2 row 3: filters kept


def trainer(epochs: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip


def classifier(net: nn.Module) -> ImageClassifier:
    return ImageClassifier(net, lr=0.02, weight_decay=5e-4)


def accuracy(net: nn.Module, data: MNIST5kDataModule) -> float:
    net.eval()
    hits = total = 0
    with torch.inference_mode():
        for x, y in data.val_dataloader():
            hits += int((net(x).argmax(1) == y).sum())
            total += len(y)
    return hits / total


def conv_macs(net: nn.Module, x: Tensor) -> float:
    """MACs of every convolution (dense or fused compact) that runs on ``x``."""
    with torch.inference_mode():
        net(x)  # compacted layers choose their implementation first (no timing is done under a FLOP counter)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(x)
    flops = 0
    for op, n in counter.get_flop_counts()["Global"].items():
        if "convolution" in str(op) or "compact_conv2d" in str(op):
            flops += n
    return flops / 2


def structure(net: nn.Module) -> str:
    """Kept filters of conv1 / conv2 and conv2's kept input channels, e.g. "3-12 (3)"."""
    out = []
    for name in ("conv1", "conv2"):
        m = getattr(net, name)
        if isinstance(m, CompactConv2d):
            filters = m.row_idx.numel()
            taps = m.kernel_size[0] * m.kernel_size[1]
            channels = len({int(c) // taps for c in m.col_idx})
        else:
            filters, channels = m.out_channels, m.in_channels
        out.append((filters, channels))
    return f"{out[0][0]}-{out[1][0]} ({out[1][1]})"


def train_ssl(
    seed: int, lam: float, filter_lam: float, epochs: int, finetune: int, data: MNIST5kDataModule, couple: bool = False
) -> nn.Module:
    pl.seed_everything(seed, verbose=False)
    model = classifier(LeNet())
    dense_end, ssl_end = 2, epochs - finetune
    ssl = StructuredSparsity(
        lambdas={"filter": filter_lam, "channel": lam}, include=["model.conv1", "model.conv2"], couple=couple,
        phases={"dense": [0, dense_end], "ssl": [dense_end, ssl_end], "finetune": [ssl_end, None]},
    )  # fmt: skip
    trainer(epochs, [ssl]).fit(model, datamodule=data)
    return model.model.eval()


def train_torch_pruning(seed: int, epochs: int, data: MNIST5kDataModule) -> tuple[nn.Module, float]:
    import torch_pruning as tp

    pl.seed_everything(seed, verbose=False)
    model = classifier(LeNet())
    trainer(epochs // 2).fit(model, datamodule=data)
    dense_acc = accuracy(model.model, data)
    net = model.model
    ratios = {getattr(net, n): 1 - keep / getattr(net, n).out_channels for n, keep in LENET3.items()}
    pruner = tp.pruner.MagnitudePruner(
        net, torch.randn(1, 1, 28, 28), importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio_dict=ratios, ignored_layers=[net.fc1, net.fc2],
    )  # fmt: skip
    pruner.step()
    assert (net.conv1.out_channels, net.conv2.out_channels) == (3, 12), (net.conv1, net.conv2)
    model = classifier(net)
    trainer(epochs - epochs // 2).fit(model, datamodule=data)
    return model.model.eval(), dense_acc


def timed(models: dict[str, nn.Module], x: Tensor, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    fns: dict[str, Callable[[], object]] = {k: (lambda m=m: m(x)) for k, m in models.items()}
    spreads: dict[str, float] = {}
    with torch.inference_mode():
        for m in models.values():
            m(x)  # first call: a compacted layer chooses its implementation on this machine
        t = interleaved_times(fns, rounds, block_seconds=0.05, stat="min", spreads=spreads)
    return t, spreads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lam", type=float, default=0.3, help="SSL λ for channel groups (and filter groups)")
    p.add_argument("--filter-lam", type=float, default=None, help="SSL λ for filter groups (default: --lam)")
    p.add_argument("--finetune", type=int, default=4, help="SSL fine-tune epochs at the end of the budget")
    p.add_argument(
        "--couple", action="store_true",
        help="filter groups span the consumers' input columns too (conv2's and fc1's): SSL sees fc1's cost",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data = MNIST5kDataModule(batch_size=64)
    data.setup()
    xval = next(iter(data.val_dataloader()))[0]
    dense_net = LeNet().eval()
    dense_macs = conv_macs(dense_net, xval[:1])
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        filter_lam = args.lam if args.filter_lam is None else args.filter_lam
        ssl_net = train_ssl(seed, args.lam, filter_lam, args.epochs, args.finetune, data, args.couple)
        tp_net, dense_acc = train_torch_pruning(seed, args.epochs, data)
        models = {
            "SSL, compact (default)": compact(ssl_net, xval[:64]),
            "SSL, compact align 8": compact(ssl_net, xval[:64], align=8),
            "SSL, compact align 1": compact(ssl_net, xval[:64], align=1),
            "Torch-Pruning LeNet-3": tp_net,
        }
        accs = {k: accuracy(m, data) for k, m in models.items()}
        macs = {k: conv_macs(m, xval[:1]) / dense_macs for k, m in models.items()}
        shapes = {k: structure(m) for k, m in models.items()}
        for batch in args.batch:
            x = xval[:batch] if batch <= len(xval) else xval.repeat(-(-batch // len(xval)), 1, 1, 1)[:batch]
            t, spreads = timed({"dense": copy.deepcopy(dense_net), **models}, x, args.rounds)
            for k in models:
                noise = max(spreads["dense"], spreads[k])
                rows.append({"seed": seed, "batch": batch, "model": k, "acc": accs[k], "dense_acc": dense_acc,
                             "macs": macs[k], "structure": shapes[k], "speedup": t["dense"] / t[k], "noise": noise,
                             "dense_ms": 1e3 * t["dense"]})  # fmt: skip
                flag = " (noisy)" if noise > NOISE_LIMIT else ""
                print(f"seed {seed} batch {batch:4d} {k:24s} acc {100 * accs[k]:.2f} % conv MACs "
                      f"{100 * macs[k]:.2f} % speedup {t['dense'] / t[k]:.2f}x{flag}", flush=True)  # fmt: skip
    lines = [
        f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}; seeds "
        f"{args.seeds}, {args.epochs}-epoch budget ({args.finetune} SSL fine-tune), "
        f"SSL λ filter {args.filter_lam or args.lam} channel {args.lam}; "
        f"{time.perf_counter() - t0:.0f} s",
        "",
        "| model | batch | val acc % | conv MACs % of dense | speedup over dense (mean ± std) | per seed | dense ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in args.batch:
        for k in ("SSL, compact (default)", "SSL, compact align 8", "SSL, compact align 1", "Torch-Pruning LeNet-3"):
            rs = [r for r in rows if r["batch"] == batch and r["model"] == k]
            sp = [r["speedup"] for r in rs]
            per_seed = ", ".join(f"{r['speedup']:.2f}" + ("*" if r["noise"] > NOISE_LIMIT else "") for r in rs)
            sd = statistics.stdev(sp) if len(sp) > 1 else 0.0
            lines.append(
                f"| {k} | {batch} | {100 * statistics.fmean(r['acc'] for r in rs):.2f} | "
                f"{100 * statistics.fmean(r['macs'] for r in rs):.2f} | {', '.join(r['structure'] for r in rs)} | "
                f"{statistics.fmean(sp):.2f} ± {sd:.2f}× | "
                f"{per_seed} | {statistics.fmean(r['dense_ms'] for r in rs):.3f} |"
            )
    dense_accs = sorted({r["dense_acc"] for r in rows})
    lines.append(f"\nDense LeNet after 10 epochs (Torch-Pruning's starting point): "
                 f"{100 * statistics.fmean(dense_accs):.2f} % mean. * noisy: spread > {NOISE_LIMIT:.0%}.")  # fmt: skip
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

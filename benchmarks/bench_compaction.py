"""End-to-end inference, dense vs ``ssl_lightning.compact``-ed, on the paper's networks and structures.

    python benchmarks/bench_compaction.py [--threads 2] [--batch 1 32] [--rounds 5]

Random weights with the paper's per-layer kept fractions, zeroed per conv group (rows = filters,
columns = filter-shape fibers): AlexNet Table 4 row 2, CIFAR ConvNet Table 3 row 2, LeNet Table 2 row 4,
ResNet-20 with 50 % of each block's GEMM columns removed. The conv stack's FLOP ratio (dense MACs /
structured MACs) is printed beside the measured speedup of the conv stack and of the whole model.
Timed under torch.inference_mode, dense and compacted interleaved in one process, median of rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from ssl_lightning import compact, sparsity_report
from ssl_lightning.models import AlexNet, CifarConvNet, LeNet, resnet20


def zero_structure(model: nn.Module, fractions: list[tuple[float, float]] | None, col: float = 0.5) -> None:
    """Zero a (row, column) fraction of every Conv2d in order (``fractions``), or ``col`` of every column."""
    g = torch.Generator().manual_seed(0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            rows, cols = fractions[i] if fractions is not None else (0.0, col if conv.kernel_size != (1, 1) else 0.0)
            w = conv.weight.view(conv.groups, conv.out_channels // conv.groups, -1)
            for bank in w:
                kc = bank.shape[1]
                bank[:, torch.randperm(kc, generator=g)[: round(kc * cols)]] = 0
                og = bank.shape[0]
                bank[torch.randperm(og, generator=g)[: round(og * rows)]] = 0


def case_list() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...], list[tuple[float, float]] | None]]:
    return [
        ("AlexNet (Table 4 row 2)", AlexNet, (3, 227, 227),
         [(0.094, 0.0), (0.129, 0.632), (0.406, 0.769), (0.469, 0.847), (0.0, 0.807)]),
        ("CIFAR ConvNet (Table 3 row 2)", CifarConvNet, (3, 32, 32), [(0.5, 0.0), (0.281, 0.593), (0.016, 0.351)]),
        ("LeNet (Table 2 row 4)", LeNet, (1, 28, 28), [(0.0, 1 - 21 / 25), (0.0, 1 - 41 / 500)]),
        ("ResNet-20 (50 % columns per 3x3 conv)", resnet20, (3, 32, 32), None),
    ]  # fmt: skip


def conv_stack(model: nn.Module) -> nn.Module:
    return model.features if hasattr(model, "features") else model


def median_times(fns: dict[str, Callable[[], Tensor]], rounds: int) -> dict[str, float]:
    timers = {k: Timer("f()", globals={"f": f}) for k, f in fns.items()}
    number = {k: max(1, int(0.1 / max(t.timeit(1).median, 1e-6))) for k, t in timers.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, t in timers.items():
            samples[k].append(t.timeit(number[k]).median)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | batch | conv FLOP ratio | conv stack speedup | % of FLOP ratio | whole model speedup | layers |")
    print("|---|---|---|---|---|---|---|")
    for name, build, shape, fractions in case_list():
        torch.manual_seed(0)
        model = build().eval()
        zero_structure(model, fractions)
        for batch in args.batch:
            x = torch.randn(batch, *shape)
            with torch.inference_mode():
                fast = compact(model, x)
                report = sparsity_report(model, x)
                convs = [s for s in report.layers if s.kind == "conv"]
                flop_ratio = sum(s.macs for s in convs) / sum(s.macs_kept for s in convs)
                dense_stack, fast_stack = conv_stack(model), conv_stack(fast)
                fns: dict[str, Callable[[], Tensor]] = {
                    "dense": lambda m=model, x=x: m(x),
                    "fast": lambda m=fast, x=x: m(x),
                }
                if dense_stack is not model:  # the conv stack is a part of the model (AlexNet's features)
                    fns["dense_stack"] = lambda m=dense_stack, x=x: m(x)
                    fns["fast_stack"] = lambda m=fast_stack, x=x: m(x)
                t = median_times(fns, args.rounds)
            t.setdefault("dense_stack", t["dense"])
            t.setdefault("fast_stack", t["fast"])
            stack = t["dense_stack"] / t["fast_stack"]
            impls = sum(1 for m in fast.modules() if type(m).__name__ == "CompactConv2d")
            print(
                f"| {name} | {batch} | {flop_ratio:.2f} | {stack:.2f} | {100 * stack / flop_ratio:.0f} % | "
                f"{t['dense'] / t['fast']:.2f} | {impls} compacted |",
                flush=True,
            )


if __name__ == "__main__":
    main()

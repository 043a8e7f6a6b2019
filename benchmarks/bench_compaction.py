"""End-to-end inference, dense vs ``ssl_lightning.compact``-ed, on the paper's networks and structures.

    python benchmarks/bench_compaction.py [--threads 2] [--batch 1 32] [--rounds 5]

Random weights with the paper's per-layer kept fractions, zeroed per conv group (rows = filters,
columns = filter-shape fibers): AlexNet Table 4 row 2, CIFAR ConvNet Table 3 row 2, LeNet Table 2 row 4,
ResNet-20 with 50 % of each block's GEMM columns removed, and the same with three residual branches
zeroed (20 -> 14 layers, as SSL-ResNet-14). A zeroed filter also loses its bias / BN scale and shift, as
coupled SSL filter groups do, so compact() can remove its channel from the next layer. The conv stack's
FLOP ratio (dense MACs / structured MACs) is printed beside the measured speedup of the conv stack and
of the whole model.
Timed under torch.inference_mode, dense and compacted interleaved in one process, median of rounds.

--compile adds the conv stack with both models under torch.compile (Inductor generates the pooling, LRN
and activation loops; convolutions stay oneDNN / our op), the same treatment for dense and compacted.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ssl_lightning import compact_with_info, compaction_report, sparsity_report
from ssl_lightning.models import AlexNet, CifarConvNet, LeNet, resnet20
from ssl_lightning.timing import interleaved_times


def zero_structure(
    model: nn.Module, fractions: list[tuple[float, float]] | None, col: float = 0.5, zero_blocks: tuple[int, ...] = ()
) -> None:
    """Zero a (row, column) fraction of every Conv2d in order (``fractions``), or ``col`` of every column.

    A zeroed filter also loses its bias and the following BN channel's scale and shift, as coupled SSL
    filter groups (``couple=True``) drive them to zero together. ``zero_blocks``: residual blocks whose
    branch weights are all zeroed (depth-wise SSL).
    """
    g = torch.Generator().manual_seed(0)
    mods = list(model.modules())
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    bns = {id(c): mods[i + 1] for i, c in enumerate(mods[:-1]) if isinstance(c, nn.Conv2d)}
    with torch.no_grad():
        for i, conv in enumerate(convs):
            rows, cols = fractions[i] if fractions is not None else (0.0, col if conv.kernel_size != (1, 1) else 0.0)
            og = conv.out_channels // conv.groups
            w = conv.weight.view(conv.groups, og, -1)
            for gi, bank in enumerate(w):
                kc = bank.shape[1]
                bank[:, torch.randperm(kc, generator=g)[: round(kc * cols)]] = 0
                dead = torch.randperm(og, generator=g)[: round(og * rows)]
                bank[dead] = 0
                if conv.bias is not None:
                    conv.bias[gi * og + dead] = 0
                bn = bns.get(id(conv))
                if isinstance(bn, nn.BatchNorm2d):
                    bn.weight[gi * og + dead] = 0
                    bn.bias[gi * og + dead] = 0
        for b in zero_blocks:  # ResNetCifar BasicBlock: the branch is conv1 and conv2
            block = model.get_submodule(f"blocks.{b}")
            block.conv1.weight.zero_()
            block.conv2.weight.zero_()


def case_list() -> list[
    tuple[str, Callable[[], nn.Module], tuple[int, ...], list[tuple[float, float]] | None, tuple[int, ...]]
]:
    return [
        ("AlexNet (Table 4 row 2)", AlexNet, (3, 227, 227),
         [(0.094, 0.0), (0.129, 0.632), (0.406, 0.769), (0.469, 0.847), (0.0, 0.807)], ()),
        ("CIFAR ConvNet (Table 3 row 2)", CifarConvNet, (3, 32, 32), [(0.5, 0.0), (0.281, 0.593), (0.016, 0.351)], ()),
        ("LeNet (Table 2 row 4)", LeNet, (1, 28, 28), [(0.0, 1 - 21 / 25), (0.0, 1 - 41 / 500)], ()),
        ("ResNet-20 (50 % columns per 3x3 conv)", resnet20, (3, 32, 32), None, ()),
        ("ResNet-20 → 14 layers (3 zero branches, 50 % columns)", resnet20, (3, 32, 32), None, (2, 5, 8)),
    ]  # fmt: skip


def conv_stack(model: nn.Module) -> nn.Module:
    return model.features if hasattr(model, "features") else model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cases", default="", help="only cases whose name contains this text")
    p.add_argument("--compile", action="store_true", help="also time both conv stacks under torch.compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        "| model | batch | conv FLOP ratio | conv layers speedup (% of ratio) | conv stack speedup (% of ratio) "
        "| whole model speedup |"
        + (" conv stack speedup, both compiled (% of ratio) |" if args.compile else "")
        + " compaction |"
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if args.compile else ""))
    for name, build, shape, fractions, zero_blocks in case_list():
        if args.cases not in name:
            continue
        torch.manual_seed(0)
        model = build().eval()
        zero_structure(model, fractions, zero_blocks=zero_blocks)
        for batch in args.batch:
            x = torch.randn(batch, *shape)
            with torch.inference_mode():
                info = compact_with_info(model, x)
                fast = info.model
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
                if args.compile:
                    dense_c, fast_c = torch.compile(dense_stack), torch.compile(fast_stack)
                    # compile outside the timing, and check the compiled compacted stack against the dense one
                    torch.testing.assert_close(fast_c(x), dense_c(x), rtol=1e-4, atol=1e-4)
                    fns["dense_compiled"] = lambda m=dense_c, x=x: m(x)
                    fns["fast_compiled"] = lambda m=fast_c, x=x: m(x)
                t = interleaved_times(fns, args.rounds, block_seconds=0.1)
            t.setdefault("dense_stack", t["dense"])
            t.setdefault("fast_stack", t["fast"])
            stack = t["dense_stack"] / t["fast_stack"]
            # Conv layers alone: each conv timed on the input it sees (no pooling / LRN / activations).
            rep = compaction_report(model, fast, x, rounds=args.rounds)
            conv_rows = [r for r in rep.layers if isinstance(model.get_submodule(r.name), nn.Conv2d)]
            layers = sum(r.ms for r in conv_rows) / sum(r.ms_compact for r in conv_rows)
            impls = sum(1 for m in fast.modules() if type(m).__name__ == "CompactConv2d")
            filters = sum(
                mod.out_channels - len(keep)
                for n, keep in info.channels.out_keep.items()
                if isinstance(mod := model.get_submodule(n), nn.Conv2d)
            )
            compiled = ""
            if args.compile:
                c = t["dense_compiled"] / t["fast_compiled"]
                compiled = f"{c:.2f} ({100 * c / flop_ratio:.0f} %) | "
            print(
                f"| {name} | {batch} | {flop_ratio:.2f} | {layers:.2f} ({100 * layers / flop_ratio:.0f} %) | "
                f"{stack:.2f} ({100 * stack / flop_ratio:.0f} %) | "
                f"{t['dense'] / t['fast']:.2f} | {compiled}{impls} CompactConv2d, {filters} filters and "
                f"{len(info.depth)} branches removed |",
                flush=True,
            )


if __name__ == "__main__":
    main()

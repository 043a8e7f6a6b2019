"""Compacted convolution vs what users run today, on the SSL paper's layers and structures.

    python benchmarks/bench_compact_conv.py [--threads 2] [--batch 1 16] [--rounds 5] [--markdown out.md]
        [--isa avx2]

``--device cuda`` runs every column on the GPU against cuDNN (``--tf32`` lets both use TF32 for fp32; the timer
synchronises the device); ``--json`` writes the measured rows (``benchmarks/gpu_check.sh`` uses both).

``--isa avx2`` measures what a CPU without AVX-512 runs, on this one: the op is capped to its AVX2 kernel
(``SSL_LIGHTNING_MAX_ISA=avx2``) and the baselines to AVX2 too (``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN's
``F.conv2d``, ``MKL_ENABLE_INSTRUCTIONS=AVX2`` for MKL's GEMMs); both libraries read these once at start, so the
script restarts itself with them set.

Layers: AlexNet conv1–5 with the paper's Table 4 row-2 and row-5 structures (kept rows / columns drawn at
random with the paper's per-layer fractions, per conv group), the CIFAR ConvNet (Table 3 row 2) and
LeNet (Table 2 row 4) layers. Columns, all whole-layer times (lowering included) as speedups over
``F.conv2d`` on the dense weight (oneDNN), measured interleaved in one process (round robin, median):

    rows    a smaller F.conv2d with the kept filters only (what channel pruners give)
    unfold  F.unfold + index_select of the kept columns + one mm per group
    csr     SparseConv2d: CSR weight (unstructured, the paper's row-1 ℓ1 sparsity; AlexNet only) @ F.unfold(x)
    fused   ssl_lightning.ops.compact_conv2d (this project)
    module  CompactConv2d.from_conv(..., example_input=x): the implementation a user gets
    ideal   FLOP-ideal speedup 1/((1-row)(1-col))
The last table uses the paper's own protocol (per image, lowered GEMM only, lowering excluded, one thread) to compare
with its Table 4 CPU row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning import CompactConv2d
from ssl_lightning.compaction import SparseConv2d
from ssl_lightning.ops import compact_conv2d, pack_compact_weight
from ssl_lightning.timing import interleaved_times


@dataclass
class Layer:
    name: str
    cout: int
    cin: int
    k: int
    stride: int
    pad: int
    groups: int
    hw: int
    row: float  # row (filter) sparsity
    col: float  # column (shape) sparsity
    l1: float | None = None  # unstructured sparsity of the paper's ℓ1 row


ALEXNET = [  # (name, cout, cin, k, stride, pad, groups, input hw)
    ("conv1", 96, 3, 11, 4, 0, 1, 227),
    ("conv2", 256, 96, 5, 1, 2, 2, 27),
    ("conv3", 384, 256, 3, 1, 1, 1, 13),
    ("conv4", 384, 384, 3, 1, 1, 2, 13),
    ("conv5", 256, 384, 3, 1, 1, 2, 13),
]
ROW2 = {"row": [0.094, 0.129, 0.406, 0.469, 0.0], "col": [0.0, 0.632, 0.769, 0.847, 0.807]}
ROW5 = {"row": [0.0] * 5, "col": [0.0, 0.209, 0.397, 0.397, 0.246]}
L1 = [0.676, 0.924, 0.972, 0.966, 0.943]


def suites() -> dict[str, list[Layer]]:
    out = {
        "AlexNet, Table 4 row 2 (SSL)": [
            Layer(*a, row=r, col=c, l1=u) for a, r, c, u in zip(ALEXNET, ROW2["row"], ROW2["col"], L1, strict=True)
        ],
        "AlexNet, Table 4 row 5 (SSL, no accuracy loss)": [
            Layer(*a, row=r, col=c) for a, r, c in zip(ALEXNET, ROW5["row"], ROW5["col"], strict=True)
        ],
        # CIFAR ConvNet Table 3 row 2: row sparsity 50.0/28.1/1.6 %, column sparsity 0/59.3/35.1 %
        "CIFAR ConvNet, Table 3 row 2": [
            Layer("conv1", 32, 3, 5, 1, 2, 1, 32, 0.5, 0.0),
            Layer("conv2", 32, 32, 5, 1, 2, 1, 16, 0.281, 0.593),
            Layer("conv3", 64, 32, 5, 1, 2, 1, 8, 0.016, 0.351),
        ],
        # LeNet Table 2 row 4 (shape-wise): filter sizes 21/25 and 41/500 kept, channels 1/1 and 2/20
        "LeNet, Table 2 row 4": [
            Layer("conv1", 20, 1, 5, 1, 0, 1, 28, 0.0, 1 - 21 / 25),
            Layer("conv2", 50, 20, 5, 1, 0, 1, 12, 0.0, 1 - 41 / 500),
        ],
    }
    return out


def build(layer: Layer, gen: torch.Generator) -> tuple[nn.Conv2d, Tensor, Tensor, Tensor, Tensor]:
    """A conv with random weights whose kept rows / columns follow the layer's fractions per conv group."""
    conv = nn.Conv2d(layer.cin, layer.cout, layer.k, layer.stride, layer.pad, groups=layer.groups)
    og, kcols = layer.cout // layer.groups, layer.cin // layer.groups * layer.k * layer.k
    rows, cols, rp, cp = [], [], [0], [0]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        for g in range(layer.groups):
            r = torch.randperm(og, generator=gen)[: round(og * (1 - layer.row))].sort().values + g * og
            c = torch.randperm(kcols, generator=gen)[: round(kcols * (1 - layer.col))].sort().values
            keep = torch.zeros(og, kcols, dtype=torch.bool)
            keep[(r - g * og)[:, None], c[None, :]] = True
            conv.weight[g * og : (g + 1) * og].mul_(keep.view(og, -1, layer.k, layer.k))
            rows.append(r), cols.append(c), rp.append(rp[-1] + len(r)), cp.append(cp[-1] + len(c))
    return conv, torch.cat(rows), torch.tensor(rp), torch.cat(cols), torch.tensor(cp)


def candidates(
    layer: Layer, batch: int, gen: torch.Generator, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[dict[str, Callable[[], Tensor]], float, str]:
    conv, ri, rp, ci, cp = build(layer, gen)
    conv = conv.to(dtype=dtype, device=device)
    ri, rp, ci, cp = (t.to(device) for t in (ri, rp, ci, cp))
    x = torch.randn(batch, layer.cin, layer.hw, layer.hw, generator=gen).to(dtype=dtype, device=device)
    w, b = conv.weight.detach(), conv.bias.detach()
    st, pd, g = layer.stride, layer.pad, layer.groups
    packed = pack_compact_weight(w, ri, rp, ci, cp)
    ks = (layer.k, layer.k)
    rows_w, rows_b = w[ri], b[ri]
    per_group = [(int(rp[i]), int(rp[i + 1]), int(cp[i]), int(cp[i + 1])) for i in range(g)]
    cg = layer.cin // g
    module = CompactConv2d.from_conv(conv, example_input=x).eval()
    fns: dict[str, Callable[[], Tensor]] = {
        "dense": lambda: F.conv2d(x, w, b, st, pd, 1, g),
        "fused": lambda: compact_conv2d(x, packed, ri, rp, ci, cp, b, ks, (st, st), (pd, pd), (1, 1), g, layer.cout),
        "module": lambda: module(x),
    }
    if g == 1 or len({e - s for s, e, _, _ in per_group}) == 1:  # equal kept filters per group
        fns["rows"] = lambda: F.conv2d(x, rows_w, rows_b, st, pd, 1, g)

    def unfold_select() -> Tensor:
        cols = F.unfold(x, ks, padding=pd, stride=st)  # N x (C*KH*KW) x P
        outs = []
        for i, (_, _, c0, c1) in enumerate(per_group):
            sel = cols[:, i * cg * layer.k**2 : (i + 1) * cg * layer.k**2].index_select(1, ci[c0:c1])
            outs.append(torch.matmul(packed_blocks[i], sel))
        return torch.cat(outs, 1)

    packed_blocks, off = [], 0
    for r0, r1, c0, c1 in per_group:
        packed_blocks.append(packed[off : off + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
        off += (r1 - r0) * (c1 - c0)
    fns["unfold"] = unfold_select
    if layer.l1 is not None and dtype == torch.float32 and device == "cpu":  # sparse.mm: CPU fp32 / fp64 here
        gen_l1 = torch.Generator().manual_seed(1)
        l1_conv = nn.Conv2d(layer.cin, layer.cout, layer.k, st, pd, groups=g)
        with torch.no_grad():  # the paper's row-1 unstructured sparsity, drawn per weight
            l1_conv.weight.copy_(torch.randn(l1_conv.weight.shape, generator=gen_l1))
            l1_conv.weight[torch.rand(l1_conv.weight.shape, generator=gen_l1) < layer.l1] = 0
        sparse = SparseConv2d(l1_conv)  # what ssl_lightning.sparsify gives: CSR @ F.unfold(x), all images at once
        fns["csr"] = lambda: sparse(x)
    ideal = 1 / ((1 - layer.row) * (1 - layer.col))
    return fns, ideal, module.impl


def measure(fns: dict[str, Callable[[], Tensor]], rounds: int, stat: str = "median") -> dict[str, float]:
    """Round-robin timing, blocks of about 50 ms: the median (or, with stat="min", the best) block."""
    return interleaved_times(fns, rounds, block_seconds=0.05, stat="min" if stat == "min" else "median")


def gemm_only(layer: Layer, gen: torch.Generator) -> tuple[float, float, float]:
    """The paper's protocol: per image, lowered GEMM only, one call per conv group; (dense, compact, ℓ1 CSR)
    seconds. The CSR weight has the paper's row-1 unstructured sparsity."""
    conv, ri, rp, ci, cp = build(layer, gen)
    g, cg, og = layer.groups, layer.cin // layer.groups, layer.cout // layer.groups
    x = torch.randn(1, layer.cin, layer.hw, layer.hw, generator=gen)
    cols = F.unfold(x, layer.k, padding=layer.pad, stride=layer.stride)[0]
    kk = cg * layer.k**2
    w = conv.weight.detach().reshape(layer.cout, -1)
    dense = [(w[i * og : (i + 1) * og], cols[i * kk : (i + 1) * kk]) for i in range(g)]
    comp = []
    for i in range(g):
        r, c = ri[rp[i] : rp[i + 1]], ci[cp[i] : cp[i + 1]]
        comp.append((w[r][:, c].contiguous(), cols[i * kk : (i + 1) * kk][c].contiguous()))
    gen_l1 = torch.Generator().manual_seed(1)
    w_l1 = torch.randn(w.shape, generator=gen_l1)
    w_l1[torch.rand(w.shape, generator=gen_l1) < (layer.l1 or 0.0)] = 0
    csr = [(w_l1[i * og : (i + 1) * og].to_sparse_csr(), cols[i * kk : (i + 1) * kk]) for i in range(g)]
    t = measure(
        {
            "dense": lambda: [a @ b for a, b in dense],
            "compact": lambda: [a @ b for a, b in comp],
            "csr": lambda: [torch.sparse.mm(a, b) for a, b in csr],
        },
        5,
    )
    return t["dense"], t["compact"], t["csr"]


def thread_scaling(threads: int) -> float:
    """Speedup of a 768^3 fp32 matmul on ``threads`` threads over one: ~threads on a quiet machine, lower when
    other load holds a core (a shared VM's figures are then closer to one thread's: reported with the tables)."""
    a, b = torch.randn(768, 768), torch.randn(768, 768)
    before = torch.get_num_threads()
    times = []
    for n in (1, threads):
        torch.set_num_threads(n)
        times.append(interleaved_times({"mm": lambda: a @ b}, 3, block_seconds=0.05, stat="min")["mm"])
    torch.set_num_threads(before)
    return times[0] / times[1]


def main() -> None:
    with torch.inference_mode():  # every column runs as inference does: no autograd bookkeeping
        _main()


def _main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--stat", choices=["median", "min"], default="median",
        help="per candidate, the median or the best of its rounds' blocks (best: least disturbed by other load)",
    )  # fmt: skip
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--suite", default="", help="only suites whose title contains this text")
    p.add_argument("--no-paper-protocol", action="store_true", help="skip the GEMM-only table")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
        help="storage dtype of input, weights and output for every column (the paper protocol stays fp32)",
    )  # fmt: skip
    p.add_argument(
        "--isa", choices=["native", "avx2"], default="native",
        help="avx2: cap the op and the baselines (oneDNN, MKL) to AVX2, as on a CPU without AVX-512",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="cuda: every column on the GPU, the baseline is cuDNN (timing synchronises the device)",
    )  # fmt: skip
    p.add_argument(
        "--tf32", action="store_true",
        help="cuda: let cuDNN and cuBLAS use TF32 for fp32 (off by default: exact fp32 on both sides)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="also write every measured row to this JSON file")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    if cuda:  # the same TF32 setting for the baseline (cuDNN) and the op's GEMMs
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
        args.no_paper_protocol = True  # the paper's protocol is its CPU table
    if args.isa == "avx2":
        capped = {"SSL_LIGHTNING_MAX_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
        if any(os.environ.get(k) != v for k, v in capped.items()):  # oneDNN / MKL read them once, at start
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **capped})
    torch.set_num_threads(args.threads)
    cuda_gemm = os.environ.get("SSL_LIGHTNING_CUDA_GEMM", "auto")  # the CUDA op's kernel (read at every call)
    where = (
        f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"TF32 {'on' if args.tf32 else 'off'}, op kernel SSL_LIGHTNING_CUDA_GEMM={cuda_gemm})"
        if cuda
        else f"{platform.machine()} ({platform.processor() or 'cpu'}), threads {torch.get_num_threads()}"
    )
    lines = [
        f"machine: {where}, torch {torch.__version__}; speedups over F.conv2d (dense weight), whole layer; "
        f"{args.stat} of {args.rounds} rounds; {args.dtype}"
        + ("" if cuda else f"; ISA {args.isa}")
        + (" (op, oneDNN and MKL capped to AVX2)" if args.isa == "avx2" else "")
    ]
    scaling = [] if cuda else [thread_scaling(args.threads)]
    records: list[dict[str, object]] = []
    dtype = getattr(torch, args.dtype)
    cols = ["rows", "unfold", "csr", "fused", "module", "ideal"]
    for batch in args.batch:
        for suite, layers in suites().items():
            if args.suite not in suite:
                continue
            gen = torch.Generator().manual_seed(0)
            suffix = ("" if dtype == torch.float32 else f", {args.dtype}") + (
                f", {cuda_gemm} CUDA kernel" if cuda and cuda_gemm != "auto" else ""
            )
            lines += ["", f"### {suite}, batch {batch}{suffix}", ""]
            lines.append("| layer | dense ms | " + " | ".join(cols) + " | fused % of ideal | module impl |")
            lines.append("|---" * (len(cols) + 4) + "|")
            speed = []
            for layer in layers:
                fns, ideal, mod_impl = candidates(layer, batch, gen, dtype, args.device)
                t = measure(fns, args.rounds, args.stat)
                sp = {k: t["dense"] / v for k, v in t.items()}
                sp["ideal"] = ideal
                speed.append(sp)
                records.append({"suite": suite, "batch": batch, "layer": layer.name, "dense_ms": 1e3 * t["dense"],
                                "dtype": args.dtype, "cuda_gemm": cuda_gemm if cuda else None,
                                "speedup": {k: v for k, v in sp.items() if k != "ideal"}, "ideal": ideal,
                                "module_impl": mod_impl})  # fmt: skip
                row = [f"{sp[c]:.2f}" if c in sp else "–" for c in cols]
                lines.append(
                    f"| {layer.name} | {1e3 * t['dense']:.3f} | " + " | ".join(row)
                    + f" | {100 * sp['fused'] / ideal:.0f} % | {mod_impl} |"
                )  # fmt: skip
            means = {c: statistics.fmean(s[c] for s in speed) for c in ("fused", "module", "ideal")}
            mean_row = f"**{means['fused']:.2f}** | **{means['module']:.2f}** | {means['ideal']:.2f}"
            lines.append(f"| **mean** | | | | | {mean_row} | | |")
            print("\n".join(lines[-(len(layers) + 5) :]), flush=True)
    if not args.no_paper_protocol:
        lines += paper_protocol()
        print("\n".join(lines[-9:]))
    if not cuda:
        scaling.append(thread_scaling(args.threads))
        lines[0] += (
            f"; thread scaling (768^3 matmul, {args.threads} threads vs 1) {scaling[0]:.2f}x before the tables, "
            f"{scaling[1]:.2f}x after"
        )
    print(lines[0])
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": lines[0], "rows": records}, fh, indent=1)


def paper_protocol() -> list[str]:
    """The SSL paper's Table 4 protocol: per image, the lowered GEMMs only (lowering excluded), one thread; SSL's
    row 2 (structured, compact GEMM) beside row 1 (ℓ1, CSR GEMM)."""
    lines = [
        "",
        "### Paper protocol: AlexNet rows 2 (SSL) and 1 (ℓ1), per image, GEMM only (lowering excluded), 1 thread, "
        "median of 5",
        "",
    ]
    lines.append(
        "| layer | dense GEMM ms | SSL compact GEMM ms | SSL speedup | paper SSL CPU × | ℓ1 CSR GEMM ms | ℓ1 speedup | "
        "paper ℓ1 CPU × |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    paper = [1.05, 3.37, 6.27, 9.73, 4.93]
    paper_l1 = [0.80, 2.91, 4.84, 3.83, 2.76]
    gen = torch.Generator().manual_seed(0)
    ratios, ratios_l1 = [], []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layer, ref, ref_l1 in zip(suites()["AlexNet, Table 4 row 2 (SSL)"], paper, paper_l1, strict=True):
            d, c, u = gemm_only(layer, gen)
            ratios.append(d / c)
            ratios_l1.append(d / u)
            lines.append(
                f"| {layer.name} | {1e3 * d:.3f} | {1e3 * c:.3f} | {d / c:.2f} | {ref:.2f} | {1e3 * u:.3f} | "
                f"{d / u:.2f} | {ref_l1:.2f} |"
            )
    finally:
        torch.set_num_threads(before)
    ssl, l1 = statistics.fmean(ratios), statistics.fmean(ratios_l1)
    lines.append(f"| **mean** | | | **{ssl:.2f}** | 5.07 | | **{l1:.2f}** | 3.03 |")
    lines.append(f"\nSSL / ℓ1 mean speedup: {ssl / l1:.2f} (paper: 5.07 / 3.03 = 1.67)")
    return lines


if __name__ == "__main__":
    main()

"""Backward of compact_conv2d (kept rows/columns only) vs its reference twin (dense conv gradients with the
masked weight) and vs the dense layer's own backward, on AlexNet conv2–5 with the Table 4 row-2 structure.

    python benchmarks/bench_compact_backward.py [--threads 2] [--batch 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from ssl_lightning import ops
from ssl_lightning.timing import interleaved_times

LAYERS = [  # name, cout, cin, k, pad, groups, hw, row sparsity, column sparsity
    ("conv2", 256, 96, 5, 2, 2, 27, 0.129, 0.632),
    ("conv3", 384, 256, 3, 1, 1, 13, 0.406, 0.769),
    ("conv4", 384, 384, 3, 1, 2, 13, 0.469, 0.847),
    ("conv5", 256, 384, 3, 1, 2, 13, 0.0, 0.807),
]


def dense_backward(x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor, pad: int, groups: int) -> None:
    x.grad = w.grad = None
    F.conv2d(x, w, None, 1, pad, 1, groups).backward(gy)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {threads}, batch {args.batch}")
    print("| layer | dense conv backward ms | reference ms | kept-only op ms | op vs reference | op vs dense |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, cout, cin, k, pad, groups, hw, rs, cs in LAYERS:
        og, kk = cout // groups, cin // groups * k * k
        rows, cols, rp, cp = [], [], [0], [0]
        for g in range(groups):
            r = torch.randperm(og, generator=gen)[: round(og * (1 - rs))].sort().values + g * og
            c = torch.randperm(kk, generator=gen)[: round(kk * (1 - cs))].sort().values
            rows.append(r), cols.append(c), rp.append(rp[-1] + len(r)), cp.append(cp[-1] + len(c))
        ri, ci, rpt, cpt = torch.cat(rows), torch.cat(cols), torch.tensor(rp), torch.tensor(cp)
        w = torch.randn(cout, cin // groups, k, k, generator=gen)
        wc = ops.pack_compact_weight(w, ri, rpt, ci, cpt)
        x = torch.randn(args.batch, cin, hw, hw, generator=gen)
        gy = torch.randn(args.batch, cout, hw, hw, generator=gen)
        a = (gy, x, wc, ri, rpt, ci, cpt, [k, k], [1, 1], [pad, pad], [1, 1], groups, cout, False, [True, True])
        xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()

        fns = {
            "dense": lambda xd=xd, wd=wd, gy=gy, pad=pad, groups=groups: dense_backward(xd, wd, gy, pad, groups),
            "reference": lambda a=a: ops.compact_conv2d_backward_reference(*a),
            "op": lambda a=a: torch.ops.ssl_lightning.compact_conv2d_backward(*a),
        }
        t = interleaved_times(fns, args.rounds, block_seconds=0.1)
        print(
            f"| {name} | {1e3 * t['dense']:.2f} | {1e3 * t['reference']:.2f} | {1e3 * t['op']:.2f} | "
            f"{t['reference'] / t['op']:.2f}x | {t['dense'] / t['op']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()

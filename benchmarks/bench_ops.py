"""Compiled ops vs their pure-PyTorch reference twins, timed side by side with torch.utils.benchmark.

    python benchmarks/bench_ops.py [--threads 2]

lowered_nonzero: the nonzero GEMM rows / columns of a lowered weight (used by the sparsity report every
logging step and by compaction), on the AlexNet conv shapes with the paper's Table 4 row-2 structure.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.utils.benchmark as tb

from ssl_lightning.ops import lowered_nonzero, lowered_nonzero_reference

# (name, out, in/groups, k, groups, row sparsity, column sparsity) — Table 4 row 2
ALEXNET = [
    ("conv1", 96, 3, 11, 1, 0.094, 0.0),
    ("conv2", 256, 48, 5, 2, 0.129, 0.632),
    ("conv3", 384, 256, 3, 1, 0.406, 0.769),
    ("conv4", 384, 192, 3, 2, 0.469, 0.847),
    ("conv5", 256, 192, 3, 2, 0.0, 0.807),
]


def structured_weight(out: int, cg: int, k: int, groups: int, rows: float, cols: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, cg, k, k, generator=g)
    w[torch.rand(out, generator=g) < rows] = 0
    bank = w.view(groups, out // groups, -1)
    bank[:, :, torch.rand(cg * k * k, generator=g) < cols] = 0
    return w


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'layer':<8}{'weight':>20}{'reference us':>14}{'compiled us':>13}{'speedup':>9}")
    for name, out, cg, k, groups, rs, cs in ALEXNET:
        w = structured_weight(out, cg, k, groups, rs, cs)
        assert all(
            torch.equal(a, b)
            for a, b in zip(lowered_nonzero(w, groups), lowered_nonzero_reference(w, groups), strict=True)
        )
        ref = tb.Timer(
            "f(w, g)",
            globals={"f": lowered_nonzero_reference, "w": w, "g": groups},
            num_threads=torch.get_num_threads(),
        ).blocked_autorange(min_run_time=0.5)
        ours = tb.Timer(
            "f(w, g)", globals={"f": lowered_nonzero, "w": w, "g": groups}, num_threads=torch.get_num_threads()
        ).blocked_autorange(min_run_time=0.5)
        shape = "x".join(map(str, w.shape))
        print(
            f"{name:<8}{shape:>20}{1e6 * ref.median:>14.1f}{1e6 * ours.median:>13.1f}{ref.median / ours.median:>8.2f}x"
        )


if __name__ == "__main__":
    main()

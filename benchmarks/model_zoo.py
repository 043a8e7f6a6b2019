"""Compaction on 16 third-party networks at their library's default size (transformers configs, MONAI), with
random coupled structured zeros: what each loses, what stays dense and why. Needs the ``zoo`` extra.

    python benchmarks/model_zoo.py [--small] [--uncoupled] [--out TABLE.md] [NAME ...]

Columns: params / MACs / stored size (parameters + buffers) of the compacted model as a share of the dense one,
layers that lost channels, zeroed residual branches cut out, how the graph was analysed (fx, or the modules
recorded from a run), the largest output difference, and what stayed whole.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lightning.compaction import compact_with_info
from ssl_lightning.graph import analyze
from tests.zoo import ZOO, macs, zero_branches, zero_structure


def stored(model: nn.Module) -> int:
    """Floating-point elements a checkpoint holds (parameters and persistent buffers, not in-memory caches)."""
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def row(name: str, small: bool, couple: bool) -> str:
    torch.manual_seed(0)
    model, x = ZOO[name](small)
    x = x[:1]
    t0 = time.perf_counter()
    analysis = analyze(model, (x,))
    zero_structure(model, seed=0, couple=couple)
    zeroed = zero_branches(model, analysis.depth_branches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = compact_with_info(model, x, measure=False, align=1)
    seconds = time.perf_counter() - t0
    p0, p1 = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in info.model.parameters())
    m0, m1 = macs(model, x), macs(info.model, x)
    how = "fx" if not analysis.recorded and not analysis.untraced else ""
    if analysis.recorded:
        how = "recorded: " + ", ".join(n or "(model)" for n in analysis.recorded)
    if analysis.untraced:
        how += ("; " if how else "") + "untraced: " + ", ".join(n or "(model)" for n in analysis.untraced)
    whole = sorted(
        {s.split(": ", 1)[1].split(" (")[0] for s in info.channels.skipped if ": " in s}
        - {
            "blocked by model output"  # every network's output layer
        }
    )
    dense = [f"{n}" for n in info.notes if "kept" in n][:2]
    stays = "; ".join(whole[:3] + dense) + (" ..." if len(whole) > 3 else "") or "-"
    return (f"| {name} | {p0 / 1e6:.2f} M | {p1 / p0:.1%} | {m1 / m0:.1%} | {stored(info.model) / stored(model):.1%} | "
            f"{len({k for k in info.channels.out_keep})} | {len(info.depth)}/{len(zeroed)} | {how} | "
            f"{info.max_abs_error:.1e} | {seconds:.0f} s | {stays} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"networks (default: all): {', '.join(ZOO)}")
    parser.add_argument("--small", action="store_true", help="the reduced sizes the test suite uses")
    parser.add_argument("--uncoupled", action="store_true", help="zero filters without their BN / consumers")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in ZOO]
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {', '.join(ZOO)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = [
        f"{'Small' if args.small else 'Default-size'} networks, {'un' if args.uncoupled else ''}coupled random "
        f"structured zeros, batch 1, `compact(measure=False, align=1)`; torch {torch.__version__}.",
        "",
        "| network | params | params kept | MACs kept | stored kept | layers lost channels | zero branches cut "
        "| analysis | max abs err | time | left whole (first reasons) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.names or list(ZOO):
        try:
            line = row(name, args.small, not args.uncoupled)
        except Exception as err:  # a failure is a row of the table, not the end of the run
            line = f"| {name} | FAILED: {type(err).__name__}: {str(err)[:200]} |"
        print(line, flush=True)
        lines.append(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

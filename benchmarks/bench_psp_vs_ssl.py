"""PSP vs SSL side by side on the embedded LeNet / MNIST-5k: same model, data, epochs, phases and structures
(filters and input channels of both convs), several seeds; each run trains, prunes, fine-tunes, compacts
(equivalence-checked) and times the compacted model against the dense one in the same process.

    python benchmarks/bench_psp_vs_ssl.py [--seeds 0 1 2] [--out runs/psp_vs_ssl]

Prints a Markdown table (per run and mean ± std per method) and writes it to OUT/table.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from pathlib import Path

from ssl_lightning.pipeline import run

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
METHODS = {"SSL (group lasso)": "lenet_mnist5k_filters.yaml", "PSP": "lenet_mnist5k_psp.yaml"}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/psp_vs_ssl"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for method, recipe in METHODS.items():
            out = args.out / f"{recipe.removesuffix('.yaml')}_seed{seed}"
            overrides = ["--seed_everything", str(seed), "--trainer.default_root_dir", str(out), *QUIET]
            result = run(str(RECIPES / recipe), overrides, out_dir=str(out))
            totals = result.sparsity.totals()
            conv = [s for s in result.sparsity.layers if s.kind == "conv"]
            rows[method].append(
                {
                    "seed": seed,
                    "val_acc": 100 * result.val_acc,
                    "flops": 100 * totals["flop_fraction"],
                    "conv_flops": 100 * sum(s.macs_kept for s in conv) / sum(s.macs for s in conv),
                    "params": 100 * result.compaction[1].params_compact / result.compaction[1].params,
                    "speedup1": result.compaction[1].speedup,
                    "speedup64": result.compaction[max(result.compaction)].speedup,
                }
            )
    lines = [
        "| method | seed | val acc % | FLOP remaining % (all / conv) | params after compact % | speedup batch 1 | "
        "speedup batch 64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, runs in rows.items():
        for r in runs:
            lines.append(
                f"| {method} | {r['seed']:.0f} | {r['val_acc']:.2f} | {r['flops']:.1f} / {r['conv_flops']:.1f} | "
                f"{r['params']:.1f} | {r['speedup1']:.2f}× | {r['speedup64']:.2f}× |"
            )
    for method, runs in rows.items():

        def ms(key: str, runs: list[dict[str, float]] = runs) -> str:
            values = [r[key] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f} ± {sd:.2f}"

        lines.append(
            f"| **{method}, mean ± std** | {len(runs)} seeds | {ms('val_acc')} | {ms('flops')} / {ms('conv_flops')} | "
            f"{ms('params')} | {ms('speedup1')}× | {ms('speedup64')}× |"
        )
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

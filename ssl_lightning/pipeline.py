"""The whole SSL job from one recipe: [dense baseline] → SSL → prune → fine-tune → compact → verify → benchmark
→ report (Markdown + JSON + PNG charts in the run directory, and to W&B when a WandbLogger is configured).

    ssl-lightning run RECIPE [--baseline] [--key value ...]
    ssl-lightning sweep RECIPE --lambda 0.01 0.03 0.1 [--key value ...]

The recipe is a LightningCLI config (the same file ``ssl-lightning fit --config`` takes); ``--key value``
overrides go through LightningCLI too, so typos and wrong types are reported by key. Compaction is
checked for equivalence before anything is reported.
"""

from __future__ import annotations

import copy
import csv
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from ssl_lightning.callback import SparsityCallback
from ssl_lightning.cli import STRICT_PARSER, check_recipe, resolve_recipe
from ssl_lightning.compaction import compact_with_info
from ssl_lightning.groups import weight_of
from ssl_lightning.models import ImageClassifier
from ssl_lightning.report import (
    CompactionReport,
    SparsityReport,
    compaction_report,
    plot_layer_sparsity,
    sparsity_report,
)

__all__ = ["RunResult", "plot_filters", "run", "sweep"]


@dataclass
class RunResult:
    out_dir: Path
    val_acc: float
    baseline_acc: float | None
    sparsity: SparsityReport
    compaction: dict[int, CompactionReport] = field(default_factory=dict)  # batch size -> report
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        t = self.sparsity.totals()
        out: dict[str, Any] = {
            "val_acc": self.val_acc,
            "baseline_val_acc": self.baseline_acc,
            "flop_fraction": t["flop_fraction"],
            "param_fraction": t["param_fraction"],
            "seconds": self.seconds,
        }
        for s in self.sparsity.layers:
            out[f"{s.name}/flop_fraction"] = s.flop_fraction
        for batch, rep in self.compaction.items():
            out[f"speedup_batch{batch}"] = rep.speedup
            out[f"params_compact_fraction_batch{batch}"] = rep.params_compact / rep.params
        return out


def _build(recipe: str, overrides: list[str], root: Path | None = None) -> LightningCLI:
    """The recipe's objects; ``root``: where the trainer writes logs and checkpoints (the recipe's or the
    user's own ``--trainer.default_root_dir`` wins)."""
    first = [f"--trainer.default_root_dir={root}"] if root is not None else []
    with warnings.catch_warnings():  # the recipe and overrides are passed as args on purpose, not a mistake
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        return _cli(recipe, first, overrides)


def _network(model: pl.LightningModule) -> nn.Module:
    """What gets compacted and reported: the ImageClassifier's network, or the user's own LightningModule."""
    return model.model if isinstance(model, ImageClassifier) else model


def _cli(recipe: str, first: list[str], overrides: list[str]) -> LightningCLI:
    from ssl_lightning.cli import model_mode

    return LightningCLI(
        **model_mode(["--config", recipe, *overrides]),
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        parser_kwargs=STRICT_PARSER,
        args=["--config", recipe, *first, *overrides],
    )


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``a/b/c`` keys with plain values (what every logger's hyperparameters take)."""
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    if isinstance(d, list | tuple):
        return {k: v for i, sub in enumerate(d) for k, v in _flat(sub, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): d if isinstance(d, int | float | str | bool | type(None)) else str(d)}


def _group(recipe: str, command: str) -> str:
    """The W&B group that holds every training of one command: recipe, command and start time."""
    return f"{Path(recipe).stem}-{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare_loggers(
    cli: LightningCLI, recipe: str, job: str, group: str, *, keep_id: bool = False, extra: dict[str, Any] | None = None
) -> None:
    """One logger run per training: a W&B run of its own in a shared ``group`` with ``job_type`` = job (a
    baseline and an SSL training, or the λ of a sweep, are runs to compare, not one run whose step restarts and
    whose later records W&B drops), and the resolved recipe (plus ``extra``) as hyperparameters in every logger.
    A fixed run id in the recipe belongs to the training with ``keep_id``; every other gets a fresh one."""
    from lightning.pytorch.loggers import WandbLogger

    config = cli.config.as_dict() if hasattr(cli.config, "as_dict") else dict(cli.config)
    hparams = {"recipe": recipe, "job": job, **_flat({k: v for k, v in config.items() if k != "config"})}
    hparams |= _flat(extra or {})
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:  # not started: its init args still apply
            init = logger._wandb_init
            init["group"] = init.get("group") or group
            init["job_type"] = job
            name = init.get("name") or Path(recipe).stem
            init["name"] = logger._name = f"{name}-{job}"
            if not keep_id:
                init["id"] = logger._id = None
        logger.log_hyperparams(hparams)


def _log_summary(trainer: pl.Trainer, prefix: str, row: dict[str, Any]) -> None:
    """A training's figures (the numbers of its table row) as ``prefix/key`` in every logger, at its last step,
    so W&B's run table compares the runs of one group."""
    metrics = {f"{prefix}/{k}": float(v) for k, v in row.items() if isinstance(v, int | float)}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _finish_loggers(trainer: pl.Trainer) -> None:
    """Close the training's W&B run, so the next training's logger starts a new run instead of reusing it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        logger.save()
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()


def _out_dir(path: str | Path) -> Path:
    """The output directory, created; a clear error when the path is a file or cannot be created."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} cannot be created: {err.strerror or err}") from None
    return out


def _ssl_callback(trainer: pl.Trainer, recipe: str) -> SparsityCallback:
    found = [c for c in trainer.callbacks if isinstance(c, SparsityCallback)]  # type: ignore[attr-defined]
    if len(found) != 1:
        raise ValueError(
            f"{recipe}: a run recipe needs exactly one sparsity callback (StructuredSparsity or "
            f"ParameterizedPruning), found {len(found)}"
        )
    return found[0]


def _val_batch(data: pl.LightningDataModule, n: int) -> Tensor:
    batch = next(iter(data.val_dataloader()))
    x = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"the validation loader must yield tensors (or (x, y) tuples), got {type(x).__name__}")
    return x[:n]


def plot_filters(conv: nn.Conv2d, max_filters: int = 64) -> Any:
    """The first conv layer's filters as an image grid (the paper's Figure 2), RGB uint8 array (H x W x 3).
    Each filter is shown per input channel averaged to grey (RGB when it has 3 input channels)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    w = conv.weight.detach().float().cpu()[:max_filters]
    n = w.shape[0]
    cols = min(n, 10)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4), dpi=100, squeeze=False)
    scale = float(w.abs().max()) or 1.0
    zero = 0
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        f = w[i]
        if f.shape[0] == 3:
            ax.imshow(((f.permute(1, 2, 0) / scale + 1) / 2).clamp(0, 1).numpy())
        else:
            ax.imshow(f.mean(0).numpy(), cmap="gray", vmin=-scale, vmax=scale)
        removed = bool((f == 0).all())  # an all-zero filter: compaction removes it
        zero += removed
        for spine in ax.spines.values():
            spine.set_visible(removed)
            spine.set_color("red")
            spine.set_linewidth(2.5)
        if removed:
            ax.plot([0, 1], [0, 1], color="red", lw=1.5, transform=ax.transAxes)  # a cross over it
            ax.plot([0, 1], [1, 0], color="red", lw=1.5, transform=ax.transAxes)
    fig.suptitle(f"first conv layer: {n - zero} of {n} filters kept (removed ones crossed out in red)", fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]
    plt.close(fig)
    return image


def _save_png(image: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    plt.imsave(path, image)


def run(
    recipe: str, overrides: list[str] | None = None, *, baseline: bool = False, out_dir: str | None = None
) -> RunResult:
    """Run the whole pipeline for ``recipe`` (a LightningCLI YAML) and write the report; returns the figures."""
    overrides = list(overrides or [])
    recipe = resolve_recipe(recipe)
    check_recipe(recipe)
    root = _out_dir(out_dir) if out_dir else None  # before training: a bad --out must not cost the run
    t0 = time.perf_counter()
    group = _group(recipe, "run")
    baseline_acc = None
    if baseline:  # same recipe, same seed, without the SSL callback
        base = _build(recipe, overrides, root / "baseline" if root else None)
        _ssl_callback(base.trainer, recipe)
        base.trainer.callbacks = [c for c in base.trainer.callbacks if not isinstance(c, SparsityCallback)]  # type: ignore[attr-defined]
        _prepare_loggers(base, recipe, "baseline", group)
        base.trainer.fit(base.model, datamodule=base.datamodule)
        baseline_acc = _metric(base.trainer, "val_acc", base.datamodule)
        _finish_loggers(base.trainer)
    main = _build(recipe, overrides, root)
    if root is not None:  # the resolved recipe (overrides applied), as `fit` saves it
        (root / "config.yaml").write_text(main.parser.dump(main.config, skip_none=False))
    trainer, model, data = main.trainer, main.model, main.datamodule
    ssl = _ssl_callback(trainer, recipe)
    _prepare_loggers(main, recipe, "ssl", group, keep_id=True)
    trainer.fit(model, datamodule=data)
    val_acc = _metric(trainer, "val_acc", data)
    net = _network(model).eval()
    out = _out_dir(out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "ssl_run")
    x = _val_batch(data, 64).to(model.device)
    sparsity = sparsity_report(net, x[:1])
    result = RunResult(out, val_acc, baseline_acc, sparsity)
    print("run: compacting the trained model (depth, channels, shapes; checked against the original) ...", flush=True)
    t1 = time.perf_counter()
    info = compact_with_info(net, x)  # raises CompactionError if the compacted model differs
    print(f"run: compacted in {time.perf_counter() - t1:.1f} s; timing dense vs compacted side by side ...", flush=True)
    for batch in sorted({1, len(x)}):
        t1 = time.perf_counter()
        result.compaction[batch] = compaction_report(net, info.model, x[:batch])
        print(
            f"run: batch {batch}: {result.compaction[batch].speedup:.2f}x ({time.perf_counter() - t1:.1f} s)",
            flush=True,
        )
    result.seconds = time.perf_counter() - t0
    _write(result, info, net, ssl, recipe)
    _log(trainer, result)
    print(_summary_text(result, recipe))
    return result


def _metric(trainer: pl.Trainer, key: str, data: pl.LightningDataModule) -> float:
    value = trainer.callback_metrics.get(key)
    if value is None:  # no validation ran during fit (e.g. limit_val_batches=0): validate once now
        trainer.validate(trainer.lightning_module, datamodule=data, verbose=False)
        value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else float("nan")


def _write(result: RunResult, info: Any, net: nn.Module, ssl: SparsityCallback, recipe: str) -> None:
    out = result.out_dir
    _save_png(plot_layer_sparsity(result.sparsity), out / "layer_sparsity.png")
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None:
        _save_png(plot_filters(first), out / "conv1_filters.png")
    data = {
        "recipe": recipe,
        "summary": result.summary(),
        "sparsity": result.sparsity.to_dict(),
        "compaction": {str(b): r.to_dict() for b, r in result.compaction.items()},
        "compacted_layers": info.replaced,
        "depth_removed": [e["module"] for e in info.depth],
        "notes": info.notes,
        "method": ssl.name,
        "strengths": ssl.group_spec(),
        "max_abs_error": info.max_abs_error,
    }
    (out / "report.json").write_text(json.dumps(data, indent=1, default=float))
    lines = [f"# SSL run: `{recipe}`", "", _summary_text(result, recipe), "", "## Per-layer structure", "", "```"]
    lines += [result.sparsity.to_text(), "```", ""]
    for batch, rep in result.compaction.items():
        lines += [f"## Dense vs compacted, batch {batch}", "", rep.to_markdown(), ""]
    lines += ["![per-layer sparsity](layer_sparsity.png)", "", "![first conv layer filters](conv1_filters.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _log(trainer: pl.Trainer, result: RunResult) -> None:
    from lightning.pytorch.loggers import WandbLogger

    _log_summary(trainer, "run", result.summary())
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            for png in ("layer_sparsity.png", "conv1_filters.png"):
                if (result.out_dir / png).exists():
                    logger.log_image(f"run/{png[:-4]}", [str(result.out_dir / png)], step=trainer.global_step)
        logger.save()


def _summary_text(result: RunResult, recipe: str) -> str:
    t = result.sparsity.totals()
    parts = [f"val acc {100 * result.val_acc:.2f} %"]
    if result.baseline_acc is not None:
        parts.append(f"dense baseline {100 * result.baseline_acc:.2f} %")
    parts.append(f"FLOP remaining {100 * t['flop_fraction']:.1f} %")
    conv_flops = [f"{s.name} {100 * s.flop_fraction:.1f} %" for s in result.sparsity.layers if s.kind == "conv"]
    speed = ", ".join(f"batch {b}: {r.speedup:.2f}x" for b, r in result.compaction.items())
    return (
        f"{recipe}: {'; '.join(parts)} (conv FLOP: {', '.join(conv_flops)}); compacted speedup {speed}; "
        f"{result.seconds:.0f} s; report: {result.out_dir / 'report.md'}"
    )


def sweep(
    recipe: str,
    lambdas: list[float],
    overrides: list[str] | None = None,
    *,
    out_dir: str | None = None,
    ratios: dict[str, float] | None = None,
    baseline: bool = False,
) -> Path:
    """Run ``recipe`` once per λ (each group type of its sparsity callback set to λ × its ratio, 1 by default;
    the paper's LeNet shape-wise run used shape λ = 6 × channel λ) and plot accuracy against remaining FLOPs,
    with the dense baseline's accuracy when ``baseline``; writes ``sweep.csv`` and ``sweep.png`` into
    ``out_dir`` and returns it."""
    if not lambdas or any(not (lam >= 0) for lam in lambdas):
        raise ValueError(f"--lambda needs one or more values >= 0, got {lambdas}")
    recipe = resolve_recipe(recipe)
    check_recipe(recipe)
    out = _out_dir(out_dir or "runs/sweep")
    _ssl_callback(_build(recipe, list(overrides or [])).trainer, recipe).set_strength(1.0, ratios)  # check first
    dense_acc = None
    group = _group(recipe, "sweep")
    if baseline:
        base = _build(recipe, list(overrides or []), out / "baseline")
        base.trainer.callbacks = [c for c in base.trainer.callbacks if not isinstance(c, SparsityCallback)]  # type: ignore[attr-defined]
        _prepare_loggers(base, recipe, "baseline", group)
        base.trainer.fit(base.model, datamodule=base.datamodule)
        dense_acc = _metric(base.trainer, "val_acc", base.datamodule)
        _log_summary(base.trainer, "sweep", {"val_acc": dense_acc})
        _finish_loggers(base.trainer)
        print(f"dense baseline: val acc {100 * dense_acc:.2f} %")
    rows = []
    for lam in lambdas:
        cli = _build(recipe, list(overrides or []), out / f"lambda_{lam:g}")
        ssl = _ssl_callback(cli.trainer, recipe)
        ssl.set_strength(lam, ratios)
        _prepare_loggers(cli, recipe, f"lambda_{lam:g}", group, extra={"sweep": {"lambda": lam}})
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        net = copy.deepcopy(_network(cli.model)).eval()
        rep = sparsity_report(net, _val_batch(cli.datamodule, 1).to(cli.model.device))
        rows.append({"lambda": lam, **{f"lambda_{k}": v for k, v in ssl.group_spec().items()},
                     "val_acc": _metric(cli.trainer, "val_acc", cli.datamodule), **rep.totals()})  # fmt: skip
        _log_summary(cli.trainer, "sweep", rows[-1])
        _finish_loggers(cli.trainer)
        print(f"λ={lam:g}: val acc {100 * rows[-1]['val_acc']:.2f} %, FLOP {100 * rows[-1]['flop_fraction']:.1f} %")
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    ax.plot([100 * r["flop_fraction"] for r in rows], [100 * r["val_acc"] for r in rows], "o-", label="SSL")
    for r in rows:  # labels offset in points, inside the margins below: never clipped
        ax.annotate(f"λ={r['lambda']:g}", (100 * r["flop_fraction"], 100 * r["val_acc"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    if dense_acc is not None:
        ax.axhline(100 * dense_acc, color="grey", ls="--", lw=1)
        ax.plot([100], [100 * dense_acc], "s", color="grey", label=f"dense baseline {100 * dense_acc:.2f} %")
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("FLOPs remaining (% of dense)")
    ax.set_ylabel("validation accuracy (%)")
    ratio_text = ", ".join(f"{k} ×{v:g}" for k, v in (ratios or {}).items())
    ax.set_title(f"{Path(recipe).stem}: accuracy vs FLOPs{f' (ratios {ratio_text})' if ratio_text else ''}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "sweep.png")
    plt.close(fig)
    print(f"sweep: {out / 'sweep.csv'}, {out / 'sweep.png'}")
    return out


COMPARE_KEYS = ("recipe", "seeds", "methods")


def _load_compare_spec(path: str) -> tuple[str, list[int], dict[str, dict[str, Any]]]:
    """``recipe`` (relative to the spec), ``seeds`` and ``methods`` (label -> class_path / init_args)."""
    import yaml

    path = resolve_recipe(path)
    check_recipe(path)
    spec = yaml.safe_load(Path(path).read_text())
    unknown = sorted(set(spec) - set(COMPARE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; a compare spec has {', '.join(COMPARE_KEYS)}")
    if "recipe" not in spec or "methods" not in spec:
        raise ValueError(f"{path}: a compare spec needs 'recipe' (the base recipe) and 'methods' (label -> callback)")
    recipe = str((Path(path).parent / spec["recipe"]).resolve())
    check_recipe(recipe)
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of ints, got {seeds!r}")
    methods = spec["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"{path}: methods must map labels to callbacks (class_path, init_args), got {methods!r}")
    for label, cfg in methods.items():
        if not isinstance(cfg, dict) or "class_path" not in cfg or set(cfg) - {"class_path", "init_args"}:
            raise ValueError(f"{path}: methods[{label!r}] must have class_path and optional init_args, got {cfg!r}")
    return recipe, seeds, methods


def _instantiate(label: str, cfg: dict[str, Any]) -> SparsityCallback:
    from lightning.pytorch.cli import instantiate_class

    callback = instantiate_class((), {"class_path": cfg["class_path"], "init_args": cfg.get("init_args") or {}})
    if not isinstance(callback, SparsityCallback):
        raise TypeError(f"methods[{label!r}]: {cfg['class_path']} is not a sparsity callback")
    return callback


def _sparse_speedups(net: nn.Module, x: Tensor) -> dict[int, float]:
    """Dense vs :func:`sparsify` (CSR path for layers at least half zero), side by side, per batch size."""
    import torch

    from ssl_lightning.compaction import SparseConv2d, SparseLinear, sparsify
    from ssl_lightning.timing import interleaved_times

    sparse = sparsify(net, min_sparsity=0.5)
    if not any(isinstance(m, SparseConv2d | SparseLinear) for m in sparse.modules()):
        return {}
    out = {}
    with torch.inference_mode():
        for batch in sorted({1, len(x)}):
            xb = x[:batch]
            fns: dict[str, Callable[[], object]] = {"dense": partial(net, xb), "sparse": partial(sparse, xb)}
            t = interleaved_times(fns, 5)
            out[batch] = t["dense"] / t["sparse"]
    return out


def _evaluate(label: str, seed: int, trainer: pl.Trainer, model: pl.LightningModule, data: Any) -> dict[str, Any]:
    val_acc = _metric(trainer, "val_acc", data)
    net = _network(model).eval()
    x = _val_batch(data, 64).to(model.device)
    sparsity = sparsity_report(net, x[:1])  # each layer's weight also in its cheapest storage encoding
    totals = sparsity.totals()
    stored_bytes, dense_bytes = totals["stored_bytes"], totals["weight_bytes"]
    encodings = "+".join(sorted({s.encoding for s in sparsity.layers}))
    info = compact_with_info(net, x)
    compacted = {b: compaction_report(net, info.model, x[:b]) for b in sorted({1, len(x)})}
    sparse = _sparse_speedups(net, x)
    row: dict[str, Any] = {
        "method": label,
        "seed": seed,
        "val_acc": val_acc,
        "flop_fraction": totals["flop_fraction"],
        "param_fraction": totals["param_fraction"],
        "params_compact_fraction": compacted[1].params_compact / compacted[1].params,
        "storage_bytes": stored_bytes,
        "storage_granularity": encodings,
        "storage_fraction": stored_bytes / dense_bytes,
    }
    for b, rep in compacted.items():
        key = "1" if b == 1 else "64"
        speeds = {"compact": rep.speedup, **({"csr": sparse[b]} if b in sparse else {})}
        path = max(speeds, key=lambda p: speeds[p])
        row[f"speedup_batch{key}"], row[f"path_batch{key}"] = speeds[path], path
    return row


def compare(
    spec: str, overrides: list[str] | None = None, *, seeds: list[int] | None = None, out_dir: str | None = None
) -> Path:
    """Train every method of the compare ``spec`` (YAML: ``recipe``, ``seeds``, ``methods``) on the recipe's
    model, data and epoch budget (the recipe's own sparsity callback replaced by the method's), then report one
    table: accuracy, remaining FLOPs and parameters, storage with indices (each weight in its cheapest encoding:
    dense or its non-zeros at a granularity), and measured CPU speedup at batch 1 and 64 of the better inference
    path (structured ``compact`` or the CSR path of ``sparsify``). Writes ``compare.csv``, ``compare.md`` and
    ``accuracy_vs_speedup.png`` into ``out_dir`` and returns it."""
    recipe, spec_seeds, methods = _load_compare_spec(spec)
    for label, cfg in methods.items():
        _instantiate(label, cfg)  # every method's arguments checked before any training
    out = _out_dir(out_dir or "runs/compare")
    rows = []
    group = _group(recipe, "compare")
    runs = [(s, label) for s in (seeds or spec_seeds) for label in methods]
    for i, (seed, label) in enumerate(runs, 1):
        t0 = time.perf_counter()
        cli = _build(recipe, [*(overrides or []), "--seed_everything", str(seed)], out / f"{label}-seed{seed}")
        _ssl_callback(cli.trainer, recipe)
        others = [c for c in cli.trainer.callbacks if not isinstance(c, SparsityCallback)]  # type: ignore[attr-defined]
        cli.trainer.callbacks = [*others, _instantiate(label, methods[label])]  # type: ignore[attr-defined]
        _prepare_loggers(cli, recipe, f"{label}-seed{seed}", group, extra={"compare": {"method": methods[label]}})
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        rows.append(_evaluate(label, seed, cli.trainer, cli.model, cli.datamodule))
        _log_summary(cli.trainer, "compare", rows[-1])
        _finish_loggers(cli.trainer)
        r = rows[-1]
        print(
            f"[{i}/{len(runs)}] {label} (seed {seed}): val acc {100 * r['val_acc']:.2f} %, FLOP "
            f"{100 * r['flop_fraction']:.1f} %, storage {100 * r['storage_fraction']:.1f} % "
            f"({r['storage_granularity']}), "
            f"speedup {r['speedup_batch1']:.2f}x / {r['speedup_batch64']:.2f}x; {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    _write_compare(out, rows, recipe)
    return out


def _write_compare(out: Path, rows: list[dict[str, Any]], recipe: str) -> None:
    import statistics

    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Method comparison on `{Path(recipe).name}`",
        "",
        "| method | seeds | val acc % | FLOP remaining % | nonzero params % | params after compact % | "
        "storage % of dense (encoding) | speedup batch 1 (path) | speedup batch 64 (path) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]

        def ms(key: str, scale: float = 100.0, mine: list[dict[str, Any]] = mine) -> str:
            values = [scale * r[key] for r in mine]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f}" + (f" ± {sd:.2f}" if len(values) > 1 else "")

        def paths(key: str, mine: list[dict[str, Any]] = mine) -> str:
            return "/".join(sorted({r[key] for r in mine}))

        enc = "/".join(sorted({r["storage_granularity"] for r in mine}))
        lines.append(
            f"| {label} | {len(mine)} | {ms('val_acc')} | {ms('flop_fraction')} | {ms('param_fraction')} | "
            f"{ms('params_compact_fraction')} | {ms('storage_fraction')} ({enc}) | {ms('speedup_batch1', 1)}× "
            f"({paths('path_batch1')}) | {ms('speedup_batch64', 1)}× ({paths('path_batch64')}) |"
        )
        summary.append((label, [r["speedup_batch64"] for r in mine], [100 * r["val_acc"] for r in mine]))
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for label, speed, acc in summary:
        ax.scatter(speed, acc, label=label, s=18)
    ax.set_xlabel("measured CPU speedup, batch 64 (×)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(Path(recipe).name, fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_speedup.png")
    plt.close(fig)


GRANULARITY_LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95)


def granularity_study(
    recipe: str,
    overrides: list[str] | None = None,
    *,
    granularities: list[str] | None = None,
    levels: list[float] | None = None,
    finetune_epochs: int = 3,
    loss_threshold: float = 0.01,
    include: list[str] | None = None,
    value_bits: int = 32,
    index_bits: int = 4,
    out_dir: str | None = None,
) -> Path:
    """Mao et al.'s granularity study on one recipe: train the recipe's model dense once (its sparsity callback
    removed), then for every granularity and sparsity level prune the trained weights one-shot by magnitude and
    fine-tune for ``finetune_epochs``; table (``granularity.csv`` / ``.md``) of accuracy, storage with indices
    (compression against dense) and bytes read per inference, and ``granularity.png``: accuracy vs sparsity per
    granularity, the best compression within ``loss_threshold`` accuracy loss, bytes read vs sparsity."""
    import torch

    from ssl_lightning.methods.granularity import GRANULARITIES, GranularityPruning
    from ssl_lightning.report import storage_report

    recipe = resolve_recipe(recipe)
    check_recipe(recipe)
    granularities = granularities or ["element", "vector", "kernel", "filter"]
    levels = levels or list(GRANULARITY_LEVELS)
    for g in granularities:
        if g not in GRANULARITIES:
            raise ValueError(f"--granularities: unknown granularity {g!r}; allowed: {', '.join(GRANULARITIES)}")
    if not all(0 <= s < 1 for s in levels):
        raise ValueError(f"--levels must be fractions in [0, 1), got {levels}")
    if finetune_epochs < 1:
        raise ValueError(f"--finetune-epochs must be >= 1, got {finetune_epochs}")
    out = _out_dir(out_dir or "runs/granularity")
    overrides = list(overrides or [])

    group = _group(recipe, "granularity")
    dense = _build(recipe, overrides, out / "dense")
    _ssl_callback(dense.trainer, recipe)
    dense.trainer.callbacks = [c for c in dense.trainer.callbacks if not isinstance(c, SparsityCallback)]  # type: ignore[attr-defined]
    _prepare_loggers(dense, recipe, "dense", group)
    print(f"granularity: training the dense model ({dense.trainer.max_epochs} epochs)", flush=True)
    dense.trainer.fit(dense.model, datamodule=dense.datamodule)
    baseline = _metric(dense.trainer, "val_acc", dense.datamodule)
    _log_summary(dense.trainer, "granularity", {"val_acc": baseline})
    _finish_loggers(dense.trainer)
    trained = {k: v.detach().clone() for k, v in dense.model.state_dict().items()}
    # include: names in the LightningModule (what the pruner takes); layers: the same in the network it reports.
    dense_net = _network(dense.model)
    at = next(n for n, m in dense.model.named_modules() if m is dense_net)  # "model" in an ImageClassifier, else ""
    prefix = f"{at}." if at else ""
    convs = include or [f"{prefix}{n}" for n, m in dense_net.named_modules() if isinstance(m, nn.Conv2d)]
    layers = [n.removeprefix(prefix) for n in convs]
    rows: list[dict[str, Any]] = []
    runs = [(g, s) for g in granularities for s in levels]
    for i, (gran, level) in enumerate(runs, 1):
        job = f"{gran}-{100 * level:g}pct"
        cli = _build(recipe, [*overrides, "--trainer.max_epochs", str(finetune_epochs)], out / job)
        cli.model.load_state_dict(trained)
        pruner = GranularityPruning(
            gran, level, phases={"ssl": [0, 1], "finetune": [1, None]}, unit="step", include=convs,
            value_bits=value_bits, index_bits=index_bits,
        )  # fmt: skip
        others = [c for c in cli.trainer.callbacks if not isinstance(c, SparsityCallback)]  # type: ignore[attr-defined]
        cli.trainer.callbacks = [*others, pruner]  # type: ignore[attr-defined]
        _prepare_loggers(cli, recipe, job, group, extra={"granularity": {"granularity": gran, "level": level}})
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        net = _network(cli.model)
        stats = storage_report(net, gran, value_bits=value_bits, index_bits=index_bits, layers=layers)
        dense_bits, stored = sum(s.dense_bits for s in stats), sum(s.stored_bits for s in stats)
        with torch.no_grad():
            weights = [weight_of(m) for n, m in net.named_modules() if n in layers]
            zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
        rows.append(
            {
                "granularity": gran,
                "level": level,
                "weight_sparsity": zeros / total,
                "val_acc": _metric(cli.trainer, "val_acc", cli.datamodule),
                "baseline_val_acc": baseline,
                "compression": dense_bits / stored if stored else float("inf"),
                "bytes_read": stored / 8,
                "dense_bytes": dense_bits / 8,
            }
        )
        _log_summary(cli.trainer, "granularity", rows[-1])
        _finish_loggers(cli.trainer)
        r = rows[-1]
        print(
            f"[{i}/{len(runs)}] {gran} {100 * level:.0f} %: val acc {100 * r['val_acc']:.2f} % (dense "
            f"{100 * baseline:.2f} %), compression {r['compression']:.2f}x, {r['bytes_read'] / 1024:.1f} KiB read",
            flush=True,
        )
    _write_granularity(out, rows, recipe, loss_threshold, index_bits)
    return out


def _write_granularity(
    out: Path, rows: list[dict[str, Any]], recipe: str, loss_threshold: float, index_bits: int
) -> None:
    with open(out / "granularity.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    baseline = rows[0]["baseline_val_acc"]
    lines = [
        f"# Pruning granularity on `{Path(recipe).name}` (dense {100 * baseline:.2f} %, {index_bits}-bit indices)",
        "",
        "| granularity | target | weight sparsity % | val acc % | compression (values + indices) | KiB read |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['granularity']} | {100 * r['level']:.0f} % | {100 * r['weight_sparsity']:.1f} | "
            f"{100 * r['val_acc']:.2f} | {r['compression']:.2f}× | {r['bytes_read'] / 1024:.1f} |"
        )
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["val_acc"] >= baseline - loss_threshold and (
            r["granularity"] not in best or r["compression"] > best[r["granularity"]]["compression"]
        ):
            best[r["granularity"]] = r
    lines += ["", f"Best compression within {100 * loss_threshold:.1f} points of the dense accuracy:", ""]
    lines += ["| granularity | compression | at sparsity % | val acc % |", "|---|---|---|---|"]
    for gran in dict.fromkeys(r["granularity"] for r in rows):
        b = best.get(gran)
        lines.append(
            f"| {gran} | {b['compression']:.2f}× | {100 * b['weight_sparsity']:.1f} | {100 * b['val_acc']:.2f} |"
            if b
            else f"| {gran} | none within the threshold | | |"
        )
    (out / "granularity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=100)
    for gran in dict.fromkeys(r["granularity"] for r in rows):
        mine = [r for r in rows if r["granularity"] == gran]
        axes[0].plot([100 * r["weight_sparsity"] for r in mine], [100 * r["val_acc"] for r in mine], "o-", label=gran)
        axes[2].plot([100 * r["weight_sparsity"] for r in mine], [r["bytes_read"] / 1024 for r in mine], "o-")
    axes[0].axhline(100 * baseline, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="weight sparsity (%)", ylabel="validation accuracy (%)", title="accuracy vs sparsity")
    axes[0].legend(fontsize=7)
    names = list(best)
    axes[1].bar(names, [best[n]["compression"] for n in names])
    axes[1].set(ylabel="compression (×)", title=f"within {100 * loss_threshold:.1f} pt of dense")
    axes[2].set(xlabel="weight sparsity (%)", ylabel="KiB read per inference", title="weights + indices read")
    fig.tight_layout()
    fig.savefig(out / "granularity.png")
    plt.close(fig)

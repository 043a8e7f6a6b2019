"""`ssl-lightning run` / `sweep`: the whole pipeline on the embedded data, a few steps, report files checked."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from ssl_lightning.cli import main

RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "lenet_mnist5k_shapes.yaml")
# Two epochs of 3 steps: SSL from the start, pruned after epoch 1, so every stage runs.
QUICK = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.enable_checkpointing", "false",
         "--trainer.callbacks.init_args.phases", "{ssl: [0, 1], finetune: [1, null]}",
         "--trainer.callbacks.init_args.lambdas", "{shape: 5.0, channel: 5.0}"]  # fmt: skip


def test_run_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    main(["run", RECIPE, "--baseline", "--out", str(out), *QUICK, "--trainer.default_root_dir", str(tmp_path)])
    printed = capsys.readouterr().out.strip().splitlines()
    summary_line = printed[-1]
    assert (
        "val acc" in summary_line and "dense baseline" in summary_line and "compacted speedup batch 1" in summary_line
    )
    progress = [line for line in printed if line.startswith("run: ")]  # the minutes after training are not silent
    assert progress[0].startswith("run: compacting the trained model") and progress[-1].startswith("run: batch 64: ")
    for name in ("report.md", "report.json", "layer_sparsity.png", "conv1_filters.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert 0 <= s["val_acc"] <= 1 and 0 <= s["baseline_val_acc"] <= 1
    assert s["conv2/flop_fraction"] < 1.0  # λ=5 for 3 steps zeroes filter shapes of conv2
    assert s["speedup_batch1"] > 0 and set(report["compaction"]) == {"1", "64"}
    md = (out / "report.md").read_text()
    assert "## Per-layer structure" in md and "| **model** |" in md and "conv1_filters.png" in md


def _wandb_offline(save_dir: Path) -> list[str]:
    """CLI arguments for an offline WandbLogger writing under ``save_dir``."""
    return ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.offline", "true",
            "--trainer.logger.init_args.project", "ssl-run-test"]  # fmt: skip


def _runs_by_job(save_dir: Path, group_prefix: str) -> dict[str, dict[str, Any]]:
    """The offline W&B runs under ``save_dir`` by job type; all of them in one group named after the command,
    each with its own training history (a training logged into another's run would be dropped by W&B)."""
    import wandb

    from .conftest import read_wandb_runs

    wandb.finish()  # the CLI process flushes at exit; in-process, finish the offline run before reading it
    runs = read_wandb_runs(save_dir)
    by_job = {r["job_type"]: r for r in runs}
    assert len(by_job) == len(runs), f"two runs with one job type: {[r['job_type'] for r in runs]}"
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"].startswith(group_prefix), runs[0]["group"]
    for job, r in by_job.items():
        assert r["name"].endswith(f"-{job}") and any("val_acc" in row for row in r["history"]), job
    return by_job


def test_sweep_writes_csv_and_chart_with_ratios_and_the_dense_baseline(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    main(["sweep", RECIPE, "--lambda", "0", "5", "--ratio", "shape=2", "--baseline", "--out", str(out), *QUICK])
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lambda"]) for r in rows] == [0.0, 5.0]
    assert (float(rows[1]["lambda_shape"]), float(rows[1]["lambda_channel"])) == (10.0, 5.0)  # λ × ratio
    assert float(rows[1]["flop_fraction"]) < float(rows[0]["flop_fraction"])  # larger λ, fewer FLOPs
    assert (out / "sweep.png").stat().st_size > 0 and (out / "baseline").is_dir()


def test_sweep_gives_every_training_its_own_wandb_run(tmp_path: Path) -> None:
    import wandb

    wandb.finish()
    out = tmp_path / "sweep"
    main(["sweep", RECIPE, "--lambda", "0", "5", "--baseline", "--out", str(out), *QUICK,
          *_wandb_offline(tmp_path / "wb")])  # fmt: skip
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    # One W&B run per training, its λ in the config and its table row as summary figures.
    runs = _runs_by_job(tmp_path / "wb", "lenet_mnist5k_shapes-sweep-")
    assert sorted(runs) == ["baseline", "lambda_0", "lambda_5"]
    for row in rows:
        run = runs[f"lambda_{float(row['lambda']):g}"]
        assert run["config"]["sweep/lambda"] == float(row["lambda"])
        logged = next(r for r in run["history"] if "sweep/flop_fraction" in r)
        assert logged["sweep/flop_fraction"] == pytest.approx(float(row["flop_fraction"]))
    assert any("sweep/val_acc" in r for r in runs["baseline"]["history"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "recipes/nope.yaml"], "recipe 'recipes/nope.yaml' does not exist"),
        (["sweep", RECIPE], "sweep needs --lambda"),
        (["sweep", RECIPE, "--lambda", "x"], "--lambda values must be numbers"),
        (["sweep", RECIPE, "--lambda", "1", "--ratio", "shape"], "--ratio takes TYPE=NUMBER items"),
        (["sweep", RECIPE, "--lambda", "1", "--ratio", "shape=-1"], "--ratio values must be numbers >= 0"),
        (
            ["run", RECIPE, "--trainer.logger", "NoSuchLogger"],
            "--trainer.logger 'NoSuchLogger' is not a logger; use one of CSVLogger",
        ),
        (["sweep", RECIPE, "--lambda", "1", "--ratio", "filter=2"], "--ratio: 'filter' not among the recipe's"),
        (["run"], "usage: ssl-lightning run RECIPE"),
    ],
)
def test_pipeline_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_run_sends_the_summary_and_charts_to_wandb_offline(tmp_path: Path) -> None:
    import wandb

    from .conftest import read_wandb_history

    wandb.finish()  # a run left open by an earlier test would be reused by WandbLogger and get our records
    main(["run", RECIPE, "--out", str(tmp_path / "run"), *QUICK, *_wandb_offline(tmp_path)])
    wandb.finish()  # the CLI process flushes at exit; in-process, finish the offline run before reading it
    rows = read_wandb_history(tmp_path)
    keys = {k for r in rows for k in r}
    want = {"run/val_acc", "run/speedup_batch1", "run/conv2/flop_fraction"}
    want |= {"run/layer_sparsity/_type", "run/conv1_filters/_type"}  # the PNG charts as W&B images
    assert want <= keys, f"missing {sorted(want - keys)}; logged {sorted(keys)}"


def test_run_baseline_is_its_own_wandb_run_with_hyperparameters_and_everything_lands_under_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from .conftest import read_wandb_runs

    wandb.finish()
    monkeypatch.chdir(tmp_path)  # nothing may be written to the current directory
    out = tmp_path / "out"
    main(["run", RECIPE, "--baseline", "--out", str(out), *QUICK, *_wandb_offline(tmp_path / "wb")])
    wandb.finish()
    runs = read_wandb_runs(tmp_path / "wb")
    assert sorted(r["job_type"] for r in runs) == ["baseline", "ssl"]
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"].startswith("lenet_mnist5k_shapes-")
    assert {r["name"] for r in runs} == {"lenet_mnist5k_shapes-baseline", "lenet_mnist5k_shapes-ssl"}
    for r in runs:  # the resolved recipe in both, the sparsity callback's own arguments in the SSL run
        assert r["config"]["recipe"].endswith("lenet_mnist5k_shapes.yaml") and "model/lr" in r["config"]
    ssl = next(r for r in runs if r["job_type"] == "ssl")["config"]
    assert ssl["ssl"]["callback"] == "StructuredSparsity" and ssl["ssl"]["lambdas"] == {
        "shape": 5.0,
        "channel": 5.0,
    }  # QUICK
    config = (out / "config.yaml").read_text()
    assert "max_epochs: 2" in config and "limit_train_batches: 3" in config  # the overrides, resolved
    assert "StructuredSparsity" in config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wb"]  # no lightning_logs/ in the cwd


class OwnLit(pl.LightningModule):
    """A user's own LightningModule (not an ImageClassifier), given to fit / run by class path."""

    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, width, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(4))
        self.head = torch.nn.Linear(width * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_fit_and_run_take_the_users_own_lightning_module_by_class_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "own.yaml"
    recipe.write_text(
        "model:\n  class_path: tests.test_pipeline.OwnLit\n  init_args: {width: 6}\n"
        "data:\n  class_path: ssl_lightning.data.MNIST5kDataModule\n"
        "trainer:\n  callbacks:\n    - class_path: ssl_lightning.StructuredSparsity\n"
        "      init_args: {lambdas: {filter: 0.5}}\n"
    )
    out = tmp_path / "out"
    main(["run", str(recipe), "--out", str(out), *QUICK[:-2], "--trainer.callbacks.init_args.lambdas", "{filter: 5}"])
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "StructuredSparsity" and "features.0" in {
        s["name"] for s in report["sparsity"]["layers"]
    }
    fast = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    main(["fit", "--model", "tests.test_pipeline.OwnLit", "--model.width", "4", "--data",
          "ssl_lightning.data.MNIST5kDataModule", *fast])  # fmt: skip
    # Mao et al.'s study on the same module: its convs found and pruned by their names in it (no `model.`);
    # every training's logs under --out, one directory each, nothing in the current directory.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    main(["granularity", str(recipe), "--granularities", "filter", "--levels", "0.5", "--finetune-epochs", "1",
          "--out", str(tmp_path / "gran"), *fast[:-2]])  # fmt: skip
    with open(tmp_path / "gran" / "granularity.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["granularity"] == "filter" and float(row["weight_sparsity"]) == pytest.approx(0.5, abs=0.1)
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "gran" / "dense" / "lightning_logs").is_dir()
    assert (tmp_path / "gran" / "filter-50pct" / "lightning_logs").is_dir()


def test_compare_trains_every_method_and_writes_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    spec = tmp_path / "spec.yaml"
    phases = "{ssl: [0, 1], finetune: [1, null]}"
    spec.write_text(
        f"recipe: {recipes / 'lenet_mnist5k_filters.yaml'}\nseeds: [0]\nmethods:\n"
        f"  l1:\n    class_path: ssl_lightning.StructuredSparsity\n"
        f"    init_args: {{lambdas: {{element: 0.5}}, phases: {phases}}}\n"
        f"  kernels:\n    class_path: ssl_lightning.GranularityPruning\n"
        f"    init_args: {{granularity: kernel, sparsity: 0.5, phases: {phases}, include: [model.conv2]}}\n"
    )
    fast = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    wandb.finish()
    monkeypatch.chdir(tmp_path)
    main(["compare", str(spec), "--out", str(tmp_path / "out"), *fast, *_wandb_offline(tmp_path / "wb")])
    printed = capsys.readouterr().out
    assert "[1/2] l1 (seed 0)" in printed and "[2/2] kernels (seed 0)" in printed
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["l1", "kernels"]
    kernels = rows[1]
    assert float(kernels["param_fraction"]) < 1.0  # conv2 lost half its kernels
    assert kernels["path_batch1"] in ("compact", "csr") and float(kernels["speedup_batch64"]) > 0
    assert (tmp_path / "out" / "accuracy_vs_speedup.png").stat().st_size > 0
    assert "| kernels | 1 |" in (tmp_path / "out" / "compare.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "spec.yaml", "wb"]  # nothing else in the cwd
    runs = _runs_by_job(tmp_path / "wb", "lenet_mnist5k_filters-compare-")
    assert sorted(runs) == ["kernels-seed0", "l1-seed0"]
    assert runs["kernels-seed0"]["config"]["compare/method/init_args/granularity"] == "kernel"
    logged = next(r for r in runs["kernels-seed0"]["history"] if "compare/param_fraction" in r)
    assert logged["compare/param_fraction"] == pytest.approx(float(kernels["param_fraction"]))


def test_compare_spec_errors_name_the_key(tmp_path: Path) -> None:
    from ssl_lightning.pipeline import compare

    spec = tmp_path / "spec.yaml"
    spec.write_text("recipe: x.yaml\nmethod: {}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) method; a compare spec has recipe, seeds, methods"):
        compare(str(spec))
    spec.write_text("recipe: ../nowhere.yaml\nmethods: {a: {class_path: ssl_lightning.StructuredSparsity}}\n")
    with pytest.raises(FileNotFoundError, match=r"recipe .*nowhere.yaml' does not exist"):
        compare(str(spec))


def test_granularity_study_runs_every_granularity_and_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import wandb

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "lenet_mnist5k_filters.yaml")
    fast = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    wandb.finish()
    main(["granularity", recipe, "--granularities", "kernel", "filter", "--levels", "0.5", "0.75",
          "--finetune-epochs", "1", "--out", str(tmp_path / "out"), *fast, *_wandb_offline(tmp_path / "wb")])  # fmt: skip
    assert "[4/4] filter 75 %" in capsys.readouterr().out
    with open(tmp_path / "out" / "granularity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["granularity"], float(r["level"])) for r in rows] == [
        ("kernel", 0.5),
        ("kernel", 0.75),
        ("filter", 0.5),
        ("filter", 0.75),
    ]
    for r in rows:  # one-shot pruning held through fine-tuning: each conv lost its target share of groups
        assert abs(float(r["weight_sparsity"]) - float(r["level"])) < 0.03
        assert float(r["compression"]) > 1.5
    assert "Best compression within 1.0 points" in (tmp_path / "out" / "granularity.md").read_text()
    assert (tmp_path / "out" / "granularity.png").stat().st_size > 0
    runs = _runs_by_job(tmp_path / "wb", "lenet_mnist5k_filters-granularity-")
    assert sorted(runs) == ["dense", "filter-50pct", "filter-75pct", "kernel-50pct", "kernel-75pct"]
    assert runs["kernel-75pct"]["config"]["granularity/level"] == 0.75
    assert any("granularity/compression" in r for r in runs["kernel-75pct"]["history"])
    with pytest.raises(SystemExit):
        main(["granularity", recipe, "--granularities", "block"])
    assert "--granularities: unknown granularity 'block'; allowed: element, vector" in capsys.readouterr().err


def test_help_lists_every_command_and_each_pipeline_command_has_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    top = capsys.readouterr().out
    for command in ("fit", "validate", "run", "sweep", "compare", "granularity", "lenet_mnist5k_shapes"):
        assert command in top
    main(["run", "lenet_mnist5k_shapes", "--help"])  # the recipe is not trained: help only
    run_help = capsys.readouterr().out
    assert run_help.startswith("usage: ssl-lightning run RECIPE [--baseline] [--out DIR]") and "--baseline" in run_help
    main(["compare", "--help"])
    assert "usage: ssl-lightning compare SPEC [--seeds" in capsys.readouterr().out

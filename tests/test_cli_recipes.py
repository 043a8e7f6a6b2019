"""Every recipe parses and runs a few steps through the CLI on data in its real on-disk format."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_lightning import ParameterizedPruning, StructuredSparsity
from ssl_lightning.cli import cli

from .test_data_formats import write_cifar

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]  # fmt: skip


@pytest.mark.parametrize(
    "recipe", ["lenet_mnist5k_shapes.yaml", "lenet_mnist5k_filters.yaml", "mlp_mnist5k_neurons.yaml"]
)
def test_embedded_data_recipes_run(tmp_path: Path, recipe: str) -> None:
    run = cli(["fit", "--config", str(RECIPES / recipe), *FAST, "--trainer.default_root_dir", str(tmp_path)])
    assert run.trainer.global_step == 3
    (ssl,) = [c for c in run.trainer.callbacks if isinstance(c, StructuredSparsity)]
    assert ssl.groups and ssl.schedule.ssl_start == 2


def test_psp_recipe_runs_through_fit_and_run(tmp_path: Path) -> None:
    from ssl_lightning.pipeline import run as run_pipeline

    recipe = str(RECIPES / "lenet_mnist5k_psp.yaml")
    fit = cli(["fit", "--config", recipe, *FAST, "--trainer.default_root_dir", str(tmp_path)])
    (psp,) = [c for c in fit.trainer.callbacks if isinstance(c, ParameterizedPruning)]
    assert {g.kind for g in psp.groups} == {"filter", "channel"} and psp.structures == {"filter": 0.1, "channel": 0.1}
    assert fit.trainer.global_step == 3
    assert not any("alpha" in n for n, _ in fit.model.named_parameters())  # folded when fit ended
    result = run_pipeline(recipe, [*FAST, "--trainer.default_root_dir", str(tmp_path)], out_dir=str(tmp_path / "r"))
    report = (tmp_path / "r" / "report.json").read_text()
    assert '"method": "ParameterizedPruning"' in report and result.compaction


@pytest.mark.parametrize("recipe", ["convnet_cifar10.yaml", "resnet20_cifar10_depth.yaml", "resnet20_cifar10_psp.yaml"])
def test_cifar_recipes_run_on_cifar_batches(tmp_path: Path, recipe: str) -> None:
    write_cifar(tmp_path / "cifar", 10, n=8)
    args = ["fit", "--config", str(RECIPES / recipe), *FAST, "--trainer.default_root_dir", str(tmp_path)]
    run = cli([*args, "--data.init_args.root", str(tmp_path / "cifar"), "--data.init_args.batch_size", "4"])
    assert run.trainer.global_step == 3
    (ssl,) = [c for c in run.trainer.callbacks if isinstance(c, StructuredSparsity | ParameterizedPruning)]
    if recipe == "resnet20_cifar10_depth.yaml":
        assert {g.kind for g in ssl.groups} == {"depth"} and len(ssl.groups) == 9
    if recipe == "resnet20_cifar10_psp.yaml":
        assert {g.kind for g in ssl.groups} == {"channel"} and len(ssl.groups) == 21  # 19 convs, 2 shortcut projections


def test_imagenet_recipe_runs_on_an_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "img" / split / c / "x.png")
    args = [
        "fit",
        "--config",
        str(RECIPES / "alexnet_imagenet.yaml"),
        *FAST,
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    overrides = ["--data.init_args.root", str(tmp_path / "img"), "--data.init_args.batch_size", "2",
                 "--data.init_args.num_workers", "0", "--model.num_classes", "2",
                 "--model.model.init_args.num_classes", "2"]  # fmt: skip
    run = cli([*args, *overrides])
    assert run.trainer.global_step == 1  # 2 training images in batches of 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.lrr", "0.1"], "unrecognized arguments: --model.lrr 0.1"),
        (["--model.lr", "fast"], "Parser key \"model.lr\": Expected a <class 'float'>. Got value: fast"),
        (["--model.model.class_path", "ssl_lightning.models.LeNett"], "has no attribute 'LeNett'"),
    ],
)
@pytest.mark.parametrize("command", ["fit", "run"])
def test_recipe_typos_are_one_line_errors(
    command: str, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssl_lightning.cli import main

    recipe = str(RECIPES / "lenet_mnist5k_shapes.yaml")
    argv = ["fit", "--config", recipe, *extra] if command == "fit" else ["run", recipe, *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssl-lightning: error:") and message in err[0], err


def test_every_recipe_is_tested() -> None:
    tested = {
        "lenet_mnist5k_shapes.yaml",
        "lenet_mnist5k_filters.yaml",
        "mlp_mnist5k_neurons.yaml",
        "convnet_cifar10.yaml",
        "resnet20_cifar10_depth.yaml",
        "lenet_mnist5k_psp.yaml",
        "resnet20_cifar10_psp.yaml",
        "alexnet_imagenet.yaml",
    }
    assert {p.name for p in RECIPES.glob("*.yaml")} == tested


def test_user_errors_are_one_line_without_a_stack_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssl_lightning.cli import main

    args = ["fit", "--config", str(RECIPES / "convnet_cifar10.yaml"), *FAST,
            "--data.init_args.root", str(tmp_path / "no-cifar-here"), "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssl-lightning: error:") and "no-cifar-here" in err and "CIFAR-10 python batches" in err
    with pytest.raises(FileNotFoundError, match="no-cifar-here"):
        main([*args, "--verbose"])

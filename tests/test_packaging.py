"""Packaging facts users rely on: one version source, and PEP 561's marker shipped with the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ssl_lightning

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def test_the_version_comes_from_pyproject() -> None:
    declared = re.search(r'^version = "([^"]+)"', PYPROJECT, re.MULTILINE)
    assert declared is not None and ssl_lightning.__version__ == declared.group(1)
    init = (ROOT / "ssl_lightning" / "__init__.py").read_text()
    assert re.search(r'__version__ = "\d+\.\d+', init) is None  # no second, hand-kept release number


def test_the_package_is_typed_for_its_users() -> None:
    assert (Path(ssl_lightning.__file__).parent / "py.typed").is_file()
    assert re.search(r'^ssl_lightning = \["py.typed", "recipes/\*.yaml"', PYPROJECT, re.MULTILINE)


def test_shipped_recipes_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from ssl_lightning.cli import main, resolve_recipe, shipped_recipes

    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    assert {"lenet_mnist5k_shapes", "lenet_mnist5k_psp", "compare/lenet_mnist5k"} <= set(shipped_recipes())
    path = Path(resolve_recipe("lenet_mnist5k_shapes"))
    assert path.is_file() and path.parent == Path(ssl_lightning.__file__).parent / "recipes"
    assert resolve_recipe("recipes/lenet_mnist5k_psp.yaml") == str(path.with_name("lenet_mnist5k_psp.yaml"))
    with pytest.raises(SystemExit):
        main(["run", "lenet_mnist5k_shape"])
    assert "recipe 'lenet_mnist5k_shape' does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"or the name of a shipped recipe: alexnet_imagenet, compare/lenet"):
        resolve_recipe("nope")
    main(["fit", "--config", "lenet_mnist5k_shapes", "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
                "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert (tmp_path / "lightning_logs").is_dir()  # trained from the recipe found by name

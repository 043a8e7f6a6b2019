"""The embedded MNIST 5k data and the README's main job (shortened)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_lightning.data import MNIST5kDataModule, load_mnist5k
from ssl_lightning.demo import main


def test_mnist5k_is_real_balanced_data() -> None:
    images, labels = load_mnist5k()
    assert images.shape == (5000, 1, 28, 28) and labels.shape == (5000,)
    assert torch.bincount(labels).tolist() == [500] * 10
    assert images.min() >= 0 and images.max() <= 1 and images.mean() > 0.05


def test_split_is_deterministic_and_stratified() -> None:
    a, b = MNIST5kDataModule(val_per_class=50, seed=3), MNIST5kDataModule(val_per_class=50, seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert torch.bincount(a.val_set.tensors[1]).tolist() == [50] * 10 and len(a.train_set) == 4500


def test_malformed_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "mnist.csv.gz"
    with gzip.open(bad, "wt") as fh:
        np.savetxt(fh, np.zeros((3, 10)), delimiter=",")
    with pytest.raises(ValueError, match=r"mnist.csv.gz: expected rows of 784 pixel values and a label"):
        load_mnist5k(bad)
    with pytest.raises(ValueError, match=r"val_per_class must be in 1\.\.499"):
        MNIST5kDataModule(val_per_class=500)


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = main(
        ["--epochs-dense", "0", "--epochs-ssl", "1", "--epochs-finetune", "1", "--lam", "0.1", "--out", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    assert "conv2" in printed and "validation accuracy" in printed and "inference batch 64" in printed
    assert out["val_acc"] > 0.5 and out["flop_fraction"] < 1.0
    assert out["speedup_b1"] > 0 and out["speedup_b64"] > 0  # measured, so no threshold on a shared machine
    assert list(tmp_path.rglob("metrics.csv"))

"""On-disk readers and DataModules on tiny files the tests write in each standard format."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_lightning.data import (
    CIFARDataModule,
    ImageFolderDataModule,
    ImageFolderDataset,
    MNISTDataModule,
    load_cifar,
    load_mnist_idx,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(root: Path, n: int = 12, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = write_mnist(tmp_path, gz=gz)
    x, y = load_mnist_idx(tmp_path, train=True)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images.astype(np.uint8)))
    assert torch.equal(y, torch.from_numpy(labels))
    dm = MNISTDataModule(tmp_path, batch_size=4)
    dm.setup()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.shape == (4,)


def test_mnist_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory: expected the MNIST IDX files"):
        load_mnist_idx(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\] not found: expected the MNIST image"):
        load_mnist_idx(tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match=r"bad: not an IDX file \(bad magic number 01020304"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match=r"short: IDX header promises \(10,\) \(10 bytes\) but 3 bytes follow"):
        read_idx(short)


def write_cifar(root: Path, num_classes: int, n: int = 6) -> None:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), key: list(rng.integers(0, num_classes, n))}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_batches_load_and_augment(tmp_path: Path, num_classes: int) -> None:
    write_cifar(tmp_path, num_classes)
    x, y = load_cifar(tmp_path, train=True, num_classes=num_classes)
    assert x.shape == ((30 if num_classes == 10 else 6), 3, 32, 32) and x.dtype == torch.uint8
    assert int(y.max()) < num_classes
    dm = CIFARDataModule(tmp_path, num_classes=num_classes, batch_size=3)
    dm.setup()
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape == (3, 3, 32, 32) and abs(float(xb.mean())) < 1.0
    xa, _ = dm.train_set[0]
    plain = dm.val_set.tensors[0]
    assert xa.shape == (3, 32, 32) and plain.shape[1:] == (3, 32, 32)


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_batch_1 not found: expected a CIFAR-10 python batch"):
        load_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR-10 python batch"):
        load_cifar(tmp_path)
    with pytest.raises(ValueError, match="num_classes must be 10 or 100 for CIFAR, got 7"):
        load_cifar(tmp_path, num_classes=7)
    with pytest.raises(ValueError, match="num_classes must be 10 or 100, got 7"):
        CIFARDataModule(tmp_path, num_classes=7)


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 30), color).save(tmp_path / split / c / "a.png")
    ds = ImageFolderDataset(tmp_path / "train", size=16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    x, label = ds[1]
    assert x.shape == (3, 16, 16) and label == 1 and float(x[2].mean()) == pytest.approx(1.0)
    dm = ImageFolderDataModule(tmp_path, size=16, batch_size=2)
    dm.setup()
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1]
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"garbage")
    broken = ImageFolderDataset(tmp_path / "train", size=16)
    with pytest.raises(ValueError, match=r"broken.jpg: not a readable image"):
        broken[[p.name for p, _ in broken.samples].index("broken.jpg")]
    with pytest.raises(FileNotFoundError, match=r"expected one sub-folder of images per class"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no class sub-folders found"):
        ImageFolderDataset(tmp_path / "empty")


def test_sklearn_digits_default() -> None:
    from ssl_lightning.data import Digits8x8DataModule

    dm = Digits8x8DataModule(val_fraction=0.2)
    dm.setup()
    x, _ = dm.train_set.tensors
    assert x.shape[1:] == (1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert torch.bincount(dm.val_set.tensors[1]).min() >= 30  # stratified
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        Digits8x8DataModule(val_fraction=1.5)

"""Readers for the standard on-disk image-classification formats (nothing is ever downloaded).

- MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte`` ..., optionally ``.gz``)
- CIFAR-10 / CIFAR-100 "python version" pickle batches (``data_batch_1`` ... / ``train``, ``test``)
- an ImageNet-style tree: ``root/<class name>/<image>`` (JPEG, PNG, ... through Pillow)

Every reader raises ``FileNotFoundError`` / ``ValueError`` naming the file and the format it expected.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageFolderDataset", "load_cifar", "load_mnist_idx", "read_idx"]

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


def _find(root: Path, stem: str, what: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root / stem}[.gz] not found: expected the {what}")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``0x0000`` magic, type byte, rank byte, big-endian sizes, data), plain or gzipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected an IDX file")
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        except (OSError, EOFError) as err:  # gzip.BadGzipFile, a truncated stream
            raise ValueError(f"{path}: not a complete gzip file ({err}); give the plain or a whole .gz file") from None
    else:
        data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()}; expected 0000 + type + rank)")
    rank = data[3]
    if len(data) < 4 + 4 * rank:
        raise ValueError(
            f"{path}: IDX header truncated ({len(data)} bytes; rank {rank} needs {4 + 4 * rank} for the sizes)"
        )
    dims = struct.unpack(f">{rank}I", data[4 : 4 + 4 * rank])
    dtype = _IDX_TYPES[data[2]]
    body = data[4 + 4 * rank :]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: IDX header promises {dims} ({expected} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def load_mnist_idx(root: str | Path, train: bool = True) -> tuple[Tensor, Tensor]:
    """Images float32 [N, 1, H, W] in [0, 1] and labels int64 [N] from the MNIST IDX files in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: expected the MNIST IDX files there")
    prefix = "train" if train else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte", "MNIST image IDX file"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte", "MNIST label IDX file"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{root}: MNIST images {images.shape} and labels {labels.shape} disagree (expected N x H x W and N)"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_cifar(root: str | Path, train: bool = True, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] from CIFAR-10 / CIFAR-100 python batches in ``root``."""
    root = Path(root)
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: expected the CIFAR-{num_classes} python batches there")
    if num_classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key = b"labels"
    else:
        names = ["train" if train else "test"]
        label_key = b"fine_labels"
    xs, ys = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a CIFAR-{num_classes} python batch")
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[label_key], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: not a CIFAR-{num_classes} python batch (a pickled dict with b'data' N x 3072 uint8 and "
                f"{label_key!r}): {err}"
            ) from err
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"{path}: expected data N x 3072 and N labels, got {data.shape} and {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """``root/<class>/<image>`` images as float32 [3, size, size] in [0, 1] (shorter side resized to ``size``,
    then center-cropped) with the class index in sorted class-name order."""

    def __init__(self, root: str | Path, size: int = 224) -> None:
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory: expected one sub-folder of images per class")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root}: no class sub-folders found (expected root/<class>/<image>)")
        self.samples = [
            (f, i)
            for i, c in enumerate(self.classes)
            for f in sorted((self.root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise ValueError(f"{self.root}: no images with suffixes {IMAGE_SUFFIXES} under the class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as src:
                rgb = src.convert("RGB")
            w, h = rgb.size
            scale = self.size / min(w, h)
            rgb = rgb.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))))
            left, top = (rgb.size[0] - self.size) // 2, (rgb.size[1] - self.size) // 2
            rgb = rgb.crop((left, top, left + self.size, top + self.size))
            arr = np.asarray(rgb, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: not a readable image ({err})") from err
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label

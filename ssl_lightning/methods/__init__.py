"""Sparsity methods: what happens to the groups around each optimizer step and how pruning decides. The shared
machinery (phases, masks, checkpoints, logging, compaction) lives in the callback; see
:mod:`ssl_lightning.methods.base`."""

from ssl_lightning.methods.base import SparsityMethod
from ssl_lightning.methods.group_lasso import GroupLasso

__all__ = ["GroupLasso", "SparsityMethod"]

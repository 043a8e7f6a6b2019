"""Sparsity methods, one module each, on the shared callback base :class:`ssl_lightning.callback.SparsityCallback`:

- :mod:`~ssl_lightning.methods.group_lasso`: SSL's group lasso (:class:`GroupLasso`, :class:`StructuredSparsity`)
- :mod:`~ssl_lightning.methods.psp`: Parameterized Structured Pruning (:class:`ParameterizedPruning`)
- :mod:`~ssl_lightning.methods.granularity`: magnitude pruning at a granularity, Mao et al. 2017
  (:class:`GranularityPruning`)

The seam a method implements is :class:`~ssl_lightning.methods.base.SparsityMethod`.
"""

from ssl_lightning.methods.base import SparsityMethod
from ssl_lightning.methods.granularity import GranularityPruning, MagnitudePruning
from ssl_lightning.methods.group_lasso import GroupLasso, StructuredSparsity
from ssl_lightning.methods.psp import PSP, ParameterizedPruning

__all__ = [
    "PSP",
    "GranularityPruning",
    "GroupLasso",
    "MagnitudePruning",
    "ParameterizedPruning",
    "SparsityMethod",
    "StructuredSparsity",
]

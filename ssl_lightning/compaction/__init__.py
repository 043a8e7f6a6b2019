"""Compaction: turn learned zero groups into a smaller, faster model, equivalence-checked.

Stages, on a deep copy of the model (the original is untouched), in :mod:`~ssl_lightning.compaction.stages`:

0. depth removal (:mod:`~ssl_lightning.compaction.depth`): a residual branch whose weights are all zero is
   cut out of its block, its constant output kept as a per-channel buffer;
1. channel removal (:mod:`~ssl_lightning.compaction.channels`): channels that every consumer ignores or that
   are a foldable constant are sliced out of their producers, BN / depthwise / PReLU layers and consumers,
   across residual adds, concatenations and flatten→Linear, with the constants folded into the consumers'
   biases;
2. every remaining ``nn.Conv2d`` whose lowered weight still has all-zero rows (filters) or columns
   (filter-shape fibers) becomes a drop-in :class:`CompactConv2d` (full-width output), and every
   ``nn.Linear`` with all-zero input columns a :class:`CompactLinear`
   (:mod:`~ssl_lightning.compaction.layers`), unless the dense layer measures as fast on the layer's input and
   little is removed. Which implementation a compacted conv runs is decided where it runs (first inference
   call per input shape, or a cost model), never stored; :func:`pin_kernels` fixes choices for deployment.

The result is checked against the original on the example and random inputs; a mismatch raises
:class:`CompactionError` naming the first layer that differs. :mod:`~ssl_lightning.compaction.plans` saves and
re-applies the structure (plans, the checkpoint mixin); :mod:`~ssl_lightning.compaction.optim_state` carries
optimizer state through a compaction. Irregular (ℓ1) sparsity has its own inference path:
:func:`~ssl_lightning.compaction.sparse.sparsify` (CSR weights × lowered input).
"""

from ssl_lightning.compaction.channels import ChannelPlan, PaddedFoldConv2d, SparseChannelLRN
from ssl_lightning.compaction.layers import (
    CompactConv2d,
    CompactLinear,
    autotune_enabled,
    kernel_choices,
    modeled_choice,
    pin_kernels,
    set_autotune,
)
from ssl_lightning.compaction.optim_state import transfer_optimizer_state
from ssl_lightning.compaction.plans import (
    CHECKPOINT_KEY,
    PLAN_VERSION,
    STATE_DICT_KEY,
    CompactionCheckpointing,
    apply_compaction_plan,
    compaction_plan,
    compaction_plans,
    restore_compaction,
)
from ssl_lightning.compaction.sparse import SparseConv2d, SparseLinear, sparsify
from ssl_lightning.compaction.stages import CompactionError, CompactionResult, compact, compact_with_info

__all__ = [
    "CHECKPOINT_KEY",
    "PLAN_VERSION",
    "STATE_DICT_KEY",
    "ChannelPlan",
    "CompactConv2d",
    "CompactLinear",
    "CompactionCheckpointing",
    "CompactionError",
    "CompactionResult",
    "PaddedFoldConv2d",
    "SparseChannelLRN",
    "SparseConv2d",
    "SparseLinear",
    "apply_compaction_plan",
    "autotune_enabled",
    "compact",
    "compact_with_info",
    "compaction_plan",
    "compaction_plans",
    "kernel_choices",
    "modeled_choice",
    "pin_kernels",
    "restore_compaction",
    "set_autotune",
    "sparsify",
    "transfer_optimizer_state",
]

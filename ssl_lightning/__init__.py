"""Structured Sparsity Learning for PyTorch Lightning.

Public API: the callbacks :class:`StructuredSparsity` (SSL's group lasso), :class:`ParameterizedPruning` (PSP)
and :class:`GranularityPruning` (magnitude pruning at a granularity); :func:`build_groups`,
:func:`sparsity_report`, the penalty functions in :mod:`ssl_lightning.penalty`, schedules in
:mod:`ssl_lightning.schedules`, compiled ops in :mod:`ssl_lightning.ops`, and compaction: :func:`compact` /
:func:`compact_with_info` (depth, channel and shape removal, equivalence-checked), :func:`compaction_report`,
:class:`CompactConv2d`, :class:`CompactLinear`, plans (:func:`compaction_plan`, :func:`apply_compaction_plan`)
and :class:`CompactionCheckpointing`.
"""

from importlib import metadata as _metadata

from ssl_lightning.compaction import (
    CompactConv2d,
    CompactionCheckpointing,
    CompactionError,
    CompactLinear,
    apply_compaction_plan,
    compact,
    compact_with_info,
    compaction_plan,
    compaction_plans,
    restore_compaction,
    sparsify,
)
from ssl_lightning.groups import GROUP_TYPES, Group, Member, build_groups
from ssl_lightning.methods import GranularityPruning, ParameterizedPruning, StructuredSparsity
from ssl_lightning.report import CompactionReport, SparsityReport, compaction_report, sparsity_report
from ssl_lightning.schedules import PhaseSchedule
from ssl_lightning.timing import interleaved_times, settle_allocator

__all__ = [
    "GROUP_TYPES",
    "CompactConv2d",
    "CompactLinear",
    "CompactionCheckpointing",
    "CompactionError",
    "CompactionReport",
    "GranularityPruning",
    "Group",
    "Member",
    "ParameterizedPruning",
    "PhaseSchedule",
    "SparsityReport",
    "StructuredSparsity",
    "apply_compaction_plan",
    "build_groups",
    "compact",
    "compact_with_info",
    "compaction_plan",
    "compaction_plans",
    "compaction_report",
    "interleaved_times",
    "restore_compaction",
    "settle_allocator",
    "sparsify",
    "sparsity_report",
]
try:  # one version source: pyproject.toml, through the installed distribution's metadata
    __version__ = _metadata.version("ssl_lightning")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

r"""Magnitude pruning at a chosen granularity (Mao, Han, Pool, Li, Liu, Wang, Dally 2017, arXiv 1705.08922).

Granularities (the group types of :mod:`ssl_lightning.groups` they use):

    element  0-D: single weights                   (``element``)
    vector   1-D: one kernel row W[n, c, kh, :]     (``vector``)
    kernel   2-D: one kernel W[n, c]                (``kernel2d``)
    filter   3-D: one filter W[n]                   (``filter``)
    channel  an input channel W[:, c] (per conv-group bank)   (``channel``)
    shape    a GEMM column W[:, c, kh, kw]          (``shape``)

Criterion: a group's importance is its RMS weight ‖w_g‖₂ / sqrt(|g|), the L2 norm normalised by the group size
(Mao et al. rank by magnitude; normalising by size makes groups of different layers comparable for the
``global`` scope). The least important groups are pruned (masked and frozen, like SSL's prune) until the
pruned fraction reaches the schedule's target (:func:`ssl_lightning.schedules.sparsity_target`: one-shot,
iterative or the gradual cubic schedule of Zhu & Gupta 2017), per layer or over all selected layers. A group
pruned once stays pruned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from typing_extensions import override

from ssl_lightning.callback import SparsityCallback, _check_choice, _check_number
from ssl_lightning.groups import GRANULARITIES, Group, Selector
from ssl_lightning.methods.base import SparsityMethod
from ssl_lightning.penalty import keep_masks
from ssl_lightning.report import check_bits, encoded_bits
from ssl_lightning.schedules import PRUNE_SCHEDULES, PhaseSchedule, sparsity_target

__all__ = ["GRANULARITIES", "GranularityPruning", "MagnitudePruning"]


class MagnitudePruning(SparsityMethod):
    """Prunes the least important groups of each family (``scope="layer"``) or of all families together
    (``"global"``) to the schedule's target; a family's ``lam`` holds its final target fraction."""

    name = "magnitude"
    label = "magnitude pruning"

    def __init__(
        self,
        schedule: PhaseSchedule,
        kind: str = "one_shot",
        scope: Literal["layer", "global"] = "layer",
        cycles: int = 3,
        frequency: int = 1,
        value_bits: int = 32,
        index_bits: int = 4,
    ) -> None:
        self.schedule, self.kind, self.scope, self.cycles, self.frequency = schedule, kind, scope, cycles, frequency
        self.value_bits, self.index_bits = value_bits, index_bits
        self._applied = -1.0  # the fraction (of the schedule's final) last applied

    def fraction(self, t: int) -> float:
        """The schedule's progress at clock ``t`` as a multiple of the final target (0 .. 1)."""
        return sparsity_target(self.schedule, t, 1.0, self.kind, cycles=self.cycles, frequency=self.frequency)

    @staticmethod
    def importance(group: Group) -> Tensor:
        """RMS weight of every group, fp32 [num_groups]."""
        return group.norms() / math.sqrt(group.group_size)

    def _pruned_now(self, group: Group) -> Tensor:
        """Bool [num_groups]: groups whose every member slice is already masked out."""
        masks = self.current_masks
        if any(m.name not in masks for m in group.members):
            return torch.zeros(group.num_groups, dtype=torch.bool)
        dead = [~m.view(masks[m.name].cpu()).any(dim=m.reduce_dims).reshape(-1) for m in group.members]
        return torch.stack(dead).all(0)

    def masks_for(self, groups: Sequence[Group], fraction: float) -> dict[str, Tensor]:
        """Keep-masks pruning ``fraction`` × each family's target (``lam``), rounded to the nearest group."""
        scores = []
        for g in groups:
            s = self.importance(g).cpu()
            scores.append(torch.where(self._pruned_now(g), torch.full_like(s, -1.0), s))  # pruned stay pruned
        keeps: list[Tensor] = []
        if self.scope == "global":
            flat = torch.cat(scores) if scores else torch.zeros(0)
            k = round(fraction * groups[0].lam * flat.numel()) if groups else 0
            keep = torch.ones(flat.numel(), dtype=torch.bool)
            keep[torch.sort(flat, stable=True).indices[:k]] = False
            keeps = list(keep.split([g.num_groups for g in groups]))
        else:
            for g, s in zip(groups, scores, strict=True):
                k = round(fraction * g.lam * g.num_groups)
                keep = torch.ones(g.num_groups, dtype=torch.bool)
                keep[torch.sort(s, stable=True).indices[:k]] = False
                keeps.append(keep)
        return keep_masks(groups, keeps)

    @override
    def masks_at(self, groups: Sequence[Group], t: int) -> dict[str, Tensor] | None:
        fraction = self.fraction(t)
        if fraction <= self._applied or fraction == 0.0:
            return None
        self._applied = fraction
        return self.masks_for(groups, fraction)

    @override
    def prune_masks(self, groups: Sequence[Group], threshold: float) -> dict[str, Tensor]:
        self._applied = 1.0
        return self.masks_for(groups, 1.0)

    @override
    def zero_groups(self, group: Group) -> Tensor:
        return group.norms() == 0

    @override
    def metrics(self, groups: Sequence[Group], prefix: str, scale: float) -> dict[str, float]:
        """Targets, and the storage of each layer at this granularity: compression against dense (kept values
        + relative indices with fillers, see :func:`~ssl_lightning.report.index_storage`) and bytes read."""
        out = {f"{prefix}/target_fraction": max(self._applied, 0.0)}
        dense = stored = 0
        for g in groups:
            layer = g.modules[0]
            out[f"{prefix}/{layer}/{g.kind}_target"] = max(self._applied, 0.0) * g.lam
            values, indices, _ = encoded_bits((g.norms() > 0).cpu(), g.group_size, self.value_bits, self.index_bits)
            bits = values + indices
            numel = g.num_groups * g.group_size
            dense, stored = dense + numel * self.value_bits, stored + bits
            out[f"{prefix}/{layer}/compression"] = numel * self.value_bits / bits if bits else float("inf")
            out[f"{prefix}/{layer}/bytes_read"] = bits / 8
        if groups:
            out[f"{prefix}/total/compression"] = dense / stored if stored else float("inf")
            out[f"{prefix}/total/bytes_read"] = stored / 8
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self._applied}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._applied = float(state.get("applied", -1.0))


class GranularityPruning(SparsityCallback):
    r"""Magnitude pruning at one granularity (see :mod:`ssl_lightning.methods.granularity`).

    Args:
        granularity: ``element`` (0-D), ``vector`` (1-D kernel row), ``kernel`` (2-D), ``filter`` (3-D),
            ``channel`` or ``shape``. ``element`` applies to Conv2d and Linear layers, the others to Conv2d
            layers (Linear layers in the selection are left alone).
        sparsity: final fraction of groups pruned in every selected layer, in [0, 1).
        layer_sparsity: regex (full match on module names) -> final fraction for those layers.
        scope: ``"layer"`` (each layer reaches its fraction) or ``"global"`` (the least important groups of all
            selected layers together, by size-normalised magnitude, reach ``sparsity``).
        schedule: ``"one_shot"`` (prune once when the ``ssl`` phase ends), ``"iterative"`` (``cycles`` prune →
            fine-tune cycles over the ``ssl`` phase) or ``"gradual"`` (cubic, every ``frequency`` clock units).
        value_bits, index_bits: storage widths for the logged compression and bytes read (kept values and
            relative indices with fillers, see :func:`~ssl_lightning.report.index_storage`).
        phases: ``{"dense": [0, a], "ssl": [a, b], "finetune": [b, None]}``; ``ssl`` is the pruning window and
            must end (at ``b`` the final sparsity holds).
        include, exclude, unit, finetune_lr_factor, log_every_n_steps, log_histograms, compact_at_end,
            compact_batch, compact_align, compact_when: as for :class:`~ssl_lightning.StructuredSparsity`.
    """

    log_prefix = "granularity"
    _strength = "sparsity (layer_sparsity)"

    def __init__(
        self,
        granularity: str,
        sparsity: float,
        *,
        layer_sparsity: Mapping[str, float] | None = None,
        scope: Literal["layer", "global"] = "layer",
        schedule: Literal["one_shot", "iterative", "gradual"] = "one_shot",
        cycles: int = 3,
        frequency: int = 1,
        value_bits: int = 32,
        index_bits: int = 4,
        phases: Mapping[str, Sequence[int | None]] | None = None,
        include: Sequence[Selector] | None = None,
        exclude: Sequence[Selector] = (),
        unit: Literal["epoch", "step"] = "epoch",
        finetune_lr_factor: float = 1.0,
        log_every_n_steps: int = 50,
        log_histograms: bool = True,
        compact_at_end: str | None = None,
        compact_batch: int = 32,
        compact_align: int | Literal["auto"] = "auto",
        compact_when: Literal["fit_end", "prune"] = "fit_end",
    ) -> None:
        _check_choice("granularity", granularity, tuple(GRANULARITIES))
        _check_fraction("sparsity", sparsity)
        for pattern, value in (layer_sparsity or {}).items():
            _check_fraction(f"layer_sparsity[{pattern!r}]", value)
        _check_choice("scope", scope, ("layer", "global"))
        _check_choice("schedule", schedule, PRUNE_SCHEDULES)
        if not isinstance(cycles, int) or isinstance(cycles, bool) or cycles < 1:
            raise ValueError(f"cycles must be an int >= 1, got {cycles!r}")
        if not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1:
            raise ValueError(f"frequency must be an int >= 1 ({unit}s), got {frequency!r}")
        check_bits("value_bits", value_bits)
        check_bits("index_bits", index_bits)
        if scope == "global" and layer_sparsity:
            raise ValueError("layer_sparsity sets per-layer targets, which scope='global' does not have; use one")
        phases = phases or {}
        if "ssl" not in phases or phases["ssl"][1] is None:
            raise ValueError(
                "phases must give the pruning window as an 'ssl' interval with an end, e.g. "
                f"{{'dense': [0, 2], 'ssl': [2, 8], 'finetune': [8, None]}}; got {dict(phases)!r}"
            )
        kind = GRANULARITIES[granularity]
        self._init_shared(
            include=include,
            exclude=exclude,
            layer_lambdas={p: {kind: v} for p, v in (layer_sparsity or {}).items()},
            couple=False,
            depth_blocks=None,
            scale_by_group_size=False,
            phases=phases,
            unit=unit,
            lambda_schedule="constant",
            warmup=0,
            prune_threshold=0.0,
            finetune_lr_factor=finetune_lr_factor,
            log_every_n_steps=log_every_n_steps,
            log_histograms=log_histograms,
            compact_at_end=compact_at_end,
            compact_batch=compact_batch,
            compact_align=compact_align,
            compact_when=compact_when,
        )
        self.granularity, self.sparsity, self.scope = granularity, sparsity, scope
        self.group_type = kind
        self.sparsity_method: MagnitudePruning = MagnitudePruning(
            self.schedule, schedule, scope, cycles, frequency, value_bits, index_bits
        )

    def group_spec(self) -> dict[str, float]:
        return {self.group_type: self.sparsity}

    def set_strength(self, value: float, ratios: Mapping[str, float] | None = None) -> None:
        if ratios:
            raise ValueError(f"--ratio: GranularityPruning has one sparsity target ({self.granularity!r}), no ratios")
        _check_fraction("sparsity", value)
        self.sparsity = value

    def _build_groups(self, pl_module: LightningModule, spec: Mapping[str, float]) -> list[Group]:
        try:
            return super()._build_groups(pl_module, spec)
        except ValueError as err:  # name this callback's arguments
            msg = str(err).replace(f"lambdas: group type {self.group_type!r}", f"granularity {self.granularity!r}")
            raise ValueError(msg.replace("layer_lambdas", "layer_sparsity")) from None


def _check_fraction(arg: str, value: object) -> None:
    _check_number(arg, value)
    if value >= 1:  # type: ignore[operator]
        raise ValueError(f"{arg} must be a fraction in [0, 1), got {value!r}")

"""The seam between the sparsity callbacks and a sparsity method.

The callback (:class:`~ssl_lightning.callback.SparsityCallback`) owns what every method shares: phases and
schedules, the groups, prune/freeze masks as buffers, checkpoint state, rank-0 decisions, logging, non-finite
checks, optimizer groups for a method's own parameters, and compaction. A method says only

- what it does to the groups around an optimizer step while its phase is active (:meth:`before_step`,
  :meth:`after_step`),
- which extra parameters it owns (:meth:`attach`, :meth:`owned_parameters`, :meth:`anchors`) and how they go
  back into the weights at the end (:meth:`finish`),
- which groups it prunes during the sparsity phase (:meth:`masks_at`) and at the prune boundary
  (:meth:`prune_masks`), and which count as zero now
  (:meth:`zero_groups`), and what it logs (:meth:`metrics`, :meth:`histograms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ssl_lightning.groups import Group
from ssl_lightning.penalty import group_masks

__all__ = ["SparsityMethod"]


class SparsityMethod:
    """Base method: no regularization; prunes groups whose RMS weight is at or below the threshold.

    Step hooks get the groups the current optimizer updates (each group exactly once per optimizer step) and the
    schedule's strength factor for the step.
    """

    name = "none"
    label = "the sparsity method"  # how errors name what acts on the weights
    #: the callback's keep-masks by parameter name, set by the callback before each pruning call
    current_masks: Mapping[str, Tensor] = {}

    def attach(self, module: nn.Module, groups: Sequence[Group]) -> None:
        """Called once the groups exist, before a checkpoint is restored: create the method's own parameters."""

    def owned_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        """The method's own parameters by qualified name in ``module`` (they get their own optimizer groups)."""
        del module
        return {}

    def anchors(self) -> dict[int, tuple[Tensor, float]]:
        """id(owned parameter) -> (the weight whose optimizer group it joins, its full-strength weight decay)."""
        return {}

    def finish(self, module: nn.Module) -> None:
        """Fold the method's own parameters into the weights: afterwards ``module`` is a plain model with its
        original ``state_dict`` keys and the same outputs."""

    def before_step(self, groups: Sequence[Group], scale: float) -> None:
        """Gradients are final (unscaled, accumulated, clipped), the optimizer has not stepped yet."""

    def after_step(
        self, groups: Sequence[Group], params: Sequence[Tensor], scale: float, lr_of: Callable[[Tensor], float]
    ) -> None:
        """The optimizer has stepped; ``lr_of(param)`` is the learning rate it used for ``param``."""

    def masks_at(self, groups: Sequence[Group], t: int) -> dict[str, Tensor] | None:
        """Called before every training batch of the sparsity phase with the clock ``t``: new keep-masks to
        install now (pruning during the phase, e.g. a gradual schedule), or None for no change."""
        del groups, t
        return None

    def prune_masks(self, groups: Sequence[Group], threshold: float) -> dict[str, Tensor]:
        """Keep-masks by parameter name (bool, parameter-shaped) taken at the prune boundary."""
        return group_masks(groups, threshold)

    def zero_groups(self, group: Group) -> Tensor:
        """Bool [num_groups]: which groups of the family are off now (logged as ``<type>_sparsity``)."""
        return group.norms() == 0

    def metrics(self, groups: Sequence[Group], prefix: str, scale: float) -> dict[str, float]:
        """The method's own scalar figures."""
        del groups, prefix, scale
        return {}

    def histograms(self, groups: Sequence[Group]) -> dict[str, Tensor]:
        """Name -> values to show as a histogram (W&B); by default each family's group norms."""
        return {g.name: g.norms() for g in groups}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

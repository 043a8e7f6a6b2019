"""The seam between the sparsity callback and a sparsity method.

The callback owns what every method shares: phases and schedules, the groups, prune/freeze masks as buffers,
checkpoint state, rank-0 decisions, logging, non-finite checks and compaction. A method says only what it does
to the groups around an optimizer step while its phase is active, and which groups it prunes at the prune
boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ssl_lightning.groups import Group
from ssl_lightning.penalty import group_masks

__all__ = ["SparsityMethod"]


class SparsityMethod:
    """Base method: no regularization; prunes groups whose RMS weight is at or below the threshold.

    Hooks get the groups the current optimizer updates (each group exactly once per optimizer step) and the
    schedule's λ factor for the step.
    """

    name = "none"

    def before_step(self, groups: Sequence[Group], scale: float) -> None:
        """Gradients are final (unscaled, accumulated, clipped), the optimizer has not stepped yet."""

    def after_step(
        self, groups: Sequence[Group], params: Sequence[Tensor], scale: float, lr_of: Callable[[Tensor], float]
    ) -> None:
        """The optimizer has stepped; ``lr_of(param)`` is the learning rate it used for ``param``."""

    def prune_masks(self, groups: Sequence[Group], threshold: float) -> dict[str, Tensor]:
        """Keep-masks by parameter name (bool, parameter-shaped) taken at the prune boundary."""
        return group_masks(groups, threshold)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

"""Group lasso (Wen et al., 2016), the method of :class:`~ssl_lightning.StructuredSparsity`.

``"proximal"``: after each optimizer step the group soft-threshold w_g ← w_g·max(0, 1 − lr·λ/‖w_g‖) (exact
zeros). ``"gradient"``: the paper's form, λ·w_g/‖w_g‖ added to the gradient before the step, then weights with
|w| < ``zero_threshold`` are zeroed (the original code's element zero-out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from ssl_lightning.groups import Group
from ssl_lightning.methods.base import SparsityMethod
from ssl_lightning.penalty import add_group_lasso_grad_, proximal_step_, zero_small_

__all__ = ["GroupLasso"]

FORMS = ("proximal", "gradient")


class GroupLasso(SparsityMethod):
    name = "group_lasso"

    def __init__(self, form: Literal["proximal", "gradient"] = "proximal", zero_threshold: float = 0.0) -> None:
        if form not in FORMS:
            raise ValueError(f"method must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
        self.form, self.zero_threshold = form, zero_threshold

    def before_step(self, groups: Sequence[Group], scale: float) -> None:
        if self.form == "gradient":
            add_group_lasso_grad_(groups, scale)

    def after_step(
        self, groups: Sequence[Group], params: Sequence[Tensor], scale: float, lr_of: Callable[[Tensor], float]
    ) -> None:
        if self.form == "proximal":
            proximal_step_(groups, scale, lr_of)
        zero_small_(params, self.zero_threshold)

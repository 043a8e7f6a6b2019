"""The method seam: the callback calls its method before / after each optimizer step of the SSL phase with the
groups that optimizer updates, and asks it for the prune masks; group lasso is the first method."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from ssl_lightning import StructuredSparsity
from ssl_lightning.groups import Group
from ssl_lightning.methods import GroupLasso, SparsityMethod

from .conftest import Module, loader, trainer


class Recording(SparsityMethod):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], float]] = []

    def before_step(self, groups: Sequence[Group], scale: float) -> None:
        self.calls.append(("before", tuple(g.name for g in groups), scale))

    def after_step(
        self, groups: Sequence[Group], params: Sequence[Tensor], scale: float, lr_of: Callable[[Tensor], float]
    ) -> None:
        assert all(lr_of(p) == pytest.approx(0.05) for p in params)
        self.calls.append(("after", tuple(g.name for g in groups), scale))

    def prune_masks(self, groups: Sequence[Group], threshold: float) -> dict[str, Tensor]:
        self.calls.append(("prune", tuple(g.name for g in groups), threshold))
        return {m.name: torch.ones_like(m.param, dtype=torch.bool) for g in groups for m in g.members}


def test_the_callback_drives_its_method_in_the_ssl_phase_only(tmp_path: Path) -> None:
    cb = StructuredSparsity(
        {"filter": 0.1}, phases={"dense": [0, 1], "ssl": [1, 2], "finetune": [2, None]}, prune_threshold=0.25
    )
    assert isinstance(cb.sparsity_method, GroupLasso) and cb.sparsity_method.form == "proximal"
    method = cb.sparsity_method = Recording()
    trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(Module(), loader(n=32, batch=16))  # 2 steps per epoch
    kinds = [c[0] for c in method.calls]
    assert kinds == ["before", "after", "before", "after", "prune"]  # epoch 1 only, then the prune
    names = set(method.calls[0][1])
    assert names == {g.name for g in cb.groups} and method.calls[-1][2] == 0.25


def test_group_lasso_forms() -> None:
    assert GroupLasso("gradient").form == "gradient"
    with pytest.raises(ValueError, match="method must be one of 'proximal', 'gradient', got 'l2'"):
        GroupLasso("l2")  # type: ignore[arg-type]
    assert StructuredSparsity({"filter": 0.1}, method="gradient").sparsity_method.zero_threshold == 1e-4


def test_the_methods_state_travels_in_the_callbacks_checkpoint_state() -> None:
    class Counting(SparsityMethod):
        def __init__(self) -> None:
            self.steps = 0

        def state_dict(self) -> dict[str, int]:
            return {"steps": self.steps}

        def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
            self.steps = state.get("steps", 0)

    saved = StructuredSparsity({"filter": 0.1})
    saved.sparsity_method = Counting()
    saved.sparsity_method.steps = 7  # type: ignore[attr-defined]
    state = saved.state_dict()
    restored = StructuredSparsity({"filter": 0.1})
    restored.sparsity_method = Counting()
    restored.load_state_dict(state)
    assert restored.sparsity_method.steps == 7  # type: ignore[attr-defined]
    earlier = {k: v for k, v in state.items() if k != "method"}  # a checkpoint written before the seam
    StructuredSparsity({"filter": 0.1}).load_state_dict(earlier)

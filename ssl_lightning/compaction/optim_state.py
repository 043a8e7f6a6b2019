"""Optimizer state across a compaction: the optimizers follow the compacted parameters, and their per-parameter
state (SGD momentum, Adam moments) is sliced, packed and folded by the same plan as the weights."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssl_lightning.compaction.plans import apply_compaction_plan, compaction_plan

__all__ = ["transfer_optimizer_state"]


def transfer_optimizer_state(
    optimizers: Sequence[torch.optim.Optimizer], root: nn.Module, name: str, dense: nn.Module, compacted: nn.Module
) -> None:
    """After ``root.<name>`` was replaced by ``compacted`` (made from ``dense`` by :func:`compact`), point every
    optimizer at the compacted parameters and carry their per-parameter state (SGD momentum, Adam moments)
    through the same compaction plan: the state tensors are sliced, packed and folded exactly like the weights,
    so fine-tuning continues where it was. A parameter the compaction created (a folded bias) starts with
    zero state in the param group of its layer's weight."""
    plan = compaction_plan(compacted)
    prefix = f"{name}." if name else ""
    old_named = {prefix + n: p for n, p in dense.named_parameters()}
    new_named = {prefix + n: p for n, p in compacted.named_parameters()}
    old_ids = {id(p): n for n, p in old_named.items()}

    def counterpart(n: str) -> str | None:  # the old parameter a new one continues (wrappers add ".conv.")
        for cand in (n, n.replace(".conv.", ".")):
            if cand in old_named:
                return cand
        return None

    for opt in optimizers:
        group_of = {
            old_ids[id(p)]: gi for gi, g in enumerate(opt.param_groups) for p in g["params"] if id(p) in old_ids
        }
        if not group_of:
            continue
        keys = {
            k
            for n in group_of
            for k, v in opt.state.get(old_named[n], {}).items()
            if isinstance(v, Tensor) and v.shape == old_named[n].shape
        }
        shadows: dict[str, dict[str, Tensor]] = {}
        for k in sorted(keys):  # one shadow model per state tensor kind, compacted by the same plan
            shadow = copy.deepcopy(dense)
            with torch.no_grad():
                for n, p in shadow.named_parameters():
                    st = opt.state.get(old_named[prefix + n], {}).get(k)
                    p.copy_(st if isinstance(st, Tensor) and st.shape == p.shape else torch.zeros_like(p))
            apply_compaction_plan(shadow, plan)
            shadows[k] = {prefix + n: p.detach() for n, p in shadow.named_parameters()}
        default = min(group_of.values())
        added: dict[int, list[Tensor]] = {}
        new_state: dict[Tensor, dict[str, Any]] = {}
        for n, p in new_named.items():
            old = counterpart(n)
            if old is None:  # a folded bias: the group of its layer's weight
                sibling = counterpart(n.rsplit(".", 1)[0] + ".weight")
                if sibling is not None and sibling not in group_of:
                    continue  # its layer is not optimized (frozen): neither is the new bias
                gi = group_of[sibling] if sibling is not None else default
            elif old in group_of:
                gi = group_of[old]
            else:
                continue  # not optimized before: stays that way
            added.setdefault(gi, []).append(p)
            state: dict[str, Any] = {}
            for k, v in (opt.state.get(old_named[old], {}) if old else {}).items():
                if k in shadows:
                    state[k] = shadows[k][n].clone().to(p)
                elif isinstance(v, Tensor):
                    state[k] = v.clone()  # scalars such as Adam's step
                else:
                    state[k] = v
            if state:
                new_state[p] = state
        for p in old_named.values():
            opt.state.pop(p, None)
        opt.state.update(new_state)
        for gi, group in enumerate(opt.param_groups):
            group["params"] = [p for p in group["params"] if id(p) not in old_ids] + added.get(gi, [])

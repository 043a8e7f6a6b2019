"""Group-lasso penalty, its gradient, the proximal step and pruning masks. Pure torch, no Lightning.

All norms are computed in fp32 whatever the parameter dtype (AMP / bf16 safe). Functions take a
``scale`` (the schedule's λ factor for the current step) multiplying each family's ``lam``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ssl_lightning.groups import Group, family_sq_sums

__all__ = [
    "add_group_lasso_grad_",
    "apply_masks_",
    "group_lasso",
    "group_masks",
    "keep_masks",
    "mask_grads_",
    "proximal_step_",
    "zero_small_",
]


def _checked_norms(group: Group) -> Tensor:
    norms = group.norms()
    if not torch.isfinite(norms).all():
        bad = int((~torch.isfinite(norms)).sum())
        raise FloatingPointError(
            f"{bad} group norm(s) of {group.name} are NaN/inf: the weights diverged. Lower the learning rate "
            "or λ, enable gradient clipping, or check the input data; SSL will not continue on non-finite weights."
        )
    return norms


def _flat_norms(groups: Sequence[Group]) -> tuple[Tensor, list[int]]:
    """Norms of every family concatenated into one fp32 vector (so the per-group arithmetic of all
    families is a handful of vector ops), with one finiteness check for all of them."""
    sizes = [g.num_groups for g in groups]
    flat = torch.cat([n.to(groups[0].members[0].param.device) for n in family_sq_sums(groups)]).sqrt_()
    if not bool(torch.isfinite(flat).all()):
        for g in groups:
            _checked_norms(g)  # raises, naming the first bad family
    return flat, sizes


def _per_family(values: Sequence[float], sizes: list[int], like: Tensor) -> Tensor:
    """Expand one scalar per family to one value per group, aligned with :func:`_flat_norms`."""
    return torch.repeat_interleave(torch.tensor(values, dtype=like.dtype), torch.tensor(sizes)).to(like.device)


def _inverse(norms: Tensor) -> Tensor:
    """1/‖w_g‖ with 0 for zero groups (the subgradient the paper uses at 0)."""
    return torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))


def group_lasso(groups: Iterable[Group], scale: float = 1.0) -> Tensor:
    """Σ_families λ·scale·Σ_g ‖w_g‖ as an fp32 scalar (for logging; not part of the autograd graph)."""
    total = torch.zeros((), dtype=torch.float32)
    for g in groups:
        total = total + g.lam * scale * _checked_norms(g).sum().cpu()
    return total


def add_group_lasso_grad_(groups: Sequence[Group], scale: float = 1.0) -> None:
    """``p.grad += λ·scale·w/‖w_g‖`` for every member (the paper's gradient form; 0 on zero groups).

    Call once per optimizer step, after gradients are final (unscaled, accumulated): the penalty is a
    per-step term, not per micro-batch.
    """
    active = [g for g in groups if g.lam * scale != 0]
    if not active:
        return
    flat, sizes = _flat_norms(active)
    inv_all = _inverse(flat).mul_(_per_family([g.lam * scale for g in active], sizes, flat))
    for g, inv in zip(active, inv_all.split(sizes), strict=True):
        for m in g.members:
            grad = m.param.grad
            if grad is None:
                continue
            w = m.view(m.param.detach())
            f = m.per_group(inv.to(device=grad.device, dtype=grad.dtype))

            def add(v: Tensor, w: Tensor = w, f: Tensor = f) -> None:
                v.addcmul_(w.to(v.dtype), f)  # grad += w · λ/‖w_g‖

            m.update_(grad, add)


def proximal_step_(groups: Sequence[Group], scale: float, lr_of: Callable[[Tensor], float]) -> None:
    """Group soft-threshold after an optimizer step: w_g ← w_g·max(0, 1 − lr·λ·scale/‖w_g‖).

    Groups whose norm is below lr·λ become exactly zero. ``lr_of(param)`` gives the learning rate the
    optimizer used for ``param``; a coupled family uses the rate of its first member.
    """
    active = [g for g in groups if g.lam * scale != 0]
    if not active:
        return
    with torch.no_grad():
        flat, sizes = _flat_norms(active)
        t = _per_family([lr_of(g.members[0].param) * g.lam * scale for g in active], sizes, flat)
        # max(0, 1 - t/‖w‖); t > 0, so zero norms give -inf -> 0
        factors = torch.div(t, flat).neg_().add_(1).clamp_(min=0).split(sizes)
        for g, factor in zip(active, factors, strict=True):
            for m in g.members:
                f = m.per_group(factor if factor.device == m.param.device else factor.to(m.param.device))
                if m.param.dtype != f.dtype:
                    f = f.to(m.param.dtype)

                def shrink(v: Tensor, f: Tensor = f) -> None:
                    v.mul_(f)

                m.update_(m.param, shrink)  # in no_grad: edits the parameter in place


def zero_small_(params: Iterable[Tensor], threshold: float) -> None:
    """The original SSL code's element zero-out: |w| < threshold → 0, after every update."""
    if threshold <= 0:
        return
    with torch.no_grad():
        for p in params:
            p.masked_fill_(p.abs() < threshold, 0)


def group_masks(groups: Sequence[Group], threshold: float) -> dict[str, Tensor]:
    """Keep-masks (bool, parameter-shaped) that prune every group whose RMS weight ‖w_g‖/sqrt(|g|)
    is at or below ``threshold`` (so exactly-zero groups are always pruned). Families on the same
    tensor combine with AND. Keys are the members' qualified parameter names.
    """
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    return keep_masks(groups, [_checked_norms(g) / math.sqrt(g.group_size) > threshold for g in groups])


def keep_masks(groups: Sequence[Group], keeps: Sequence[Tensor]) -> dict[str, Tensor]:
    """Parameter-shaped bool masks from one keep flag per group (``keeps[i]``: [num_groups] of ``groups[i]``);
    families on the same tensor combine with AND. Keys are the members' qualified parameter names."""
    masks: dict[str, Tensor] = {}
    for g, keep in zip(groups, keeps, strict=True):
        for m in g.members:
            mask = masks.setdefault(m.name, torch.ones_like(m.param, dtype=torch.bool))
            k = m.per_group(keep.to(mask.device))

            def keep_only(v: Tensor, k: Tensor = k) -> None:
                v.logical_and_(k)

            m.update_(mask, keep_only)
    return masks


def apply_masks_(params: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Zero every masked-out weight in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))


def mask_grads_(params: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Zero gradients of masked-out weights, so momentum and Adam moments never move them."""
    with torch.no_grad():
        for name, mask in masks.items():
            grad = params[name].grad
            if grad is not None:
                grad.mul_(mask.to(grad.dtype))

"""Penalty: gradient form, proximal step exactness, masks, fp32 norms, non-finite detection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_lightning.groups import build_groups
from ssl_lightning.penalty import (
    add_group_lasso_grad_,
    apply_masks_,
    group_lasso,
    group_masks,
    mask_grads_,
    proximal_step_,
    zero_small_,
)


def two_convs(scale_first: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    with torch.no_grad():
        model[0].weight[:3] *= scale_first  # make three filters tiny
    return model


def test_gradient_form_matches_definition_and_is_zero_on_zero_groups() -> None:
    model = two_convs()
    with torch.no_grad():
        model[0].weight[1] = 0
    w = model[0].weight
    w.grad = torch.zeros_like(w)
    (group,) = build_groups(model, {"filter": 0.5}, include=["0"])
    add_group_lasso_grad_([group], scale=2.0)
    for n in range(6):
        norm = w[n].detach().norm()
        expected = torch.zeros_like(w[n]) if norm == 0 else 0.5 * 2.0 * w[n].detach() / norm
        torch.testing.assert_close(w.grad[n], expected)


def test_group_lasso_value() -> None:
    model = two_convs()
    groups = build_groups(model, {"filter": 0.5, "shape": 0.25})
    expected = sum(g.lam * g.norms().sum() for g in groups) * 3.0
    torch.testing.assert_close(group_lasso(groups, 3.0), expected)


def test_proximal_step_zeros_small_groups_exactly_and_shrinks_the_rest() -> None:
    model = two_convs(scale_first=1e-3)
    w = model[0].weight
    before = w.detach().clone()
    (group,) = build_groups(model, {"filter": 1.0}, include=["0"])
    norms = group.norms()
    lr, lam = 0.1, 1.0
    t = lr * lam
    assert (norms[:3] < t).all() and (norms[3:] > t).all()
    proximal_step_([group], scale=1.0, lr_of=lambda p: lr)
    assert torch.equal(w[:3].detach(), torch.zeros_like(w[:3]))  # exact zeros, not "small"
    for n in range(3, 6):
        torch.testing.assert_close(w[n].detach(), before[n] * (1 - t / norms[n]))


def test_proximal_step_on_coupled_group_moves_all_members_together() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3))
    with torch.no_grad():
        model[0].weight[2] *= 1e-4
        model[0].bias[2] = 1e-4
        model[1].weight[2] = 1e-4
        model[1].bias[2] = 0
        model[2].weight[:, 2] *= 1e-4
    (group,) = [g for g in build_groups(model, {"filter": 1.0}, couple=True) if g.modules == ("0",)]
    proximal_step_([group], 1.0, lambda p: 0.01)
    assert model[0].weight[2].abs().sum() == 0 and model[0].bias[2] == 0 and model[1].weight[2] == 0
    assert model[2].weight[:, 2].abs().sum() == 0
    assert model[0].weight[1].abs().sum() > 0 and model[2].weight[:, 1].abs().sum() > 0


def test_group_masks_prune_below_rms_threshold_and_combine_types() -> None:
    model = two_convs(scale_first=1e-5)
    groups = build_groups(model, {"filter": 1.0, "shape": 1.0}, include=["0"])
    with torch.no_grad():
        model[0].weight[:, 1, 0, 0] = 0  # one column
    masks = group_masks(groups, threshold=1e-4)
    mask = masks["0.weight"]
    assert not mask[:3].any() and mask[3:, 0].all()
    assert not mask[:, 1, 0, 0].any()
    apply_masks_({"0.weight": model[0].weight}, masks)
    assert torch.equal(model[0].weight.detach() == 0, ~mask)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    mask_grads_({"0.weight": model[0].weight}, masks)
    assert torch.equal(model[0].weight.grad != 0, mask)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got -1"):
        group_masks(groups, -1)


def test_norms_are_fp32_for_low_precision_weights() -> None:
    model = two_convs().to(torch.bfloat16)
    (group,) = build_groups(model, {"shape": 1.0}, include=["0"])
    norms = group.norms()
    assert norms.dtype == torch.float32
    ref = model[0].weight.detach().float().reshape(1, 6, 27).norm(dim=1).flatten()
    torch.testing.assert_close(norms, ref)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    add_group_lasso_grad_([group], 1.0)
    assert model[0].weight.grad.dtype == torch.bfloat16 and model[0].weight.grad.abs().sum() > 0


def test_channels_last_weights_are_updated_in_place() -> None:
    model = two_convs(scale_first=1e-3).to(memory_format=torch.channels_last)
    w = model[0].weight
    assert not w.is_contiguous()
    (group,) = build_groups(model, {"filter": 1.0}, include=["0"])
    proximal_step_([group], 1.0, lambda p: 0.1)
    assert w[:3].abs().sum() == 0 and w[3:].abs().sum() > 0
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_non_finite_norm_raises_with_advice() -> None:
    model = two_convs()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    groups = build_groups(model, {"filter": 1.0}, include=["0"])
    with pytest.raises(FloatingPointError, match=r"1 group norm\(s\) of 0:filter are NaN/inf.*Lower the learning rate"):
        proximal_step_(groups, 1.0, lambda p: 0.1)
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        group_lasso(groups)


def test_zero_small_elements() -> None:
    p = torch.tensor([1e-5, -2e-5, 1e-3, -1.0])
    zero_small_([p], 1e-4)
    assert p.tolist() == [0.0, 0.0, pytest.approx(1e-3), -1.0]

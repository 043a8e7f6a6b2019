"""A channel-wise layer (BN, depthwise conv, PReLU) after a concatenation (DenseNet): its channels for each joined
space start at that space's offset. Until plans and coupled groups follow the offsets, those spaces are kept
whole: compaction must not crash or change outputs, and couple=True must never tie a filter to the BN channel of
another concatenated input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning import build_groups, compact
from ssl_lightning.graph import analyze


class DenseJoin(nn.Module):
    """conv_a (24 ch) and conv_b (40 ch) concatenated, then a channel-wise layer over all 64, then a conv."""

    def __init__(self, channelwise: str) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 24, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 40, 3, padding=1)
        self.norm: nn.Module = {
            "bn": nn.BatchNorm2d(64),
            "depthwise": nn.Conv2d(64, 64, 3, padding=1, groups=64),
            "prelu": nn.PReLU(64),
        }[channelwise]
        self.head = nn.Conv2d(64, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.norm(torch.cat([self.conv_a(x), self.conv_b(x)], 1))))


@pytest.mark.parametrize("channelwise", ["bn", "depthwise", "prelu"])
def test_compaction_after_a_concatenation_keeps_outputs(channelwise: str) -> None:
    torch.manual_seed(0)
    model = DenseJoin(channelwise).eval()
    with torch.no_grad():
        model.conv_a.weight[:10] = 0  # zero filters on both sides of the concatenation
        model.conv_a.bias[:10] = 0
        model.conv_b.weight[5:9] = 0
        model.conv_b.bias[5:9] = 0
        if channelwise == "bn":  # running statistics that differ per channel, so a shifted slice shows
            model.norm.running_mean.copy_(torch.linspace(-1, 1, 64))
            model.norm.running_var.copy_(torch.linspace(0.5, 2, 64))
    x = torch.randn(2, 3, 8, 8)
    compacted = compact(model, x)  # used to raise "running_mean should contain 64 elements not 24"
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), model(x), rtol=1e-5, atol=1e-5)
    reasons = [r for sp in analyze(model).spaces for r in sp.blocked]
    assert any("is channel-wise over a concatenation" in r for r in reasons)


def test_coupled_groups_never_tie_a_filter_to_another_inputs_bn_channels() -> None:
    model = DenseJoin("bn")
    groups = build_groups(model, {"filter": 1.0}, couple=True)
    for g in groups:
        assert not any(m.name.startswith("norm.") for m in g.members), g.name  # no BN slice at a wrong offset
    by_layer = {g.modules: g for g in groups}
    assert by_layer[("conv_a",)].num_groups == 24 and by_layer[("conv_b",)].num_groups == 40

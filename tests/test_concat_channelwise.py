"""A channel-wise layer (BN, depthwise conv, PReLU) after a concatenation (DenseNet): its channels for each joined
space start at that space's offset. Compaction removes channels through it at the right offsets (outputs equal),
and couple=True ties every filter to its own BN channel and consumer input, never another input's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning import build_groups
from ssl_lightning.compaction import compact_with_info
from ssl_lightning.graph import analyze
from ssl_lightning.penalty import apply_masks_, keep_masks


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
    info = compact_with_info(model, x, align=1)  # used to raise "running_mean should contain 64 elements not 24"
    with torch.no_grad():
        torch.testing.assert_close(info.model(x), model(x), rtol=1e-5, atol=1e-5)
    gone = set(range(10)) | {24 + c for c in range(5, 9)}
    if channelwise == "depthwise":  # zero-padded taps make a constant input non-constant at the border: kept
        assert set(info.channels.out_keep.get("norm", range(64))) <= set(range(64))
    else:
        assert info.channels.out_keep["norm"] == [c for c in range(64) if c not in gone]
        assert info.model.head.in_channels == 64 - len(gone)


def test_coupled_groups_tie_each_filter_to_its_own_bn_channel_after_a_concatenation() -> None:
    torch.manual_seed(1)
    model = DenseJoin("bn")
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(0.5, 1.5)
    groups = build_groups(model, {"filter": 1.0}, couple=True)
    by_layer = {g.modules: g for g in groups}
    assert by_layer[("conv_a",)].num_groups == 24 and by_layer[("conv_b",)].num_groups == 40
    for layer, offset in (("conv_a", 0), ("conv_b", 24)):
        group = by_layer[(layer,)]
        assert {m.name for m in group.members} == {f"{layer}.weight", f"{layer}.bias", "norm.weight", "norm.bias",
                                                   "head.weight"}  # fmt: skip
        for j in range(group.num_groups):  # zero group j alone: exactly filter j and channel offset + j go
            m = copy.deepcopy(model)
            mine = [g for g in build_groups(m, {"filter": 1.0}, couple=True) if g.modules == (layer,)]
            keep = torch.ones(group.num_groups, dtype=torch.bool)
            keep[j] = False
            with torch.no_grad():
                apply_masks_({mm.name: mm.param for mm in mine[0].members}, keep_masks(mine, [keep]))
            conv = getattr(m, layer)
            assert (conv.weight[j] == 0).all() and int((conv.weight.flatten(1) == 0).all(1).sum()) == 1
            zero_bn = (m.norm.weight == 0).nonzero().flatten().tolist()
            zero_in = (m.head.weight == 0).all(0).flatten(1).all(1).nonzero().flatten().tolist()
            assert zero_bn == [offset + j] and zero_in == [offset + j], (layer, j, zero_bn, zero_in)


def test_a_space_joined_twice_is_kept_whole() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.BatchNorm2d(16)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.head(self.norm(torch.cat([y, y], 1)))

    reasons = [r for sp in analyze(Twice()).spaces for r in sp.blocked]
    assert any("over a concatenation it cannot split" in r for r in reasons)

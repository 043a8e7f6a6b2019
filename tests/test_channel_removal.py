"""compact() removes channels across coupled layers, folds constants exactly and drops the expected parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning import compact_with_info
from ssl_lightning.compaction.channels import PaddedFoldConv2d
from ssl_lightning.models import MLP, LeNet, resnet20


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def compact_exact(model: nn.Module, x: Tensor, **kw: object):  # type: ignore[no-untyped-def]
    """Compact with exact channel counts (align=1), check outputs, return the result."""
    model.eval()
    info = compact_with_info(model, x, measure=False, align=1, **kw)  # type: ignore[arg-type]
    for trial in (x, torch.randn_like(x), torch.randn_like(x) * 3):
        with torch.no_grad():
            assert rel_err(model(trial), info.model(trial)) <= 1e-5
    return info


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)


def zero_filter(conv: nn.Conv2d | nn.Linear, idx: list[int], bn: nn.BatchNorm2d | None = None) -> None:
    """Zero filters (rows); with ``bn`` also its channel's scale and shift, as coupled SSL groups do."""
    with torch.no_grad():
        conv.weight[idx] = 0
        if bn is not None:
            bn.weight[idx] = 0
            bn.bias[idx] = 0


class ConvBNChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_conv_bn_chain_removes_coupled_channels_and_folds_into_linear() -> None:
    torch.manual_seed(0)
    m = ConvBNChain()
    randomize_bn(m)
    zero_filter(m.conv1, [1, 4, 9], m.bn1)  # coupled group: outputs exactly 0 -> removable behind padding
    with torch.no_grad():
        m.conv1.weight[6] = 0  # filter zero but BN shift not: a nonzero constant behind conv2's zero padding
        m.bn1.bias[6] = 0.7
        m.bn1.running_mean[6] = 0.0
        m.conv2.weight[:, 12] = 0  # channel-wise sparsity: conv2 ignores channel 12 (its filter is not zero)
    zero_filter(m.conv2, [0, 3, 5, 30])  # bias and BN shift stay: constant, folded into fc's bias
    info = compact_exact(m, torch.randn(2, 3, 16, 16))
    out = info.model
    removed1, removed2 = 5, 4  # conv1: {1, 4, 6, 9, 12}; conv2: {0, 3, 5, 30}
    expected = (
        removed1 * (3 * 9 + 2 + 32 * 9)  # conv1 filters, BN1 affine, conv2 input channels
        + removed2 * ((16 - removed1) * 9 + 1 + 2 + 10)  # conv2 filters + bias, BN2 affine, fc input features
    )
    assert n_params(m) - n_params(out) == expected
    assert out.conv1.out_channels == 11 and out.bn1.num_features == 11 and out.fc.in_features == 28
    # Channel 6's constant ReLU(0.7) sits behind conv2's zero padding: folded as a per-position map.
    assert isinstance(out.conv2, PaddedFoldConv2d) and out.conv2.conv.in_channels == 11
    assert out.conv2.fold_taps.shape == (28, 3, 3) and info.channels.padded["conv2"] == {"removed": 1, "size": [16, 16]}
    assert [k for k in out.conv2.state_dict() if not k.startswith("conv.")] == ["fold_taps"]  # no [out, H, W] map
    border = out.conv2.border(16, 16, 16, 16)
    assert not torch.allclose(border[:, 0, 0], border[:, 8, 8])  # corners see fewer taps than the interior
    assert info.channels.folds == ["fc"]
    with torch.no_grad():  # another input size recomputes the map
        x = torch.randn(2, 3, 11, 13)
        assert rel_err(m(x), out(x)) <= 1e-5


def test_lenet_and_mlp_remove_neurons_and_fold_constants() -> None:
    torch.manual_seed(1)
    lenet = LeNet()
    with torch.no_grad():
        lenet.conv1.weight[[0, 7, 11]] = 0  # bias stays: max-pooled constant folded into conv2's bias (no padding)
        lenet.conv2.weight[[2, 3]] = 0  # flattened constant planes folded into fc1's bias
        lenet.fc1.weight[:, 50:66] = 0  # all of conv2 channel 3's 16 positions ignored (already removed)
        lenet.fc1.weight[[10, 20]] = 0  # neurons whose ReLU(bias) folds into fc2
    info = compact_exact(lenet, torch.randn(3, 1, 28, 28))
    expected = (
        3 * (25 + 1) + 3 * 50 * 25  # conv1 filters, conv2 input channels
        + 2 * (17 * 25 + 1) + 2 * 16 * 500  # conv2 filters, fc1 input features
        + 2 * (768 + 1) + 2 * 10  # fc1 neurons (768 = 800 - 2 * 16 features), fc2 inputs
    )  # fmt: skip
    assert n_params(lenet) - n_params(info.model) == expected
    assert sorted(info.channels.folds) == ["conv2", "fc1", "fc2"]

    mlp = MLP((20, 16, 12, 4))
    with torch.no_grad():
        mlp.layers[0].weight[[1, 2]] = 0  # dead neurons with a bias: folded
        mlp.layers[1].weight[:, 5] = 0  # neuron 5 ignored by its consumer (its own weights stay nonzero)
        mlp.layers[1].weight[[0]] = 0
    info = compact_exact(mlp, torch.randn(5, 20))
    expected = 3 * (20 + 1) + 3 * 12 + 1 * (13 + 1) + 1 * 4
    assert n_params(mlp) - n_params(info.model) == expected
    assert [layer.out_features for layer in info.model.layers] == [13, 11, 4]


def test_resnet_blocks_remove_filters_shapes_and_residual_channels() -> None:
    torch.manual_seed(2)
    m = resnet20()
    randomize_bn(m, 2)
    blocks = m.blocks
    zero_filter(blocks[0].conv1, [0, 5], blocks[0].bn1)  # identity-shortcut block, inner channels
    zero_filter(blocks[3].conv1, [1, 2, 3], blocks[3].bn1)  # projection-shortcut block
    with torch.no_grad():
        blocks[4].conv2.weight[:, :, :2, :] = 0  # shape-wise: two rows of every 3x3 kernel -> fused CompactConv2d
    # Residual channel 7 of stage 1: zero on every branch that feeds it (stem, three conv2, all BNs).
    zero_filter(m.conv1, [7], m.bn1)
    for b in blocks[:3]:
        zero_filter(b.conv2, [7], b.bn2)
    # Residual channel 9 is zero on the stem and two branches but not on blocks[2]: it must stay.
    zero_filter(m.conv1, [9], m.bn1)
    for b in blocks[:2]:
        zero_filter(b.conv2, [9], b.bn2)
    info = compact_exact(m, torch.randn(2, 3, 32, 32))
    out = info.model
    assert out.bn1.num_features == 15 and out.blocks[2].bn2.num_features == 15  # stage-1 stream: 16 -> 15
    assert out.blocks[3].shortcut[0].in_channels == 15  # the projection shortcut reads the smaller stream
    assert out.blocks[0].conv1.out_channels == 14 and out.blocks[3].conv1.out_channels == 29
    assert type(out.blocks[4].conv2).__name__ == "CompactConv2d" and out.blocks[4].conv2.impl == "fused"
    expected = (
        27 + 2  # stem filter 7 + BN
        + (16 * 16 - 14 * 15) * 9 + 4 + (16 * 16 - 15 * 14) * 9 + 2  # block 0: inner 16->14, stream 16->15
        + 2 * (16 * 9 + 16 * 9 + 2)  # blocks 1, 2: stream input of conv1, stream filter of conv2 + BN
        + (32 * 16 - 29 * 15) * 9 + 6 + 3 * 32 * 9 + 32  # block 3: conv1 + BN, conv2 inputs, 1x1 projection input
        + 32 * 32 * 6  # block 4 conv2: the fused op stores only 3 of 9 taps
    )  # fmt: skip
    assert n_params(m) - n_params(out) == expected
    # zero filter 9 stays (its channel is kept): with 14/15 of their MACs left, the stem and the conv2 of
    # blocks 0 and 1 are not worth a row-only conv and stay dense, zero filter included
    assert type(out.conv1) is nn.Conv2d and out.conv1.out_channels == 15
    assert all(type(out.blocks[i].conv2) is nn.Conv2d for i in (0, 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.dw_bn(self.dw(x)))
        x = F.relu(self.pw(x))
        return self.head(x.mean((2, 3)))


def test_depthwise_separable_block_slices_depthwise_and_folds_into_pointwise() -> None:
    torch.manual_seed(3)
    m = DepthwiseSeparable()
    randomize_bn(m, 3)
    zero_filter(m.conv, [2, 8, 13], m.bn)  # 0 through the depthwise conv, then dw_bn's shift: a constant
    info = compact_exact(m, torch.randn(2, 3, 12, 12))
    out = info.model
    assert out.dw.groups == out.dw.in_channels == out.dw.out_channels == 13 and out.dw_bn.num_features == 13
    assert n_params(m) - n_params(out) == 3 * (27 + 2 + 9 + 2 + 24)
    assert info.channels.folds == ["pw"]  # pw is 1x1 without padding: the constant goes into its bias


class ConcatJoin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 1)
        self.mix = nn.Conv2d(14, 10, 1)
        self.fc = nn.Linear(10 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = F.max_pool2d(F.relu(self.mix(y)), 2)
        return self.fc(torch.flatten(y, 1))


def test_concat_join_maps_each_branch_to_its_offset() -> None:
    torch.manual_seed(4)
    m = ConcatJoin()
    zero_filter(m.a, [1, 6])
    zero_filter(m.b, [0, 4])  # sigmoid(bias): a constant, folded into the 1x1 mix conv
    zero_filter(m.mix, [3])  # flattened constant plane folded into fc
    info = compact_exact(m, torch.randn(2, 4, 8, 8))
    out = info.model
    assert out.mix.in_channels == 10 and out.a.out_channels == 6 and out.b.out_channels == 4
    expected = 2 * (36 + 1) + 2 * (4 + 1) + 4 * 10 + (10 + 1) + 16 * 3
    assert n_params(m) - n_params(out) == expected


class ConvFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).view(x.size(0), -1))


def test_conv_flatten_linear_maps_spatial_positions() -> None:
    torch.manual_seed(5)
    m = ConvFlattenLinear()
    zero_filter(m.conv, [0, 3, 7])
    with torch.no_grad():
        m.fc.weight[:, 36 * 5 : 36 * 6] = 0  # channel 5's 36 positions ignored by fc
    info = compact_exact(m, torch.randn(2, 3, 8, 8))
    assert info.model.fc.in_features == 4 * 36
    assert n_params(m) - n_params(info.model) == 4 * (27 + 1) + 4 * 36 * 4


@pytest.mark.parametrize("align", [4, 8])
def test_alignment_rounds_kept_channels_up(align: int) -> None:
    torch.manual_seed(6)
    m = ConvBNChain()
    randomize_bn(m)
    zero_filter(m.conv2, list(range(0, 32, 3)))  # 11 of 32 removable -> 21 kept
    m.eval()
    info = compact_with_info(m, torch.randn(2, 3, 16, 16), measure=False, align=align)
    assert info.model.conv2.out_channels == 24  # next multiple of 4 and of 8
    assert info.model.fc.in_features == 24


def test_mixed_branch_channel_and_shared_module_are_kept() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    m = Shared()
    zero_filter(m.conv, [1])
    info = compact_exact(m, torch.randn(2, 4, 5, 5))
    assert info.model.conv.out_channels == 4 and any("called more than once" in s for s in info.channels.skipped)


def test_lrn_over_concatenated_layers_blocks_channel_removal() -> None:
    class CatLRN(nn.Module):  # the LRN windows span both producers: kept whole
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.norm, self.head = nn.LocalResponseNorm(3), nn.Conv2d(8, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.norm(F.relu(torch.cat([self.a(x), self.b(x)], 1))))

    m = CatLRN()
    zero_filter(m.a, [2])
    info = compact_exact(m, torch.randn(2, 3, 9, 9))
    assert info.model.a.out_channels == 4 and any("channel-mixing" in s for s in info.channels.skipped)


def test_zero_residual_branches_disappear_from_the_forward_pass(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ssl_lightning import apply_compaction_plan, compaction_plan

    torch.manual_seed(7)
    m = resnet20()
    randomize_bn(m, 7)
    with torch.no_grad():
        for i in (
            1,
            4,
        ):  # identity-shortcut blocks 1 (stage 1) and 4 (stage 2): every branch weight zero (depth-wise SSL)
            m.blocks[i].conv1.weight.zero_()
            m.blocks[i].conv2.weight.zero_()
        m.blocks[3].conv1.weight.zero_()  # projection block 3: branch zero too, 1x1 shortcut stays
        m.blocks[3].conv2.weight.zero_()
    info = compact_exact(m, torch.randn(2, 3, 32, 32))
    out = info.model
    assert sorted(e["module"] for e in info.depth) == ["blocks.1", "blocks.3", "blocks.4"]
    names = {n for n, _ in out.named_modules()}
    for i in (1, 3, 4):
        assert f"blocks.{i}.conv1" not in names and f"blocks.{i}.conv2" not in names
    assert "blocks.3.shortcut.0" in names  # the projection shortcut carries the block now
    branch = (  # conv1 + conv2 + BN1/BN2 affine of each removed branch
        (2 * 16 * 16 * 9 + 4 * 16)  # block 1 (stage 1, 16 channels)
        + (32 * 16 * 9 + 32 * 32 * 9 + 4 * 32)  # block 3 (stride 2, 16 -> 32)
        + (2 * 32 * 32 * 9 + 4 * 32)  # block 4 (stage 2)
    )
    assert n_params(m) - n_params(out) == branch
    calls: list[str] = []
    hooks = [mod.register_forward_hook(lambda *_a, n=n: calls.append(n)) for n, mod in out.named_modules()]
    out(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert "blocks.4.shortcut" in calls  # the block still runs, as shortcut + constant
    assert not any(c.startswith(("blocks.1.conv", "blocks.1.bn", "blocks.4.conv", "blocks.4.bn")) for c in calls)

    plan = compaction_plan(out)
    torch.save(out.state_dict(), tmp_path / "w.pt")
    fresh = apply_compaction_plan(resnet20().eval(), plan)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), out(x), rtol=0, atol=0)


def test_unsupported_modules_and_functional_convs_are_named_and_left_whole() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.shuffle = nn.ChannelShuffle(2)  # moves channels: not a per-channel op the analysis follows
            self.w = nn.Parameter(torch.randn(6, 8, 3, 3))
            self.b = nn.Conv2d(6, 6, 3)
            self.c = nn.Conv2d(6, 4, 1)
            self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)  # LayerScale-style: sliced with its channels

        def forward(self, x: Tensor) -> Tensor:
            y = F.conv2d(self.shuffle(self.a(x)), self.w, padding=1)  # functional conv: its weight is not a module
            return self.c(F.relu(self.b(y)) * self.scale)

    torch.manual_seed(8)
    m = Odd()
    zero_filter(m.a, [0, 1])  # behind ChannelShuffle: must stay
    zero_filter(m.b, [2])  # b -> relu -> * scale -> c: removable, scale sliced, constant folded into c
    with pytest.warns(UserWarning, match=r"unsupported module shuffle \(ChannelShuffle\).*unsupported op conv2d"):
        info = compact_exact(m, torch.randn(2, 3, 10, 10))
    out = info.model
    assert out.a.out_channels == 8 and out.b.out_channels == 5 and out.scale.shape == (1, 5, 1, 1)
    assert isinstance(out.scale, nn.Parameter) and info.channels.folds == ["c"]


def test_mlp_input_pixels_with_all_zero_connections_are_gathered_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ssl_lightning import CompactLinear, apply_compaction_plan, compaction_plan

    torch.manual_seed(9)
    mlp = MLP((784, 64, 10))
    ignored = torch.randperm(784)[:600]  # neuron_in groups: pixels the first layer learned to ignore
    with torch.no_grad():
        mlp.layers[0].weight[:, ignored] = 0
    info = compact_exact(mlp, torch.randn(8, 1, 28, 28))
    first = info.model.layers[0]
    assert isinstance(first, CompactLinear) and first.in_idx.numel() == 184 and info.replaced["layers.0"] == "gather"
    assert n_params(mlp) - n_params(info.model) == 600 * 64
    plan = compaction_plan(info.model)
    torch.save(info.model.state_dict(), tmp_path / "w.pt")
    fresh = apply_compaction_plan(MLP((784, 64, 10)), plan)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.randn(3, 784)
    torch.testing.assert_close(fresh(x), info.model(x), rtol=0, atol=0)


class GroupedChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 12, 3, groups=2)  # no padding: constants fold into its bias
        self.c = nn.Conv2d(12, 6, 1, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.b(F.relu(self.a(x))))
        return self.fc(self.c(x).mean((2, 3)))


def test_grouped_convs_keep_equal_channel_counts_per_group_and_fold_per_group() -> None:
    torch.manual_seed(10)
    m = GroupedChain()
    with torch.no_grad():
        m.a.bias.abs_()  # ReLU(bias) > 0: nonzero constants, folded into b's rows of the channel's group only
        m.b.bias.abs_()
    zero_filter(m.a, [0, 1, 5])  # b's groups hold channels 0-3 and 4-7: 2 vs 1 removable -> 1 each
    zero_filter(m.b, [1, 7])  # one per group of b's outputs and of c's inputs (both 2 groups of 6)
    info = compact_exact(m, torch.randn(2, 3, 9, 9))
    out = info.model
    assert out.a.out_channels == 6 and out.b.in_channels == 6 and out.b.weight.shape == (10, 3, 3, 3)
    assert out.c.in_channels == 10 and out.c.weight.shape == (6, 5, 1, 1)
    assert 5 not in info.channels.out_keep["a"] and len({0, 1} & set(info.channels.out_keep["a"])) == 1
    # a: 2 filters + biases; b: 2 input channels x 6 rows of its group x 9 taps, 2 filters (3 x 9 + bias);
    # c: 2 input channels x 3 rows. The zero filter of a kept for balance leaves 5/6 of a's MACs: a stays
    # a dense conv (not worth a row-only conv without a measurement)
    assert n_params(m) - n_params(out) == 2 * 28 + 2 * 6 * 9 + 2 * 28 + 2 * 3
    assert type(out.a) is nn.Conv2d
    assert sorted(info.channels.folds) == ["b", "c"]


def test_grouped_conv_plan_with_unequal_groups_is_rejected() -> None:
    from ssl_lightning.compaction.channels import ChannelPlan, apply_channel_plan

    with pytest.raises(ValueError, match=r"keeps \[4, 2\] channels in its 2 groups; a grouped conv needs the same"):
        apply_channel_plan(GroupedChain(), ChannelPlan(in_keep={"b": [0, 1, 2, 3, 4, 5]}))


def test_uncoupled_zero_filters_behind_padding_are_removed_exactly_and_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ssl_lightning import apply_compaction_plan, compaction_plan

    torch.manual_seed(11)
    m = resnet20()
    randomize_bn(m, 11)
    for b in (0, 4, 7):  # plain filter groups (couple=False): weights zero, BN shift and running mean stay
        zero_filter(m.blocks[b].conv1, [0, 2, 3])
    x = torch.randn(2, 3, 32, 32)
    info = compact_exact(m, x)
    out = info.model
    assert sorted(info.channels.padded) == ["blocks.0.conv2", "blocks.4.conv2", "blocks.7.conv2"]
    assert out.blocks[4].conv1.out_channels == 29 and isinstance(out.blocks[4].conv2, PaddedFoldConv2d)
    plan = compaction_plan(out)
    torch.save(out.state_dict(), tmp_path / "w.pt")
    fresh = apply_compaction_plan(resnet20().eval(), plan)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    torch.testing.assert_close(fresh(x), out.eval()(x), rtol=0, atol=0)


class UpsampleCatPoolHead(nn.Module):
    """U-Net-style skip (upsample + concat) and a MobileNet-style head (spatial mean -> Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        e = F.relu(self.enc(x))
        d = F.pad(self.up(F.relu(self.down(e))), (0, 0, 0, 0))
        y = F.relu(self.dec(torch.cat([e, d], dim=1)))
        return self.fc(y.mean((2, 3)))


def test_upsample_concat_and_spatial_mean_head_are_followed() -> None:
    torch.manual_seed(12)
    m = UpsampleCatPoolHead()
    with torch.no_grad():
        m.down.bias.abs_()  # ReLU keeps the constants: a real fold, not zeros
        m.dec.bias.abs_()
    zero_filter(m.down, [1, 6])  # ReLU(bias) upsampled: constant, folded into dec (1x1) at offset 8
    zero_filter(m.dec, [0, 4, 5])  # ReLU(bias) averaged: constant, folded into fc
    info = compact_exact(m, torch.randn(2, 3, 8, 8))
    out = info.model
    assert out.down.out_channels == 6 and out.dec.in_channels == 14 and out.dec.out_channels == 9
    assert out.fc.in_features == 9 and sorted(info.channels.folds) == ["dec", "fc"]
    assert n_params(m) - n_params(out) == 2 * (8 * 9 + 1) + 2 * 12 + 3 * (14 + 1) + 3 * 3


class ConvPoolLRN(nn.Module):
    """CaffeNet's first stage: conv -> ReLU -> max-pool -> LRN -> conv (padded) -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.pool = nn.MaxPool2d(3, 2)
        self.norm = nn.LocalResponseNorm(5)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.pool(F.relu(self.conv1(x))))
        return self.fc(F.relu(self.conv2(x)).flatten(1))


def test_zero_channels_pass_through_lrn_at_their_original_positions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ssl_lightning import apply_compaction_plan, compaction_plan
    from ssl_lightning.compaction.channels import SparseChannelLRN

    torch.manual_seed(12)
    m = ConvPoolLRN()
    with torch.no_grad():
        m.conv1.bias.abs_()  # ReLU(bias) > 0 for a zero filter: a nonzero constant in neighbours' windows
    zero_filter(m.conv1, [1, 4, 6])
    with torch.no_grad():
        m.conv1.bias[[1, 4]] = 0  # filters 1, 4: exactly 0 into the LRN -> removable
    # filter 6 keeps its bias: the constant ReLU(b6) > 0 is in channels 4-7's windows, so it stays
    x = torch.randn(2, 3, 11, 11)
    info = compact_exact(m, x)
    out = info.model
    assert isinstance(out.norm, SparseChannelLRN) and out.norm.channels.tolist() == [0, 2, 3, 5, 6, 7]
    assert out.conv1.out_channels == 6 and out.conv2.in_channels == 6  # channel 6 stays: nonzero constant
    assert n_params(m) - n_params(out) == 2 * (3 * 9 + 1) + 2 * 6 * 9
    # persistence: the plan rebuilds the sparse LRN on a fresh model, and the weights load into it
    plan = compaction_plan(out)
    torch.save(out.state_dict(), tmp_path / "w.pt")
    fresh = apply_compaction_plan(ConvPoolLRN(), plan)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x), rtol=1e-5, atol=1e-6)


def test_nonzero_ignored_channel_and_functional_lrn_keep_their_channels() -> None:
    torch.manual_seed(13)
    m = ConvPoolLRN()
    with torch.no_grad():
        m.conv2.weight[:, 2] = 0  # conv2 ignores channel 2, but it is not zero: it still normalises 1, 3, 4
    info = compact_exact(m, torch.randn(2, 3, 11, 11))
    assert info.model.conv1.out_channels == 8 and type(info.model.norm) is nn.LocalResponseNorm

    class Functional(ConvPoolLRN):
        def forward(self, x: Tensor) -> Tensor:
            x = F.local_response_norm(self.pool(F.relu(self.conv1(x))), 5)
            return self.fc(F.relu(self.conv2(x)).flatten(1))

    f = Functional()
    zero_filter(f.conv1, [1])
    with torch.no_grad():
        f.conv1.bias[1] = 0
    info = compact_exact(f, torch.randn(2, 3, 11, 11))
    assert info.model.conv1.out_channels == 8
    assert any("channel-mixing op local_response_norm" in s for s in info.channels.skipped)


def test_plan_naming_a_non_lrn_module_as_sparse_lrn_is_rejected() -> None:
    from ssl_lightning.compaction.channels import ChannelPlan, apply_channel_plan

    plan = ChannelPlan(out_keep={"conv2": [0, 1]}, sparse_lrn={"conv2": 6})
    with pytest.raises(ValueError, match=r"makes 'conv2' a SparseChannelLRN, but it is Conv2d"):
        apply_channel_plan(ConvPoolLRN(), plan)


def test_padded_fold_state_dicts_of_the_earlier_format_still_load() -> None:
    """Compacted checkpoints saved with the per-position map (fold_weight, fold_value, border) load into the
    taps-only layer and give the same outputs."""
    torch.manual_seed(12)
    conv = nn.Conv2d(5, 6, 3, padding=1, stride=2)
    fw, fv = torch.randn(6, 2, 3, 3), torch.tensor([0.7, -1.3])  # two removed constant channels
    old = {f"conv.{k}": v for k, v in conv.state_dict().items()}
    x = torch.randn(2, 5, 9, 7)
    image = fv.view(1, 2, 1, 1).expand(1, 2, 9, 7)
    full = torch.cat([x, image.expand(2, 2, 9, 7)], 1)  # what the dense conv saw
    dense = nn.Conv2d(7, 6, 3, padding=1, stride=2)
    with torch.no_grad():
        dense.weight.copy_(torch.cat([conv.weight, fw], 1))
        dense.bias.copy_(conv.bias)
    old |= {"fold_weight": fw, "fold_value": fv, "border": F.conv2d(image, fw, None, 2, 1)[0]}
    for size in (None, (9, 7)):  # the map rebuilt per call, or cached for the compaction's size (refreshed on load)
        layer = PaddedFoldConv2d(nn.Conv2d(5, 6, 3, padding=1, stride=2), torch.zeros(6, 3, 3), size)
        layer.load_state_dict(dict(old))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(full), rtol=1e-5, atol=1e-5)

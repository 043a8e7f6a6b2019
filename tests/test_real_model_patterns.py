"""The patterns of real third-party networks, in small hand-written models: code torch.fx cannot trace (analysed
piecewise), traces that are silently wrong (caught against a real run), residual adds one level above the branch,
InstanceNorm / GroupNorm / ConvTranspose2d, string paddings and Conv2d subclasses."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning import StructuredSparsity, build_groups
from ssl_lightning.compaction import compact_with_info
from ssl_lightning.graph import analyze


def zero_filters(conv: nn.Module, idx: list[int]) -> None:
    with torch.no_grad():
        if isinstance(conv, nn.ConvTranspose2d):
            conv.weight[:, idx] = 0
        else:
            conv.weight[idx] = 0
        if conv.bias is not None:
            conv.bias[idx] = 0


def check(model: nn.Module, x: Tensor, **kw: object) -> nn.Module:
    info = compact_with_info(model, x, measure=False, align=1, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        torch.testing.assert_close(info.model(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    return info.model


class Stem(nn.Module):
    """An input check on the shape (as in transformers' embeddings): fx cannot branch on a traced value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        return F.relu(self.bn(self.conv(x)))


class Body(nn.Module):
    """Traceable: conv → BN → ReLU → conv, whose inner channels can go."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        self.body = Body()
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor, return_dict: bool = True) -> dict[str, Tensor] | Tensor:
        y = self.body(self.stem(x)).mean((2, 3))
        if int(y.shape[0]) > 0:  # int() of a traced value: fx fails on the whole model
            y = self.head(y)
        return {"logits": y} if return_dict else y


def test_a_model_fx_cannot_trace_is_analysed_piecewise_or_from_a_recorded_run() -> None:
    torch.manual_seed(0)
    model = Untraceable().eval()
    zero_filters(model.body.conv1, [1, 4, 9])
    zero_filters(model.stem.conv, [2])  # crosses the stem's input check
    x = torch.randn(2, 3, 8, 8)
    piecewise = analyze(model)  # no inputs: fx on every piece it can trace, the rest reported by name
    assert set(piecewise.untraced) == {"", "stem"} and not piecewise.recorded
    assert "control flow" in piecewise.untraced[""] and "control flow" in piecewise.untraced["stem"]
    assert any("stem is not traceable" in n for n in piecewise.unsupported)
    producers = {p for sp in piecewise.spaces for p in sp.producers if not sp.blocked}
    assert producers == {"body.conv1"}  # the stem's output crosses untraced code: blocked
    recorded = analyze(model, (x,))  # with inputs: the real run's graph, control flow as it ran
    assert set(recorded.recorded) == {""} and not recorded.untraced
    out = compact_with_info(model, x, measure=False, align=1)
    with torch.no_grad():
        torch.testing.assert_close(out.model(x)["logits"], model(x)["logits"], rtol=1e-5, atol=1e-5)
    assert out.model.body.conv1.out_channels == 13 and out.model.body.bn1.num_features == 13
    assert out.model.stem.conv.out_channels == 7 and out.model.body.conv1.in_channels == 7


class Wrapper(pl.LightningModule):
    """A LightningModule without a traceable forward around a traceable network."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))  # fmt: skip
        self.example_input_array = torch.randn(2, 3, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:  # data-dependent control flow
            x = x * 0
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_coupled_groups_on_the_network_inside_an_untraceable_lightning_module() -> None:
    module = Wrapper()
    with pytest.warns(UserWarning, match="stay uncoupled"):  # no inputs: the wrapper's forward is not analysed
        groups = build_groups(module, {"filter": 1.0}, couple=True)
    first = next(g for g in groups if g.modules == ("net.0",))
    members = {"net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.weight"}
    assert {m.name for m in first.members} == members  # the network inside is
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 2, (12,))), batch_size=4)
    cb = StructuredSparsity({"filter": 1e-3}, couple=True)
    trainer = pl.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stay uncoupled")  # example_input_array: a recorded run
        trainer.fit(module, data)
    assert trainer.global_step == 3
    assert {m.name for m in next(g for g in cb.groups if g.modules == ("net.0",)).members} == members


class SkipUp(nn.Module):
    """Like MONAI BasicUNet's UpCat: ``torch.jit.isinstance(proxy, Tensor)`` is False under fx, so the trace
    silently drops the skip input from the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv2d(8, 8, 1)
        self.conv = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x0 = self.up(x)
        if skip is not None and torch.jit.isinstance(skip, Tensor):
            return self.conv(torch.cat([skip, x0], 1))
        return self.conv(torch.cat([x0, x0], 1))


class UNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.upcat = SkipUp()

    def forward(self, x: Tensor) -> Tensor:
        d = F.relu(self.down(x))
        return self.upcat(F.relu(self.mid(d)), d)


def test_a_silently_wrong_trace_is_caught_against_a_real_run() -> None:
    torch.manual_seed(1)
    model = UNetish().eval()
    zero_filters(model.down, [0, 3])
    x = torch.randn(2, 3, 8, 8)
    analysis = analyze(model, (x,))
    assert "computes something else" in analysis.recorded[""]  # the whole model: the real run's graph is used
    wrong = analyze(model)  # without inputs the wrong graph cannot be told apart
    assert not wrong.untraced and not wrong.recorded
    out = check(model, x)  # used to crash: "expected input[2, 14, 8, 8] to have 16 channels"
    assert out.down.out_channels == 6 and out.upcat.conv.in_channels == 14  # through the skip concatenation


class Unit(nn.Module):
    """MONAI ResidualUnit: the branch is its own Sequential, the add is in the unit's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))  # fmt: skip
        self.residual = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.residual(x)


def test_a_zero_branch_whose_add_is_one_level_up_is_removed() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Unit(), Unit(), nn.Conv2d(8, 2, 1)).eval()
    with torch.no_grad():
        for i in (0, 3):
            model[1].conv[i].weight.zero_()
            model[1].conv[i].bias.zero_()
        model[1].conv[4].running_mean.uniform_(-1, 1)
    info = compact_with_info(model, torch.randn(2, 3, 8, 8), measure=False, align=1)
    assert [d["module"] for d in info.depth] == ["1"] and not info.notes
    assert analyze(model).depth_branches == [["1.conv.0", "1.conv.3"], ["2.conv.0", "2.conv.3"]]
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(info.model(x), model(x), rtol=1e-5, atol=1e-5)


class Norms(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = {
            "instance": nn.InstanceNorm2d(16, affine=True),
            "instance-plain": nn.InstanceNorm2d(16),
            "group": nn.GroupNorm(4, 16),
        }[norm]
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.norm(self.conv1(x))))


@pytest.mark.parametrize("norm", ["instance", "instance-plain", "group"])
def test_instance_and_group_norm_pass_channels_through(norm: str) -> None:
    torch.manual_seed(3)
    model = Norms(norm).eval()
    zero_filters(model.conv1, [0, 1, 2, 3, 5, 9])  # group 0 whole; 5 and 9 alone in theirs
    with torch.no_grad():
        if hasattr(model.norm, "weight") and model.norm.weight is not None:
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.uniform_(-1, 1)
    out = check(model, torch.randn(2, 3, 8, 8))
    if norm == "group":  # only the whole group goes; a GroupNorm of 3 groups of 4
        assert out.conv1.out_channels == 12 and (out.norm.num_groups, out.norm.num_channels) == (3, 12)
    else:
        assert out.conv1.out_channels == 10 and out.norm.num_features == 10


def test_conv_transpose_produces_and_consumes_channels() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1,
                          output_padding=1), nn.ReLU(), nn.Conv2d(6, 2, 3, padding=1)).eval()  # fmt: skip
    zero_filters(model[0], [1, 6])  # relu(0) = 0 into the transposed conv: removable
    zero_filters(model[2], [0, 4])  # its output channels: constants folded into the last conv
    with torch.no_grad():
        model[2].bias[4] = 0.7  # a nonzero constant
    out = check(model, torch.randn(2, 3, 8, 8))
    assert out[0].out_channels == 6 and out[2].in_channels == 6 and out[2].out_channels == 4
    assert out[4].conv.in_channels == 4  # a PaddedFoldConv2d: the constant 0.7 behind zero padding


def test_string_paddings_compact_like_numbers() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 8, 3, padding="valid"),
                          nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight[:, 1] = 0  # shape-wise zeros: CompactConv2d needs numeric padding
        model[2].weight[:, :, 0] = 0
    info = compact_with_info(model, torch.randn(2, 3, 8, 8), measure=False, align=1)
    assert set(info.replaced) == {"0", "2"}
    assert info.model[0].padding == (1, 1) and model[0].padding == "same"  # the original is untouched


class Standardized(nn.Conv2d):
    """BiT's weight standardisation: the effective weight is not ``.weight``."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Renamed(nn.Conv2d):
    """Only a constructor (transformers' EfficientNetDepthwiseConv2d): a plain conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)


def test_conv_subclasses_plain_ones_are_convs_own_forward_ones_get_no_groups() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(Renamed(3, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          Standardized(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))  # fmt: skip
    with pytest.warns(UserWarning, match=r"no groups for 4 \(Standardized\)"):
        groups = build_groups(model, {"filter": 1.0, "shape": 1.0})
    assert {g.name for g in groups} == {"0:filter", "0:shape", "2:filter", "2:shape", "6:shape"}
    zero_filters(model[0], [2, 5])  # read by a plain conv: removed
    zero_filters(model[2], [1])  # read by the standardised conv, whose statistics span every input: kept
    with pytest.warns(UserWarning, match=r"4 is a Standardized .* left dense"):
        out = check(model.eval(), torch.randn(2, 3, 8, 8))
    assert isinstance(out[0], Renamed) and out[0].out_channels == 6 and out[2].in_channels == 6
    assert out[2].out_channels == 8 and isinstance(out[4], Standardized) and out[4].in_channels == 8


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class SkipAddUNet(nn.Module):
    """SegResNet-style: the decoder adds the encoder feature, a "branch" of whole residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), ResBlock(8), ResBlock(8))
        self.up = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Upsample(scale_factor=2))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.stem(x)
        return self.head(self.up(self.down(skip)) + skip)


def test_unet_skip_additions_are_not_depth_branches() -> None:
    analysis = analyze(SkipAddUNet())
    assert analysis.depth_branches == [["down.1.conv1", "down.1.conv2"], ["down.2.conv1", "down.2.conv2"]]
    assert any("skip addition over down.0..up.0 holds residual blocks" in n for n in analysis.unsupported)


def test_a_compacted_model_that_fails_to_run_is_a_labelled_compaction_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl_lightning.compaction.stages as stages
    from ssl_lightning.compaction import CompactionError

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    zero_filters(model[0], [1, 2])

    def broken(new: nn.Module, plan: object, corrections: object = None) -> None:
        new[2].weight = nn.Parameter(new[2].weight[:, :5].clone())  # a plan that no longer fits the graph

    monkeypatch.setattr(stages, "apply_channel_plan", broken)
    with pytest.raises(CompactionError, match=r"the compacted model fails on an input of the example's shape"):
        compact_with_info(model, torch.randn(2, 3, 8, 8), measure=False, align=1)


def test_a_plan_that_keeps_part_of_a_groupnorm_group_is_refused() -> None:
    from ssl_lightning.compaction.channels import ChannelPlan, apply_channel_plan

    model = Norms("group")
    with pytest.raises(ValueError, match=r"keeps part of a GroupNorm group \(\[3, 0, 0, 0\] of 4 per group\)"):
        apply_channel_plan(model, ChannelPlan(out_keep={"norm": [0, 1, 2]}))

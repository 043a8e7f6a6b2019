"""Group definitions: norms against brute-force loops, coupling and depth discovery, selection errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ssl_lightning.graph import analyze
from ssl_lightning.groups import build_groups
from ssl_lightning.models import LeNet, resnet20

from .conftest import SmallNet


def brute_conv_norms(w: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    n, cg, kh, kw = w.shape
    ng = n // groups
    out = []
    if kind == "filter":
        out = [w[i].norm() for i in range(n)]
    elif kind == "channel":
        out = [w[g * ng : (g + 1) * ng, c].norm() for g in range(groups) for c in range(cg)]
    elif kind == "shape":
        out = [
            w[g * ng : (g + 1) * ng, c, i, j].norm()
            for g in range(groups)
            for c in range(cg)
            for i in range(kh)
            for j in range(kw)
        ]
    elif kind == "kernel2d":
        out = [w[i, c].norm() for i in range(n) for c in range(cg)]
    return torch.stack(out)


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 3]),
    per_group_out=st.integers(1, 4),
    per_group_in=st.integers(1, 3),
    k=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
    kind=st.sampled_from(["filter", "channel", "shape", "kernel2d"]),
    zero_some=st.booleans(),
)
def test_conv_group_norms_match_brute_force(groups, per_group_out, per_group_in, k, kind, zero_some) -> None:
    conv = nn.Conv2d(groups * per_group_in, groups * per_group_out, k, groups=groups)
    if zero_some:
        with torch.no_grad():
            conv.weight[0] = 0
            conv.weight[:, 0, 0, 0] = 0
    # a consumer after the conv, so the conv is not the output layer (which gets no filter groups)
    model = nn.Sequential(conv, nn.Conv2d(groups * per_group_out, 2, 1))
    (group,) = [g for g in build_groups(model, {kind: 1.0}) if g.modules == ("0",)]
    expected = brute_conv_norms(conv.weight.detach(), kind, groups)
    torch.testing.assert_close(group.norms(), expected, rtol=1e-5, atol=1e-6)


def test_terminal_layer_gets_no_filter_groups() -> None:
    groups = build_groups(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 3, 1)), {"filter": 1.0, "shape": 1.0})
    assert sorted((g.modules[0], g.kind) for g in groups) == [("0", "filter"), ("0", "shape"), ("1", "shape")]


@settings(max_examples=20, deadline=None)
@given(out_f=st.integers(1, 6), in_f=st.integers(1, 6), kind=st.sampled_from(["neuron_in", "neuron_out"]))
def test_linear_group_norms_match_brute_force(out_f, in_f, kind) -> None:
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.ReLU(), nn.Linear(out_f, 2))
    groups = [g for g in build_groups(model, {kind: 1.0}) if g.modules == ("0",)]
    w = model[0].weight.detach()
    expected = torch.stack(
        [w[j].norm() for j in range(out_f)] if kind == "neuron_out" else [w[:, i].norm() for i in range(in_f)]
    )
    torch.testing.assert_close(groups[0].norms(), expected, rtol=1e-5, atol=1e-6)


def test_coupled_filter_group_spans_bias_bn_and_consumer() -> None:
    net = SmallNet()
    groups = build_groups(net, {"filter": 1.0}, couple=True)
    (coupled,) = [g for g in groups if "conv1" in g.modules]
    names = {m.name for m in coupled.members}
    # conv2 is grouped (2 groups of 4 channels): conv1 channel c is read by conv2's rows of group c // 4 only
    assert names == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight"}
    w2 = net.conv2.weight.detach()
    expected_grouped = torch.stack(
        [
            torch.cat([
                net.conv1.weight[c].flatten(), net.conv1.bias[c : c + 1], net.bn1.weight[c : c + 1],
                net.bn1.bias[c : c + 1], w2[(c // 4) * 4 : (c // 4) * 4 + 4, c % 4].flatten(),
            ]).norm()
            for c in range(8)
        ]
    ).detach()  # fmt: skip
    torch.testing.assert_close(coupled.norms(), expected_grouped, rtol=1e-5, atol=1e-6)
    seq = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 4, 2)
    )
    groups = build_groups(seq, {"filter": 1.0}, couple=True)
    first = next(g for g in groups if g.modules == ("0",))
    assert {m.name for m in first.members} == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight"}
    w0, b0, g1, b1, w3 = seq[0].weight, seq[0].bias, seq[1].weight, seq[1].bias, seq[3].weight
    expected = torch.stack(
        [
            torch.cat([w0[c].flatten(), b0[c : c + 1], g1[c : c + 1], b1[c : c + 1], w3[:, c].flatten()]).norm()
            for c in range(6)
        ]
    ).detach()
    torch.testing.assert_close(first.norms(), expected, rtol=1e-5, atol=1e-6)
    # conv 3 feeds the Linear through a flatten of 4 channels x 4 positions: hw factor 4
    second = next(g for g in groups if g.modules == ("3",))
    w5 = seq[5].weight.detach()
    exp2 = torch.stack(
        [
            torch.cat([seq[3].weight[c].flatten(), seq[3].bias[c : c + 1], w5[:, 4 * c : 4 * c + 4].flatten()]).norm()
            for c in range(4)
        ]
    ).detach()
    torch.testing.assert_close(second.norms(), exp2, rtol=1e-5, atol=1e-6)


def test_residual_adds_merge_channel_spaces_and_find_depth_branches() -> None:
    an = analyze(resnet20())
    merged = [s for s in an.spaces if len(s.producers) > 1]
    # one merged space per stage: stem conv + 3 block outputs, then 3 block outputs + projection
    assert sorted(len(s.producers) for s in merged) == [4, 4, 4]
    assert len(an.depth_branches) == 9
    assert all(len(b) == 2 and b[0].endswith("conv1") for b in an.depth_branches)
    assert an.terminal_modules == {"fc"}
    lenet = analyze(LeNet())
    conv2 = next(s for s in lenet.spaces if s.producers == ["conv2"])
    assert conv2.consumers == [("fc1", 0, 16)]


def test_concat_lays_spaces_side_by_side() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    an = analyze(Cat())
    consumers = {s.producers[0]: s.consumers for s in an.spaces}
    assert consumers["a"] == [("c", 0, 1)] and consumers["b"] == [("c", 4, 1)]


def test_depth_groups_cover_branch_weights() -> None:
    groups = build_groups(resnet20(), {"depth": 1.0})
    assert len(groups) == 9 and all(g.num_groups == 1 for g in groups)
    g = groups[0]
    expected = torch.cat([m.param.detach().flatten() for m in g.members]).norm()
    torch.testing.assert_close(g.norms(), expected.reshape(1))


def test_layer_lambdas_and_size_scaling() -> None:
    net = SmallNet()
    groups = build_groups(net, {"shape": 2.0}, layer_lambdas={"conv2": 0.5}, scale_by_group_size=True)
    lam = {g.modules[0]: g.lam for g in groups}
    assert lam["conv1"] == pytest.approx(2.0 * 8**0.5)  # shape groups of conv1: 8 filters
    assert lam["conv2"] == pytest.approx(1.0 * 4**0.5)  # 4 filters per conv-group bank
    groups = build_groups(net, {"shape": 2.0, "kernel2d": 1.0}, layer_lambdas={"conv1": {"shape": 0.0}})
    assert {(g.modules[0], g.kind): g.lam for g in groups}[("conv1", "shape")] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lambdas": {"filters": 1.0}}, r"unknown group type 'filters'; allowed: filter, channel"),
        ({"lambdas": {"filter": -1.0}}, r"lambdas\['filter'\] must be a finite number >= 0, got -1.0"),
        ({"lambdas": {"shape": float("nan")}}, r"lambdas\['shape'\] must be a finite number >= 0"),
        ({"lambdas": {"filter": 1.0}, "include": ["conv9"]}, r"include: selector 'conv9' matches no module"),
        ({"lambdas": {"filter": 1.0}, "exclude": ["nope.*"]}, r"exclude: selector 'nope.\*' matches no module"),
        (
            {"lambdas": {"filter": 1.0}, "include": ["bn1"]},
            r"matches only unsupported module types \(e.g. bn1: BatchNorm2d\)",
        ),
        (
            {"lambdas": {"shape": 1.0}, "layer_lambdas": {"fc1": {"shape": 1.0}}},
            r"group type 'shape' is unsupported for fc1 \(Linear\)",
        ),
        (
            {"lambdas": {"shape": 1.0}, "layer_lambdas": {"conv7": 2.0}},
            r"layer_lambdas: pattern 'conv7' matches no module",
        ),
        ({"lambdas": {"shape": 1.0}, "include": ["fc1"]}, r"group type 'shape' needs nn.Conv2d layers"),
        ({"lambdas": {"depth": 1.0}}, r"group type 'depth' needs residual branches"),
        ({"lambdas": {"depth": 1.0}, "depth_blocks": ["block9"]}, r"depth_blocks: no module named 'block9'"),
    ],
)
def test_bad_configuration_raises(kwargs, match) -> None:
    lambdas = kwargs.pop("lambdas")
    with pytest.raises(ValueError, match=match):
        build_groups(SmallNet(), lambdas, **kwargs)


def test_untraceable_model_with_coupling_warns_and_leaves_filters_uncoupled() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow: not fx-traceable
                y = y * 2
            return self.fc(y.mean((2, 3)))

    with pytest.warns(
        UserWarning,
        match=r"couple=True: filters whose channels cross code torch.fx cannot trace stay uncoupled .*Dynamic: TraceError: symbolically traced",
    ):
        coupled = build_groups(Dynamic(), {"filter": 1.0}, couple=True)
    assert [(g.name, [m.name for m in g.members]) for g in coupled] == [("conv:filter", ["conv.weight"])]
    groups = build_groups(Dynamic(), {"filter": 1.0, "neuron_in": 1.0})  # uncoupled still works
    assert {g.name for g in groups} == {"conv:filter", "fc:neuron_in"}


def test_type_with_only_output_layers_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"group type 'filter' produced no groups: its only candidate layers \(0\)"):
        build_groups(nn.Sequential(nn.Conv2d(2, 4, 3)), {"filter": 1.0})

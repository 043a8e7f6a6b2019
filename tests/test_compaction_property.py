"""Property: compact() of any randomly structured model from the zoo computes the same function with no more
parameters, whatever filters, channel slices, biases, BN scales and alignment the draw produces."""

from __future__ import annotations

import random
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ssl_lightning import compact_with_info
from ssl_lightning.models import MLP, CifarConvNet, LeNet, resnet20

from .test_channel_removal import (
    ConcatJoin,
    ConvBNChain,
    ConvFlattenLinear,
    DepthwiseSeparable,
    GroupedChain,
    UpsampleCatPoolHead,
    n_params,
    randomize_bn,
    rel_err,
)

ZOO = [
    (ConvBNChain, (2, 3, 16, 16)), (DepthwiseSeparable, (2, 3, 12, 12)), (ConcatJoin, (2, 4, 8, 8)),
    (ConvFlattenLinear, (2, 3, 8, 8)), (GroupedChain, (2, 3, 9, 9)), (UpsampleCatPoolHead, (2, 3, 8, 8)),
    (resnet20, (2, 3, 32, 32)), (LeNet, (2, 1, 28, 28)), (lambda: MLP((20, 16, 12, 4)), (3, 20)),
    (CifarConvNet, (2, 3, 32, 32)),
]  # fmt: skip


def zero_randomly(model: nn.Module, rng: random.Random, rows: float, cols: float) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                dead = [i for i in range(mod.weight.shape[0]) if rng.random() < rows]
                mod.weight[dead] = 0
                if mod.bias is not None:
                    if rng.random() < 0.5:
                        mod.bias[dead] = 0  # as coupled groups do
                    if rng.random() < 0.5:
                        mod.bias.abs_()  # constants that survive the ReLU
                mod.weight[:, [i for i in range(mod.weight.shape[1]) if rng.random() < cols]] = 0
            if isinstance(mod, nn.BatchNorm2d) and rng.random() < 0.5:
                mod.weight[[i for i in range(mod.num_features) if rng.random() < rows]] = 0


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    arch=st.integers(0, len(ZOO) - 1),
    seed=st.integers(0, 10_000),
    rows=st.floats(0.0, 0.6),
    cols=st.floats(0.0, 0.4),
    align=st.sampled_from([1, 2, 4, 8]),
)
def test_compaction_preserves_the_function(arch: int, seed: int, rows: float, cols: float, align: int) -> None:
    build, shape = ZOO[arch]
    torch.manual_seed(seed)
    model = build()
    randomize_bn(model, seed)
    zero_randomly(model, random.Random(seed), rows, cols)
    model.eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "unsupported op" notes for the zoo's functional heads
        info = compact_with_info(model, x, measure=False, align=align)
    with torch.no_grad():
        for trial in (x, torch.randn_like(x) * 2):
            assert rel_err(model(trial), info.model(trial)) <= 1e-4
    assert n_params(info.model) <= n_params(model)

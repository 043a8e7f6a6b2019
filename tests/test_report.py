"""Sparsity report: structure counts from exact zeros, FLOPs against torch's flop counter, text and chart."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_lightning.models import LeNet
from ssl_lightning.report import plot_layer_sparsity, sparsity_report


def test_dense_macs_agree_with_torch_flop_counter() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 5),
    )
    x = torch.randn(1, 3, 16, 16)
    report = sparsity_report(model, x)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert 2 * report.totals()["macs"] == counter.get_total_flops()
    assert report.totals()["flop_fraction"] == 1.0


def test_lenet_structure_counts_and_flops() -> None:
    model = LeNet()
    w = model.conv2.weight
    with torch.no_grad():
        w[:10] = 0  # 10 of 50 filters
        w[:, :5] = 0  # 5 of 20 channels (all their columns)
        w[:, 5, 0, 0] = 0  # one more column
        model.conv1.weight[3] = 0
        model.fc1.weight[:, :100] = 0  # 100 input features
        model.fc1.weight[7] = 0
    report = sparsity_report(model, torch.zeros(1, 1, 28, 28))
    conv1, conv2, fc1, fc2 = report.layers
    assert (conv1.filters_kept, conv1.filters) == (19, 20)
    assert (conv2.filters_kept, conv2.channels_kept, conv2.filter_size_kept) == (40, 15, 15 * 25 - 1)
    assert conv2.row_sparsity == 10 / 50 and conv2.col_sparsity == (5 * 25 + 1) / 500
    assert conv2.macs == 50 * 500 * 8 * 8 and conv2.macs_kept == 40 * 374 * 8 * 8
    assert conv2.kernel2d_sparsity == 1 - (40 * 15) / (50 * 20)
    assert (fc1.filters_kept, fc1.channels_kept, fc1.macs_kept) == (499, 700, 499 * 700)
    assert conv2.params_nonzero == 40 * 374 + 50  # weights + all 50 biases
    metrics = report.metrics()
    assert metrics["ssl/conv2/filter_sparsity"] == 0.2 and metrics["ssl/conv2/channel_sparsity"] == 0.25
    assert metrics["ssl/fc1/neuron_in_sparsity"] == 100 / 800
    total = report.totals()
    assert total["macs_kept"] == sum(s.macs_kept for s in (conv1, conv2, fc1, fc2))
    text = report.to_text()
    assert "conv2" in text and "40/50" in text and "15/20" in text and "total" in text
    assert report.to_dict()["layers"][1]["flop_fraction"] == conv2.macs_kept / conv2.macs


def test_chart_is_an_rgb_image() -> None:
    image = plot_layer_sparsity(sparsity_report(LeNet(), torch.zeros(1, 1, 28, 28)))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert image.std() > 0


def test_resnet_depth_must_be_6n_plus_2() -> None:
    import pytest

    from ssl_lightning.models import ResNetCifar

    with pytest.raises(ValueError, match=r"ResNetCifar depth must be 6n\+2 \(20, 32, 56, ...\), got 21"):
        ResNetCifar(21)

"""Networks nobody on the project wrote: transformers vision models (built from their config classes, random
init, no download) and MONAI networks, plus a random structured-zero generator. Used by the model-zoo test
(``tests/test_model_zoo.py``, optional extra ``zoo``) and ``benchmarks/model_zoo.py``.

Every builder takes ``small``: reduced widths and depths (and inputs) for the test suite; ``small=False`` is
the library's default configuration (ResNet-18/50 etc. at full width) for the benchmark table.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ssl_lightning.groups import build_groups
from ssl_lightning.penalty import apply_masks_, keep_masks

Builder = Callable[[bool], tuple[nn.Module, Tensor]]


class Logits(nn.Module):
    """A transformers ``*ForImageClassification`` / ``*Model`` returning its first output tensor (what a
    LightningModule would use), so a model output is one tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out[0] if not isinstance(out, Tensor) else out


def _hf(config_cls: str, model_cls: str, full: dict[str, object], small: dict[str, object]) -> Builder:
    def build(is_small: bool) -> tuple[nn.Module, Tensor]:
        import transformers

        kw = {**full, **(small if is_small else {})}
        config = getattr(transformers, config_cls)(**kw)
        net = getattr(transformers, model_cls)(config)
        size = 64 if is_small else 224
        return Logits(net).eval(), torch.randn(2, 3, size, size)

    return build


def _monai(name: str, full: dict[str, object], small: dict[str, object], size: tuple[int, int] = (64, 224)) -> Builder:
    def build(is_small: bool) -> tuple[nn.Module, Tensor]:
        import monai.networks.nets as nets

        kw = {**full, **(small if is_small else {})}
        net = getattr(nets, name)(**kw)
        s = size[0] if is_small else size[1]
        return net.eval(), torch.randn(2, int(kw.get("in_channels", 3)), s, s)  # type: ignore[call-overload]

    return build


def _monai_resnet(depth: int) -> Builder:
    def build(is_small: bool) -> tuple[nn.Module, Tensor]:
        import monai.networks.nets as nets

        net = getattr(nets, f"resnet{depth}")(spatial_dims=2, n_input_channels=3, num_classes=10)
        s = 64 if is_small else 224
        return net.eval(), torch.randn(2, 3, s, s)

    return build


ZOO: dict[str, Builder] = {
    "hf-resnet18": _hf(
        "ResNetConfig", "ResNetForImageClassification",
        {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], "num_labels": 10},
        {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 32, 64], "embedding_size": 16},
    ),
    "hf-resnet50": _hf(
        "ResNetConfig", "ResNetForImageClassification", {"num_labels": 10},
        {"depths": [1, 1, 1, 1], "hidden_sizes": [32, 64, 64, 128], "embedding_size": 16},
    ),
    "hf-mobilenet-v1": _hf(
        "MobileNetV1Config", "MobileNetV1ForImageClassification", {"num_labels": 10},
        {"depth_multiplier": 0.25},
    ),
    "hf-mobilenet-v2": _hf(
        "MobileNetV2Config", "MobileNetV2ForImageClassification", {"num_labels": 10},
        {"depth_multiplier": 0.35},
    ),
    "hf-regnet": _hf(
        "RegNetConfig", "RegNetForImageClassification", {"num_labels": 10},
        {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 16, "groups_width": 8},
    ),
    "hf-efficientnet": _hf(
        "EfficientNetConfig", "EfficientNetForImageClassification", {"num_labels": 10},
        {"width_coefficient": 0.25, "depth_coefficient": 0.25, "image_size": 64, "hidden_dim": 320},
    ),
    "hf-convnext": _hf(
        "ConvNextConfig", "ConvNextForImageClassification", {"num_labels": 10},
        {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128]},
    ),
    "hf-convnextv2": _hf(
        "ConvNextV2Config", "ConvNextV2ForImageClassification", {"num_labels": 10},
        {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128]},
    ),
    "hf-bit": _hf(
        "BitConfig", "BitForImageClassification", {"num_labels": 10},
        {"depths": [1, 1, 1, 1], "hidden_sizes": [128, 128, 256, 256], "embedding_size": 32},
    ),
    "monai-resnet18": _monai_resnet(18),
    "monai-resnet50": _monai_resnet(50),
    "monai-densenet121": _monai(
        "DenseNet121", {"spatial_dims": 2, "in_channels": 3, "out_channels": 10},
        {"init_features": 16, "growth_rate": 8, "block_config": (2, 2, 2, 2)},
    ),
    "monai-unet": _monai(
        "UNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": (16, 32, 64, 128, 256),
                 "strides": (2, 2, 2, 2), "num_res_units": 2},
        {"channels": (8, 16, 32), "strides": (2, 2)}, size=(32, 128),
    ),
    "monai-basicunet": _monai(
        "BasicUNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 2},
        {"features": (8, 8, 16, 32, 64, 8)}, size=(32, 128),
    ),
    "monai-segresnet": _monai(
        "SegResNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 2},
        {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)}, size=(32, 128),
    ),
    "monai-efficientnet-b0": _monai(
        "EfficientNetBN", {"model_name": "efficientnet-b0", "pretrained": False, "spatial_dims": 2,
                           "in_channels": 3, "num_classes": 10}, {}, size=(64, 224),
    ),
}  # fmt: skip


def zero_structure(model: nn.Module, seed: int = 0, couple: bool = False, kept: float = 0.6) -> None:
    """Zero a random ``1 - kept`` of the filters and hidden Linear neurons (coupled with their BN channels and
    consumers' inputs when ``couple``) and of the filter-shape columns of every conv, in place."""
    groups = []
    for kind in ("filter", "shape", "neuron_out"):  # each type where the model has layers for it
        # no layer may take a type (BiT: every conv standardises its weight; a CNN without hidden Linear)
        with contextlib.suppress(ValueError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "stay uncoupled" / "no groups for" are expected here
            groups += build_groups(model, {kind: 1.0}, couple=couple)
    g = torch.Generator().manual_seed(seed)
    keeps = []
    for grp in groups:
        keep = torch.rand(grp.num_groups, generator=g) < (kept if grp.kind != "shape" else 0.5 + kept / 2)
        keep[int(torch.randint(grp.num_groups, (1,), generator=g))] = True  # never a whole layer
        keeps.append(keep)
    params = {m.name: m.param for grp in groups for m in grp.members}
    with torch.no_grad():
        apply_masks_(params, keep_masks(groups, keeps))


def zero_branches(model: nn.Module, branches: list[list[str]], every: int = 2) -> list[list[str]]:
    """Zero every weight of every ``every``-th residual branch (in place); returns the branches zeroed."""
    mods = dict(model.named_modules())
    done = branches[::every]
    with torch.no_grad():
        for branch in done:
            for name in branch:
                mods[name].weight.zero_()  # type: ignore[operator]
                if getattr(mods[name], "bias", None) is not None:
                    mods[name].bias.zero_()  # type: ignore[union-attr]
    return done


def macs(model: nn.Module, x: Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2

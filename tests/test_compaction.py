"""compact(): shape/filter-sparse convs become CompactConv2d, outputs unchanged, errors name the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_lightning import CompactConv2d, CompactionError, compact, compact_with_info
from ssl_lightning.models import LeNet, resnet20


def zero_structure(model: nn.Module, seed: int = 0, rows: float = 0.3, cols: float = 0.6) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3] > 9:
                w = m.weight.view(m.groups, m.out_channels // m.groups, -1)
                w[:, :, torch.rand(w.shape[2], generator=g) < cols] = 0
                m.weight[torch.rand(m.out_channels, generator=g) < rows] = 0


def test_lenet_compacts_and_stays_equal() -> None:
    torch.manual_seed(0)
    model = LeNet()
    zero_structure(model)
    x = torch.randn(4, 1, 28, 28)
    info = compact_with_info(model, x, measure=False)
    assert info.replaced == {"conv2": "fused"} or "conv2" in info.replaced
    assert isinstance(info.model.conv2, CompactConv2d) and isinstance(model.conv2, nn.Conv2d)  # original untouched
    torch.testing.assert_close(info.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert info.max_abs_error < 1e-4
    packed = info.model.conv2.weight.numel()
    assert packed < model.conv2.weight.numel() * 0.5  # the compacted layer stores only kept rows x columns


def test_resnet_with_bn_and_residuals_stays_equal_in_eval() -> None:
    torch.manual_seed(1)
    model = resnet20()
    zero_structure(model, rows=0.2, cols=0.5)
    model.train()
    for _ in range(2):  # non-trivial BN statistics
        model(torch.randn(8, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    fast = compact(model, x, measure=False)
    assert model.training and fast.training  # the original's mode is restored, and given to the copy
    fast.eval()
    assert sum(isinstance(m, CompactConv2d) for m in fast.modules()) >= 10
    model.eval()
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_verification_names_the_first_differing_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = LeNet()
    zero_structure(model)
    original_forward = CompactConv2d.forward

    def broken(self, x):  # type: ignore[no-untyped-def]
        return original_forward(self, x) + 1.0

    monkeypatch.setattr(CompactConv2d, "forward", broken)
    with pytest.raises(CompactionError, match=r"compacted layer conv1 differs from the original by 1"):
        compact(model, torch.randn(2, 1, 28, 28), measure=False)


def test_unreached_and_subclassed_convs_are_left_dense_with_a_warning() -> None:
    class MyConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = MyConv(3, 8, 3)
            self.unused = nn.Conv2d(8, 8, 3)
            self.b = nn.Conv2d(8, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    net = Net()
    zero_structure(net)
    with pytest.warns(UserWarning) as record:
        fast = compact(net, torch.randn(1, 3, 12, 12), measure=False)
    messages = " ".join(str(r.message) for r in record)
    assert "a is a MyConv" in messages and "unused is not reached by the example inputs" in messages
    assert type(fast.a) is MyConv and isinstance(fast.unused, nn.Conv2d)


def test_compacted_model_round_trips_through_state_dict_and_plan(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from ssl_lightning import apply_compaction_plan, compaction_plan

    torch.manual_seed(2)
    model = resnet20()
    zero_structure(model, rows=0.3, cols=0.6)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    fast = compact(model, x, measure=False)
    plan = json.loads(json.dumps(compaction_plan(fast)))  # the plan is plain JSON
    assert plan["version"] == 3 and plan["convs"]
    assert all(spec["impl"] == "auto" for spec in plan["convs"].values())  # the structure, not a kernel choice
    assert plan["channels"]["out_keep"]  # zero filters coupled through BN / the next conv were removed
    torch.save(fast.state_dict(), tmp_path / "compact.pt")
    fresh = apply_compaction_plan(resnet20().eval(), plan)
    fresh.load_state_dict(torch.load(tmp_path / "compact.pt", weights_only=True), strict=True)
    torch.testing.assert_close(fresh(x), fast(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"compaction plan names 'blocks.99.conv1', which this model does not have"):
        apply_compaction_plan(resnet20(), {"blocks.99.conv1": next(iter(plan["convs"].values()))})  # version 1
    with pytest.raises(ValueError, match=r"compaction plan names 'fc', which is a Linear, not an nn.Conv2d"):
        apply_compaction_plan(resnet20(), {"version": 2, "convs": {"fc": next(iter(plan["convs"].values()))}})
    with pytest.raises(ValueError, match=r"version 7 is not supported"):
        apply_compaction_plan(resnet20(), {"version": 7})


def test_models_pickled_whole_with_the_former_module_paths_still_load() -> None:
    import pickle

    from ssl_lightning import CompactLinear

    conv, linear = nn.Conv2d(3, 4, 3), nn.Linear(16, 2)
    with torch.no_grad():
        conv.weight[:2] = 0
        linear.weight[:, :5] = 0
    model = nn.Sequential(CompactConv2d.from_conv(conv, impl="fused"), nn.Flatten(), CompactLinear.from_linear(linear))
    data = pickle.dumps(model, protocol=2)  # protocol 2 names a class as text: b"module\nname\n"
    for name, former in (("CompactConv2d", "compact_conv"), ("CompactLinear", "compact_linear")):
        now = f"ssl_lightning.compaction.layers\n{name}\n".encode()
        assert now in data
        data = data.replace(now, f"ssl_lightning.{former}\n{name}\n".encode())  # as an earlier release wrote it
    restored = pickle.loads(data)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))

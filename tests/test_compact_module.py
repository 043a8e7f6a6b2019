"""CompactConv2d.from_conv: equal to the source conv for every implementation; choice; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_lightning import CompactConv2d, ops
from ssl_lightning.timing import fastest

from .conftest import VirtualClock


def sparse_conv(
    cin: int, cout: int, k: int, groups: int = 1, seed: int = 0, rows: float = 0.3, cols: float = 0.5, **kw
) -> nn.Conv2d:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, groups=groups, **kw)
    with torch.no_grad():
        w = conv.weight
        w[torch.rand(cout) < rows] = 0
        bank = w.view(groups, cout // groups, -1)
        bank[:, :, torch.rand(bank.shape[2]) < cols] = 0
    return conv


CONFIGS = [
    dict(cin=6, cout=8, k=3, padding=1),
    dict(cin=6, cout=8, k=3, groups=2, stride=2, padding=2, dilation=2),
    dict(cin=4, cout=12, k=5, groups=4, padding=2, bias=False),
    dict(cin=3, cout=16, k=1),
    dict(cin=8, cout=8, k=3, groups=8, padding=1),  # depthwise
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("impl", ["fused", "rows", "dense", "auto"])
@pytest.mark.parametrize("compact_output", [False, True])
def test_forward_equals_source_conv(cfg, impl, compact_output) -> None:
    conv = sparse_conv(**cfg)
    x = torch.randn(2, cfg["cin"], 11, 9)
    mod = CompactConv2d.from_conv(conv, impl=impl, compact_output=compact_output)
    expected = conv(x)
    if compact_output:
        keep = conv.weight.detach().flatten(1).ne(0).any(1)
        expected = expected[:, keep]
    got = mod(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_keeps_only_kept_weights_and_trains() -> None:
    conv = sparse_conv(16, 32, 3, padding=1, rows=0.5, cols=0.7)
    mod = CompactConv2d.from_conv(conv, impl="fused")
    kept = int(conv.weight.ne(0).any(dim=(1)).sum())  # nonzero (filter, tap) pairs bound the packed size
    assert mod.weight.numel() < conv.weight.numel() and mod.weight.numel() >= kept
    assert mod.weight.numel() == mod.row_idx.numel() * mod.col_idx.numel()
    x = torch.randn(2, 16, 8, 8)
    mod(x).square().mean().backward()
    assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    assert "impl=fused" in repr(mod)


def test_auto_without_measurement_follows_the_kept_fractions() -> None:
    assert CompactConv2d.from_conv(sparse_conv(16, 32, 3, rows=0.0, cols=0.8)).impl == "fused"
    assert CompactConv2d.from_conv(sparse_conv(16, 32, 3, rows=0.5, cols=0.0)).impl == "rows"
    assert CompactConv2d.from_conv(sparse_conv(16, 32, 3, rows=0.0, cols=0.0)).impl == "dense"
    # about 90 % of the MACs left: not worth a different implementation without a measurement
    assert CompactConv2d.from_conv(sparse_conv(16, 32, 3, rows=0.05, cols=0.05)).impl == "dense"


def test_auto_with_example_input_measures_and_stays_exact() -> None:
    conv = sparse_conv(32, 64, 3, padding=1, rows=0.5, cols=0.8)
    x = torch.randn(1, 32, 16, 16)
    mod = CompactConv2d.from_conv(conv, example_input=x)
    assert mod.impl in ("fused", "rows", "dense")
    torch.testing.assert_close(mod(x), conv(x), rtol=1e-5, atol=1e-5)


def test_rows_impl_rounds_filter_count_to_alignment() -> None:
    conv = sparse_conv(8, 64, 3, rows=0.5, cols=0.0)
    mod = CompactConv2d.from_conv(conv, impl="rows", align=16)
    assert mod.rows_sel.numel() % 16 == 0 and mod.rows_sel.numel() < 64
    assert int(mod.rows_real.sum()) == int(conv.weight.flatten(1).ne(0).any(1).sum())
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():  # the row-only conv runs the aligned filter count, derived from the packed weight
        assert mod._derived("rows").shape == (mod.rows_sel.numel(), 8, 3, 3)
        torch.testing.assert_close(mod(x), conv(x), rtol=1e-5, atol=1e-5)


def test_padding_modes_the_fused_op_does_not_implement() -> None:
    conv = sparse_conv(4, 8, 3, padding=1, padding_mode="reflect")
    with pytest.warns(
        UserWarning, match=r"padding_mode='reflect' is not implemented by the fused op; keeping the dense"
    ):
        mod = CompactConv2d.from_conv(conv)
    assert mod.impl == "dense"
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(mod(x), conv(x))
    with pytest.raises(
        ValueError,
        match=r"impl='fused' supports zero padding given as numbers; this conv has padding=\(1, 1\), padding_mode='reflect'",
    ):
        CompactConv2d.from_conv(conv, impl="fused")
    with pytest.raises(TypeError, match=r"needs an nn\.Conv2d, got Linear"):
        CompactConv2d.from_conv(nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'fused', 'rows', 'dense', got 'fast'"):
        CompactConv2d.from_conv(conv, impl="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_path_matches_and_training_path_has_grads(mode: str) -> None:
    conv = sparse_conv(8, 16, 3, padding=1, rows=0.3, cols=0.7)
    mod = CompactConv2d.from_conv(conv, impl="fused")
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        y = mod(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, conv(x).detach(), rtol=1e-5, atol=1e-5)
    assert mod(x).requires_grad


def test_compact_output_needs_numeric_zero_padding() -> None:
    conv = sparse_conv(4, 8, 3, padding="same")
    with pytest.raises(ValueError, match="compact_output needs a conv with numeric zero padding"):
        CompactConv2d.from_conv(conv, compact_output=True)


def test_flop_counter_counts_only_kept_rows_and_columns_of_the_fused_op() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_lightning._ext import has_compiled_ops

    if not has_compiled_ops():
        pytest.skip("the FLOP formula is registered for the compiled op")
    conv = nn.Conv2d(16, 32, 3, padding=1)
    with torch.no_grad():
        conv.weight[:, :, 0] = 0  # 3 of 9 taps per channel: 96 of 144 columns kept
        conv.weight[:8] = 0  # 24 of 32 filters kept
    mod = CompactConv2d.from_conv(conv, impl="fused")
    with FlopCounterMode(display=False) as counter:
        mod(torch.randn(2, 16, 8, 8))
    assert counter.get_total_flops() == 2 * (2 * 8 * 8) * 24 * 96


class _Work(nn.Module):
    """Takes ``seconds`` per call on the virtual clock: a module with an exactly known run time."""

    def __init__(self, clock: VirtualClock, seconds: float) -> None:
        super().__init__()
        self.advance = clock.work(seconds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.advance()
        return x


def test_the_choice_keeps_the_baseline_unless_a_candidate_wins_by_the_margin() -> None:
    from ssl_lightning.timing import choose

    # the decision on given timings: deterministic, whatever the machine's load
    assert choose({"dense": 1.0, "fused": 0.5}) == "fused"
    assert choose({"dense": 1.0, "fused": 0.99}) == "dense"  # 1 % is within the margin
    assert choose({"dense": 1.0, "fused": 0.99}, margin=0.0) == "fused"
    assert choose({"dense": 0.5, "fused": 1.0}) == "dense"
    assert choose({"dense": 1.0, "rows": 0.9, "fused": 0.6}) == "fused"
    with pytest.raises(ValueError, match="margin must be in"):
        choose({"dense": 1.0}, margin=1.0)
    with pytest.raises(ValueError, match="at least one timing"):
        choose({})


def test_fastest_times_the_modules_it_is_given(virtual_clock: VirtualClock) -> None:
    x = torch.zeros(1)

    def work(seconds: float) -> _Work:
        return _Work(virtual_clock, seconds)

    assert fastest({"dense": work(2e-3), "fused": work(0.5e-3)}, x) == "fused"
    assert fastest({"dense": work(0.5e-3), "fused": work(2e-3)}, x) == "dense"
    assert fastest({"dense": work(1e-3), "fused": work(0.98e-3)}, x) == "dense"  # 2 %: within the margin
    assert fastest({"dense": work(1e-3), "fused": work(0.96e-3)}, x) == "fused"
    spreads: dict[str, float] = {}
    fastest({"dense": work(1e-3), "fused": work(0.5e-3)}, x, spreads=spreads)
    assert spreads == pytest.approx({"dense": 0.0, "fused": 0.0})  # identical blocks: no disturbance
    with pytest.raises(ValueError, match="margin must be in"):
        fastest({"dense": work(1e-3)}, x, margin=1.0)
    with pytest.raises(ValueError, match="at least one module"):
        fastest({}, x)


def test_rows_full_width_output_trains_like_the_source_conv() -> None:
    conv = sparse_conv(6, 16, 3, padding=1, rows=0.4, cols=0.0)
    mod = CompactConv2d.from_conv(conv, impl="rows", align=4)
    x = torch.randn(2, 6, 9, 9)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(2, 16, 9, 9)
    (conv(x1) * gy).sum().backward()
    (mod(x2) * gy).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(mod.bias.grad, conv.bias.grad)  # removed filters' bias too
    # the packed weight trains: its gradient is the source conv's at the kept rows and columns
    want = ops.pack_compact_weight(conv.weight.grad, mod.row_idx, mod.row_ptr, mod.col_idx, mod.col_ptr)
    torch.testing.assert_close(mod.weight.grad, want)


def test_measured_choice_times_rows_only_when_enough_filters_go(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl_lightning.compaction.layers as cc
    from ssl_lightning.timing import FASTEST_MARGIN

    timed: list[list[str]] = []

    def record(mods, x, margin=FASTEST_MARGIN, **kw):  # type: ignore[no-untyped-def]
        timed.append(list(mods))
        return next(iter(mods))

    monkeypatch.setattr(cc, "fastest", record)
    x = torch.randn(1, 8, 10, 10)
    few = sparse_conv(8, 32, 3, rows=0.0, cols=0.0)
    with torch.no_grad():
        few.weight[:3] = 0  # 29/32 filters kept: ~91 % of the MACs remain
    assert CompactConv2d.from_conv(few, example_input=x).impl == "dense"
    assert timed == [["dense", "fused"]]  # the fused op can still win where the dense conv is weak
    # compact output: the dense conv would gather the kept channels too, so the row-only conv is timed
    CompactConv2d.from_conv(few, example_input=x, compact_output=True)
    assert timed[1:] == [["dense", "rows", "fused"]]
    timed.clear()
    CompactConv2d.from_conv(sparse_conv(8, 32, 3, rows=0.5, cols=0.5), example_input=x)
    assert timed == [["dense", "rows", "fused"]]
    timed.clear()
    assert CompactConv2d.from_conv(sparse_conv(8, 32, 3, rows=0.0, cols=0.0), example_input=x).impl == "dense"
    assert timed == [["dense", "fused"]]  # nothing removed: the fused op may still beat a weak dense kernel

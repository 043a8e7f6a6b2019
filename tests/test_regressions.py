"""Regression tests for the defects an outside probe found (issue 12); each names the defect it pins down.

Every test here failed on commit 97eb41e.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ssl_lightning import CompactConv2d, ops
from ssl_lightning._ext import has_compiled_ops

from .test_compact_conv import _bad, _env, case

compiled = pytest.mark.skipif(not has_compiled_ops(), reason="ssl_lightning._C not built")


def _pruned_conv(bias: bool = True, dtype: torch.dtype = torch.float32, cols: bool = False) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 16, 3, bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight[8:] = 0
        if cols:
            conv.weight[:, 1, 0] = 0
    return conv


# ---------------------------------------------------------------------------------------------- defect 1
@pytest.mark.parametrize("grad", [False, True])
def test_rows_impl_never_writes_into_its_bias(grad: bool) -> None:
    """Batch 1 with a 1x1 output: the bias-filled output must be a new tensor, not the bias parameter."""
    conv = _pruned_conv()
    m = CompactConv2d.from_conv(conv, impl="rows").eval()
    before = m.bias.detach().clone()
    x = torch.randn(1, 4, 3, 3)
    with torch.set_grad_enabled(grad):
        for _ in range(2):
            torch.testing.assert_close(m(x), conv(x))
    assert torch.equal(m.bias.detach(), before)


# ---------------------------------------------------------------------------------------------- defect 2
@compiled
@pytest.mark.parametrize("gemm", ["blas", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lowered_tile_path_without_bias_runs_under_autograd_on_several_threads(gemm: str, dtype: torch.dtype) -> None:
    """batch * groups >= threads > 1 puts ATen GEMMs on pool threads: they must see the caller's dispatch state."""
    conv = _pruned_conv(bias=False, dtype=dtype, cols=True)
    m = CompactConv2d.from_conv(conv, impl="fused")
    x = torch.randn(4, 4, 8, 8, dtype=dtype, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _env("SSL_LIGHTNING_GEMM", gemm):
            y = m(x)
            y.sum().backward()
    finally:
        torch.set_num_threads(threads)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(y, conv(x), **tol)
    assert x.grad is not None and m.weight.grad is not None


# ---------------------------------------------------------------------------------------------- defect 4
@compiled
def test_strided_and_expanded_index_lists_give_the_right_answer() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(8)
    want = ops.compact_conv2d_reference(x, wc, ri, rp, ci, cp, b, *rest, False)
    strided_ci = torch.stack([ci, torch.full_like(ci, -7)], 1).flatten()[::2]  # a view with stride 2
    assert strided_ci.stride() == (2,)
    got = torch.ops.ssl_lightning.compact_conv2d(x, wc, ri, rp, strided_ci, cp, b, *rest, False)
    torch.testing.assert_close(got, want)
    strided_ri = torch.stack([ri, ri], 1).flatten()[::2]
    got = torch.ops.ssl_lightning.compact_conv2d(x, wc, strided_ri, rp, ci, cp, b, *rest, False)
    torch.testing.assert_close(got, want)


@compiled
@pytest.mark.parametrize(
    ("change", "match"),
    [
        # stride 0: every entry reads the same element; the lists' ends no longer match (was out-of-bounds reads)
        ({"row_ptr": torch.zeros(1, dtype=torch.long).expand(3)}, r"row_ptr/col_ptr end \(0, "),
        ({"col_idx": None}, r"column index \d+ appears twice in group 0"),
        ({"row_idx": None}, r"row index \d+ appears twice"),
        ({"row_idx": "meta"}, r"row_idx is on meta; index lists must be on the CPU or on the input's device"),
        ({"col_ptr": "meta"}, r"col_ptr is on meta"),
    ],
)
def test_invalid_index_lists_are_refused(change: dict, match: str) -> None:
    x, wc, ri, rp, ci, cp, *_ = case(8)
    (key, value), = change.items()
    if isinstance(value, str):
        value = {"row_idx": ri, "col_ptr": cp}[key].to("meta")
    elif value is None:  # the group's first entry repeated in place of its second
        value = (ci if key == "col_idx" else ri).clone()
        value[1] = value[0]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ssl_lightning.compact_conv2d(*_bad(**{key: value}))


# ---------------------------------------------------------------------------------------------- defect 5
@compiled
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_input_smaller_than_kernel_is_refused_by_real_and_fake_kernel(stride: int) -> None:
    x = torch.ones(2, 8, 2, 2)
    args = _bad(input=x, padding=[0, 0], stride=[stride, stride])
    with pytest.raises(RuntimeError):  # as F.conv2d does
        F.conv2d(x, torch.ones(12, 4, 3, 3), groups=2, stride=stride)
    with pytest.raises(RuntimeError, match="is smaller than the dilated kernel"):
        torch.ops.ssl_lightning.compact_conv2d(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match="is smaller than the dilated kernel"):
            torch.ops.ssl_lightning.compact_conv2d(*fake)


@compiled
def test_fake_kernel_shape_matches_the_real_one_at_the_edge() -> None:
    """Input exactly the dilated kernel's size with stride 2: one output position, in both kernels."""
    args = _bad(input=torch.randn(2, 8, 3, 3), padding=[0, 0], stride=[2, 2])
    real = torch.ops.ssl_lightning.compact_conv2d(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.ssl_lightning.compact_conv2d(
            *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        )
    assert tuple(fake.shape) == tuple(real.shape) == (2, 12, 1, 1)


@compiled
@pytest.mark.parametrize("key", ["stride", "dilation", "padding", "kernel_size"])
def test_huge_geometry_values_are_refused_before_any_arithmetic(key: str) -> None:
    with pytest.raises(RuntimeError, match=r"must be at most 2\^31"):
        torch.ops.ssl_lightning.compact_conv2d(*_bad(**{key: [2**62, 1]}))


# ---------------------------------------------------------------------------------------------- defect 9
@compiled
@pytest.mark.parametrize("compact_output", [False, True])
def test_double_backward_through_the_fused_op(compact_output: bool) -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(5, n=2, groups=2, dtype=torch.float64)
    x.requires_grad_(), wc.requires_grad_(), b.requires_grad_()

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.ssl_lightning.compact_conv2d(x, w, ri, rp, ci, cp, b, *rest, compact_output)

    assert torch.autograd.gradgradcheck(f, (x, wc, b))
    # a gradient penalty (the common second-order use) reaches the weight
    (gx,) = torch.autograd.grad(f(x, wc, b).square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), wc)
    assert gw.abs().sum() > 0

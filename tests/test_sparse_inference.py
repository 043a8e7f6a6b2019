"""The irregular-sparsity inference path (CSR weight × lowered input) equals F.conv2d / F.linear on the sparse
weight, and ``sparsify`` swaps exactly the sparse-enough layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_lightning import sparsify
from ssl_lightning.compaction import SparseConv2d, SparseLinear


def sparse_(module: nn.Module, fraction: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = module.weight
        w.mul_((torch.rand(w.shape, generator=g) >= fraction).to(w.dtype))
    return module


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "padding", "dilation", "groups", "bias"),
    [
        (3, 8, 3, 1, 1, 1, 1, True),
        (4, 6, (2, 3), (2, 1), (1, 0), 1, 2, False),
        (8, 8, 3, 1, 2, 2, 8, True),  # depthwise, dilated
        (5, 7, 1, 1, 0, 1, 1, True),
    ],
)
@pytest.mark.parametrize("fraction", [0.0, 0.7, 1.0])
def test_sparse_conv_equals_conv2d_on_the_sparse_weight(
    cin: int, cout: int, kernel: object, stride: object, padding: object, dilation: int, groups: int, bias: bool,
    fraction: float,
) -> None:  # fmt: skip
    torch.manual_seed(0)
    conv = sparse_(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias), fraction)  # type: ignore[arg-type]
    x = torch.randn(3, cin, 9, 10)
    sparse = SparseConv2d(conv)
    assert sparse.nnz == int((conv.weight != 0).sum())
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)


def test_sparse_linear_equals_linear_on_any_leading_shape() -> None:
    torch.manual_seed(0)
    lin = sparse_(nn.Linear(12, 5), 0.8)
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(SparseLinear(lin)(x), lin(x), rtol=1e-5, atol=1e-5)


def test_sparsify_swaps_the_sparse_enough_layers_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        sparse_(nn.Conv2d(3, 8, 3), 0.9), nn.ReLU(), sparse_(nn.Conv2d(8, 4, 3), 0.1), nn.Flatten(),
        sparse_(nn.Linear(4 * 4 * 4, 10), 0.6),
    ).eval()  # fmt: skip
    fast = sparsify(model, min_sparsity=0.5)
    assert [type(m).__name__ for m in fast] == ["SparseConv2d", "ReLU", "Conv2d", "Flatten", "SparseLinear"]
    assert isinstance(model[0], nn.Conv2d)  # the original is untouched
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    chosen = sparsify(model, layers=["2"])
    assert isinstance(chosen[2], SparseConv2d) and isinstance(chosen[0], nn.Conv2d)
    restored = SparseConv2d(model[0])
    restored.load_state_dict(fast[0].state_dict())  # the CSR arrays travel in the state_dict
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model[0](x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers: 1 are not Conv2d / Linear modules of the model"):
        sparsify(model, layers=["1"])
    with pytest.raises(ValueError, match=r"min_sparsity must be a fraction in \[0, 1\], got 1.5"):
        sparsify(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match=r"SparseConv2d supports numeric zero padding only"):
        SparseConv2d(nn.Conv2d(3, 3, 3, padding="same"))

"""Inference for irregular (unstructured, ℓ1) sparsity: the weight stored as CSR and multiplied with the lowered
input, the baseline SSL's paper compares against (its Table 4 rows 1 and 4: Caffe's im2col + CSR GEMM).

:class:`SparseConv2d` / :class:`SparseLinear` hold the non-zeros of one trained layer (CSR arrays as buffers, so
``state_dict`` and ``.to(device)`` carry them); :func:`sparsify` swaps every Conv2d / Linear of a model whose
weight is sparse enough. torch's CSR × dense product runs on MKL's sparse BLAS on CPU. Inference only: the
weights are buffers, not parameters.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SparseConv2d", "SparseLinear", "sparsify"]


def _csr_parts(w2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        csr = w2d.detach().to_sparse_csr()
    return csr.crow_indices(), csr.col_indices(), csr.values()


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


class SparseConv2d(nn.Module):
    """A Conv2d whose weight is stored as CSR per conv group: ``y = W_csr @ unfold(x)`` (+ bias)."""

    bias: Tensor | None

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"SparseConv2d supports numeric zero padding only, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        w = conv.weight.detach()
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        rows, cols = w.shape[0] // conv.groups, w[0].numel()
        self.bank_shape = (rows, cols)
        for g in range(conv.groups):
            crow, col, values = _csr_parts(w[g * rows : (g + 1) * rows].reshape(rows, cols))
            self.register_buffer(f"crow_{g}", crow)
            self.register_buffer(f"col_{g}", col)
            self.register_buffer(f"values_{g}", values)
        self.register_buffer("bias", conv.bias.detach().clone() if conv.bias is not None else None)
        self.nnz = int(sum(getattr(self, f"values_{g}").numel() for g in range(conv.groups)))

    def bank(self, g: int) -> Tensor:
        return _csr(
            getattr(self, f"crow_{g}"), getattr(self, f"col_{g}"), getattr(self, f"values_{g}"), self.bank_shape
        )

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, C·KH·KW, L]
        k = self.bank_shape[1]
        outs = []
        for g in range(self.groups):
            lowered = cols[:, g * k : (g + 1) * k].transpose(0, 1).reshape(k, -1)  # [K, N·L]
            outs.append(torch.sparse.mm(self.bank(g), lowered))  # [rows, N·L]
        y = torch.cat(outs).view(self.out_channels, n, ho * wo).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.reshape(n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        total = self.out_channels * self.bank_shape[1]
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, nnz={self.nnz}/{total}"
        )


class SparseLinear(nn.Module):
    """A Linear whose weight is stored as CSR: ``y = (W_csr @ xᵀ)ᵀ`` (+ bias)."""

    crow: Tensor
    col: Tensor
    values: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        crow, col, values = _csr_parts(linear.weight)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)
        self.nnz = int(values.numel())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        w = _csr(self.crow, self.col, self.values, (self.out_features, self.in_features))
        y = torch.sparse.mm(w, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, nnz={self.nnz}/{self.in_features * self.out_features}"


def sparsify(model: nn.Module, min_sparsity: float = 0.5, layers: Iterable[str] | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode whose Conv2d / Linear layers with at least ``min_sparsity`` zero weights
    (or exactly those named in ``layers``) are :class:`SparseConv2d` / :class:`SparseLinear`. The original is
    untouched."""
    if not (0.0 <= min_sparsity <= 1.0):
        raise ValueError(f"min_sparsity must be a fraction in [0, 1], got {min_sparsity!r}")
    wanted = set(layers) if layers is not None else None
    out = copy.deepcopy(model).eval()
    for name, mod in list(out.named_modules()):
        if not isinstance(mod, nn.Conv2d | nn.Linear) or (wanted is not None and name not in wanted):
            continue
        zeros = float((mod.weight == 0).float().mean())
        if wanted is None and zeros < min_sparsity:
            continue
        replacement = SparseConv2d(mod) if isinstance(mod, nn.Conv2d) else SparseLinear(mod)
        out.set_submodule(name, replacement)
    if wanted is not None:
        missing = wanted - {n for n, m in out.named_modules() if isinstance(m, SparseConv2d | SparseLinear)}
        if missing:
            raise ValueError(f"layers: {', '.join(sorted(missing))} are not Conv2d / Linear modules of the model")
    return out

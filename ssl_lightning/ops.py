"""Typed wrappers for the compiled ops, their pure-PyTorch reference twins, and fake kernels.

Each op ``x`` has ``x`` (dispatches to the compiled kernel for the tensor's device when present,
else the reference) and ``x_reference`` (pure torch, the test oracle).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning._ext import has_compiled_ops, has_cuda_kernels

__all__ = ["lowered_nonzero", "lowered_nonzero_reference"]


def _check_lowered_args(weight: Tensor, groups: int) -> None:
    if weight.dim() < 2:
        raise ValueError(f"lowered_nonzero: weight must have at least 2 dims (N x ...), got {weight.dim()} dims")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(
            f"lowered_nonzero: groups ({groups}) must be >= 1 and divide the number of rows ({weight.shape[0]})"
        )


def lowered_nonzero_reference(weight: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Reference twin: rows bool[N] (any nonzero in W[n]); cols bool[groups, Cg*KH*KW] per conv group."""
    _check_lowered_args(weight, groups)
    n = weight.shape[0]
    nz = weight.reshape(groups, n // groups, -1) != 0
    return nz.any(dim=2).reshape(n), nz.any(dim=1)


def lowered_nonzero(weight: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Nonzero GEMM rows and columns of a lowered conv/linear weight (see the reference twin)."""
    _check_lowered_args(weight, groups)
    if has_compiled_ops() and (weight.device.type == "cpu" or (weight.is_cuda and has_cuda_kernels())):
        rows, cols = torch.ops.ssl_lightning.lowered_nonzero(weight, groups)
        return rows, cols
    return lowered_nonzero_reference(weight, groups)


if has_compiled_ops():

    @torch.library.register_fake("ssl_lightning::lowered_nonzero")
    def _lowered_nonzero_fake(weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        n = weight.shape[0]
        cols = weight.numel() // n if n else 0
        return (
            weight.new_empty((n,), dtype=torch.bool),
            weight.new_empty((groups, cols), dtype=torch.bool),
        )

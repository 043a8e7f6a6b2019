"""``CompactLinear``: a drop-in for an ``nn.Linear`` whose weight has all-zero input columns that channel removal
cannot take out upstream (e.g. input pixels an MLP learned to ignore, when its input is the model input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.compact_conv import fastest

__all__ = ["CompactLinear"]


class CompactLinear(nn.Module):
    """``y = x[..., in_idx] @ weight.T + bias``: gathers the kept input features, then a smaller GEMM."""

    in_idx: Tensor

    def __init__(self, linear: nn.Linear, keep: Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("in_idx", keep.to(torch.long).clone())
        w = linear.weight.detach()
        self.weight = nn.Parameter(w[:, self.in_idx].clone(), requires_grad=linear.weight.requires_grad)
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, example_input: Tensor | None = None, max_kept: float = 0.7) -> nn.Module:
        """The compact form when it pays off, else ``linear`` itself: with ``example_input`` whichever measures
        faster, without it the compact form when at most ``max_kept`` of the input features are kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"CompactLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        keep = (linear.weight.detach() != 0).any(0).nonzero().flatten()
        if keep.numel() == linear.in_features:
            return linear
        compact = cls(linear, keep)
        if example_input is None:
            return compact if keep.numel() <= max_kept * linear.in_features else linear
        return compact if fastest({"dense": linear, "compact": compact}, example_input) == "compact" else linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.index_select(-1, self.in_idx), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={self.in_idx.numel()}"

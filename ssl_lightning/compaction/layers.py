"""Compacted layers: drop-ins for dense layers whose weights have all-zero structures.

``CompactLinear`` gathers the kept input features of an ``nn.Linear`` whose weight has all-zero input columns
that channel removal cannot take out upstream (e.g. input pixels an MLP learned to ignore).

``CompactConv2d``: a drop-in for a dense ``nn.Conv2d`` whose lowered weight has all-zero rows/columns.

It runs one of three implementations, chosen per layer:
    fused  ``ssl_lightning.ops.compact_conv2d``: only kept rows x kept columns, lowering inside the op
    rows   a smaller ``F.conv2d`` with the kept filters only (rounded up to ``align`` filters per group,
           since oneDNN is slower on odd channel counts); used when no column is removed
    dense  the original convolution (nothing to gain, or a padding mode the fused op does not implement)
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal, TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning._ext import has_compiled_ops, has_cuda_kernels
from ssl_lightning.ops import compact_conv2d, lowered_nonzero, pack_compact_weight
from ssl_lightning.timing import fastest

__all__ = ["CompactConv2d", "CompactLinear"]

Impl: TypeAlias = Literal["fused", "rows", "dense"]
# Without a measurement, compact a layer only when at most this fraction of its MACs (kept rows x kept
# columns) remains: on AlexNet / CIFAR / LeNet shapes (2 CPU threads, AVX-512) the fused op runs at 75-100 %
# of oneDNN's dense throughput, so it needs a clear saving to win.
COMPACT_MAX_KEPT_WORK = 0.8


def _kept_work(rows: Tensor, cols: Tensor | None, groups: int) -> float:
    """Fraction of the conv's MACs left by the kept rows (G*OG bools) x kept columns (G x CKK bools; None: all)."""
    per_group = rows.view(groups, -1).float().mean(1)
    if cols is not None and cols.numel():
        per_group = per_group * cols.float().mean(1)
    return float(per_group.mean())


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class CompactConv2d(nn.Module):
    """Build with :meth:`from_conv`. ``forward(x)`` equals the source conv's forward (full-width output:
    removed filters output their bias), or only the kept channels with ``compact_output=True``."""

    row_idx: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    col_ptr: Tensor
    rows_sel: Tensor
    rows_real: Tensor

    def __init__(
        self,
        conv: nn.Conv2d,
        rows: Tensor,
        cols: Tensor,
        impl: Impl,
        compact_output: bool = False,
        align: int = 8,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = _pair(conv.kernel_size)
        self.stride, self.dilation = _pair(conv.stride), _pair(conv.dilation)
        self.padding = _pair(conv.padding) if not isinstance(conv.padding, str) else (0, 0)
        self.impl, self.compact_output, self.align = impl, compact_output, align
        g, og = conv.groups, conv.out_channels // conv.groups
        w = conv.weight.detach()
        rows_g = rows.view(g, og)
        row_idx = rows.nonzero().flatten()
        col_lists = [c.nonzero().flatten() for c in cols]
        self.register_buffer("row_idx", row_idx)
        self.register_buffer("row_ptr", torch.tensor([0, *rows_g.sum(1).cumsum(0).tolist()]))
        self.register_buffer("col_idx", torch.cat(col_lists) if col_lists else torch.zeros(0, dtype=torch.long))
        self.register_buffer("col_ptr", torch.tensor([0, *cols.sum(1).cumsum(0).tolist()]))
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None
        if impl == "fused":
            packed = pack_compact_weight(w, self.row_idx, self.row_ptr, self.col_idx, self.col_ptr)
            self.weight = nn.Parameter(packed.clone())
        elif impl == "rows":
            # Same filter count in every group (a grouped conv needs it), rounded up to `align`; the extra
            # filters are removed ones (zero weights) and are dropped from the output again.
            per_group = int(rows_g.sum(1).max())
            per_group = min(og, -(-max(per_group, 1) // align) * align)
            sel, real = [], []
            for gi in range(g):
                kept = rows_g[gi].nonzero().flatten()
                extra = (~rows_g[gi]).nonzero().flatten()[: per_group - len(kept)]
                chosen = torch.cat([kept, extra]).sort().values
                sel.append(chosen + gi * og)
                real.append(rows_g[gi][chosen])
            self.register_buffer("rows_sel", torch.cat(sel))
            self.register_buffer("rows_real", torch.cat(real))
            self.weight = nn.Parameter(w[self.rows_sel].clone())
        if impl == "dense":  # the source conv itself (any padding mode), weights copied
            self.conv = copy.deepcopy(conv)
            self.bias = None
        if impl != "rows":
            self.register_buffer("rows_sel", torch.zeros(0, dtype=torch.long))
            self.register_buffer("rows_real", torch.zeros(0, dtype=torch.bool))

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        impl: Literal["auto", "fused", "rows", "dense"] = "auto",
        compact_output: bool = False,
        example_input: Tensor | None = None,
        align: int = 8,
    ) -> CompactConv2d:
        """Detect all-zero rows (filters) and columns (per conv group) of ``conv`` and pick an implementation.

        impl="auto": with ``example_input``, time every applicable implementation on it and keep the
        fastest; without, keep the dense conv when more than ``COMPACT_MAX_KEPT_WORK`` of the MACs remain,
        else the row-only conv when no column was removed, else the fused op.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"CompactConv2d.from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if impl not in ("auto", "fused", "rows", "dense"):
            raise ValueError(f"impl must be one of 'auto', 'fused', 'rows', 'dense', got {impl!r}")
        unsupported = conv.padding_mode != "zeros" or isinstance(conv.padding, str)
        if unsupported and impl in ("fused", "rows"):
            raise ValueError(
                f"impl={impl!r} supports zero padding given as numbers; this conv has padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}: use impl='auto' or 'dense' (the dense conv is kept)"
            )
        rows, cols = lowered_nonzero(conv.weight.detach(), conv.groups)
        if compact_output and unsupported:
            raise ValueError("compact_output needs a conv with numeric zero padding")
        if impl == "auto":
            if unsupported:
                warnings.warn(
                    f"CompactConv2d: padding={conv.padding!r}/padding_mode={conv.padding_mode!r} is not implemented by "
                    "the fused op; keeping the dense convolution",
                    stacklevel=2,
                )
                impl = "dense"
            elif example_input is not None:
                impl = cls._fastest(conv, rows, cols, compact_output, example_input, align)
            else:
                kept_work = _kept_work(rows, cols, conv.groups)
                impl = "dense" if kept_work > COMPACT_MAX_KEPT_WORK else "rows" if bool(cols.all()) else "fused"
        return cls(conv, rows, cols, impl, compact_output, align)

    @classmethod
    def _fastest(cls, conv: nn.Conv2d, rows: Tensor, cols: Tensor, compact_output: bool, x: Tensor, align: int) -> Impl:
        # The row-only conv with full-width output runs the same oneDNN/cuDNN conv on fewer filters and then
        # copies its channels into the full output, so it cannot gain much more than the removed fraction:
        # it is timed only when at most COMPACT_MAX_KEPT_WORK of the filters remain (above that its best case
        # is inside timing noise; AlexNet conv1 at batch 16, 90.6 % kept, once chose it and ran at 0.84x).
        # The fused op is always timed: it can beat the dense conv by more than the removed work where
        # oneDNN is weak (LeNet conv1, one input channel). With compact output the dense conv pays a gather
        # of the kept channels as well, so both are timed.
        candidates: list[Impl] = ["dense"]
        limit = 1.0 if compact_output else COMPACT_MAX_KEPT_WORK
        if not bool(rows.all()) and _kept_work(rows, None, conv.groups) <= limit:
            candidates.append("rows")
        if not (bool(rows.all()) and bool(cols.all())):  # the fused op skips removed rows as well as columns
            candidates.append("fused")
        if len(candidates) == 1:
            return "dense"
        return fastest({c: cls(conv, rows, cols, c, compact_output, align) for c in candidates}, x)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "fused":
            if has_compiled_ops() and (x.device.type == "cpu" or (x.is_cuda and has_cuda_kernels())):  # hot path
                # parameters and buffers straight from their dicts: nn.Module.__getattr__ on seven of them
                # costs as much as the dispatcher on a small layer
                p, b = self._parameters, self._buffers
                args = (
                    x, p["weight"], b["row_idx"], b["row_ptr"], b["col_idx"], b["col_ptr"], p.get("bias"),
                    self.kernel_size, self.stride, self.padding, self.dilation, self.groups, self.out_channels,
                    self.compact_output,
                )  # fmt: skip
                op = torch.ops.ssl_lightning.compact_conv2d.default
                if torch.compiler.is_compiling() or torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                    return op(*args)  # inference mode has no autograd keys; dynamo/export trace the plain op
                with torch._C._AutoDispatchBelowAutograd():  # no_grad: skip the Python autograd kernel
                    return op(*args)
            return compact_conv2d(
                x, self.weight, self.row_idx, self.row_ptr, self.col_idx, self.col_ptr, self.bias, self.kernel_size,
                self.stride, self.padding, self.dilation, self.groups, self.out_channels, self.compact_output,
            )  # fmt: skip
        if self.impl == "rows":
            bias = self.bias[self.rows_sel] if self.bias is not None else None
            y = F.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation, self.groups)
            if self.compact_output:
                return y if bool(self.rows_real.all()) else y[:, self.rows_real]
            shape = (x.shape[0], self.out_channels, y.shape[2], y.shape[3])
            # A fresh bias-filled output, then the kept channels in place: no third full-size tensor (at batch 16
            # these are MBs, and each fresh one costs page faults). Never expand(...).contiguous(): with one
            # output position per channel that is the bias parameter itself, and index_copy_ would overwrite it.
            if self.bias is None:
                base = y.new_zeros(shape)
            else:
                base = y.new_empty(shape)
                base.copy_(self.bias.view(1, -1, 1, 1))
            return base.index_copy_(1, self.rows_sel, y)
        conv = cast(nn.Conv2d, self._modules["conv"])
        if conv.padding_mode == "zeros":  # skip one module call and the __getattr__ lookups on the hot path
            cp = conv._parameters
            weight, bias = cast(Tensor, cp["weight"]), cp.get("bias")
            y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        else:
            y = conv(x)
        return y[:, self.row_idx] if self.compact_output else y

    def extra_repr(self) -> str:
        kept_rows, kept_cols = self.row_idx.numel(), self.col_idx.numel()
        total_cols = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"impl={self.impl}, rows={kept_rows}/{self.out_channels}, cols={kept_cols}/{total_cols}"
        )


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

"""Typed wrappers for the compiled ops, their pure-PyTorch reference twins, and fake kernels.

Each op ``x`` has ``x`` (dispatches to the compiled kernel for the tensor's device when present,
else the reference) and ``x_reference`` (pure torch, the test oracle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

from ssl_lightning._ext import has_compiled_ops, has_cuda_kernels

__all__ = [
    "compact_conv2d",
    "compact_conv2d_backward_reference",
    "compact_conv2d_reference",
    "cpu_kernel",
    "expand_compact_weight",
    "lowered_nonzero",
    "lowered_nonzero_reference",
    "pack_compact_weight",
]


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


# ----------------------------------------------------------------------------------------------------------
# compact_conv2d: convolution with only the kept GEMM rows (filters) and columns ((c, kh, kw) fibers) of
# each conv group. Index layout (all int64, CPU or the input's device):
#   row_idx[row_ptr[g]:row_ptr[g+1]]  kept output channels of group g (global ids, inside group g's filters)
#   col_idx[col_ptr[g]:col_ptr[g+1]]  kept columns of group g, c_local*KH*KW + kh*KW + kw
#   weight: 1-D, group g's rows x cols block row-major, groups in order.
# ----------------------------------------------------------------------------------------------------------


def _groups_blocks(row_ptr: Tensor, col_ptr: Tensor) -> list[tuple[int, int, int, int, int]]:
    """Per group: (row start, rows, col start, cols, weight offset)."""
    rp, cp = row_ptr.tolist(), col_ptr.tolist()
    out, off = [], 0
    for g in range(len(rp) - 1):
        r, k = rp[g + 1] - rp[g], cp[g + 1] - cp[g]
        out.append((rp[g], r, cp[g], k, off))
        off += r * k
    return out


def expand_compact_weight(
    weight: Tensor,
    row_idx: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    col_ptr: Tensor,
    out_channels: int,
    in_per_group: int,
    kernel_size: Sequence[int],
    *,
    blocks: Sequence[tuple[int, int, int, int, int]] | None = None,
) -> Tensor:
    """The dense ``out_channels x in_per_group x KH x KW`` weight (zeros where removed); differentiable.

    ``blocks``: the pointers' per-group blocks (``_groups_blocks``) when the caller holds them, so the call reads
    no index value on the host (traceable by ``torch.compile``)."""
    kh, kw = kernel_size
    dense = weight.new_zeros(out_channels, in_per_group * kh * kw)
    for r0, r, c0, k, off in blocks if blocks is not None else _groups_blocks(row_ptr, col_ptr):
        if r and k:
            rows = row_idx[r0 : r0 + r].to(weight.device)
            cols = col_idx[c0 : c0 + k].to(weight.device)
            dense = dense.index_put((rows[:, None], cols[None, :]), weight[off : off + r * k].view(r, k))
    return dense.view(out_channels, in_per_group, kh, kw)


def pack_compact_weight(dense: Tensor, row_idx: Tensor, row_ptr: Tensor, col_idx: Tensor, col_ptr: Tensor) -> Tensor:
    """Gather the kept rows x columns blocks of a dense conv weight into the packed 1-D layout."""
    flat = dense.reshape(dense.shape[0], -1)
    parts = [flat.new_zeros(0)]
    for r0, r, c0, k, _ in _groups_blocks(row_ptr, col_ptr):
        if r and k:
            rows = row_idx[r0 : r0 + r].to(dense.device)
            cols = col_idx[c0 : c0 + k].to(dense.device)
            parts.append(flat[rows[:, None], cols[None, :]].reshape(-1))
    return torch.cat(parts)


def _out_hw(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Output size; raises (as the compiled op does) when the dilated kernel does not fit the padded input."""
    span_h = h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1
    span_w = w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1
    if span_h < 0 or span_w < 0:
        raise RuntimeError(
            f"compact_conv2d: input of {h} x {w} (padded by {list(padding)}) is smaller than the dilated kernel "
            f"{list(kernel_size)} (dilation {list(dilation)})"
        )
    return span_h // stride[0] + 1, span_w // stride[1] + 1


def _check_index_lists(input: Tensor, **lists: Tensor) -> None:
    """What the compiled op checks of the index lists without reading them (also holds for fake tensors)."""
    for name, t in lists.items():
        if t.dim() != 1 or t.dtype != torch.long:
            raise RuntimeError(f"compact_conv2d: {name} must be a 1-D int64 tensor, got {tuple(t.shape)} {t.dtype}")
        if t.device.type != "cpu" and t.device != input.device:
            raise RuntimeError(
                f"compact_conv2d: {name} is on {t.device}; index lists must be on the CPU or on the input's device "
                f"({input.device})"
            )


def compact_conv2d_reference(
    input: Tensor,
    weight: Tensor,
    row_idx: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    col_ptr: Tensor,
    bias: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    out_channels: int,
    compact_output: bool,
) -> Tensor:
    """Reference twin: rebuild the dense weight and run ``F.conv2d``; compact output keeps ``row_idx`` rows."""
    dense = expand_compact_weight(
        weight, row_idx, row_ptr, col_idx, col_ptr, out_channels, input.shape[1] // groups, kernel_size
    )
    out = F.conv2d(input, dense, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return out.index_select(1, row_idx.to(out.device)) if compact_output else out


def compact_conv2d(
    input: Tensor,
    weight: Tensor,
    row_idx: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    col_ptr: Tensor,
    bias: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    out_channels: int | None = None,
    compact_output: bool = False,
) -> Tensor:
    """Fused compacted convolution (see the layout above). ``out_channels`` defaults to max(row_idx)+1.

    Output: ``N x out_channels x Ho x Wo`` (removed filters output their bias: a drop-in for the dense
    conv) or, with ``compact_output``, ``N x len(row_idx) x Ho x Wo`` for chaining compacted layers.
    Differentiable in ``input``, ``weight`` and ``bias``.
    """
    if out_channels is None:
        out_channels = int(row_idx.max()) + 1 if row_idx.numel() else 0
    args = (
        input, weight, row_idx, row_ptr, col_idx, col_ptr, bias, list(kernel_size), list(stride), list(padding),
        list(dilation), groups, out_channels, compact_output,
    )  # fmt: skip
    if has_compiled_ops() and (input.device.type == "cpu" or (input.is_cuda and has_cuda_kernels())):
        return torch.ops.ssl_lightning.compact_conv2d(*args)
    return compact_conv2d_reference(*args)


def cpu_kernel(dtype: torch.dtype = torch.float32) -> str:
    """The CPU kernel :func:`compact_conv2d` takes for ``dtype`` tensors in this process, now.

    ``"avx512"`` (gathered panels, AVX-512), ``"avx2"`` (gathered panels, AVX2 / FMA; bf16 / fp16 through fp32),
    ``"onednn"`` / ``"blas"`` (kept columns lowered tile by tile into oneDNN's or ATen's GEMM), or ``"reference"``
    without the compiled extension. Follows the CPU's features and the switches the op reads at every call:
    ``SSL_LIGHTNING_GEMM`` (``auto|gather|avx2|onednn|blas``) and ``SSL_LIGHTNING_MAX_ISA`` (``avx512|avx2|none``,
    which makes the op behave as on a CPU without the higher ISAs). A forced kernel this CPU cannot run raises
    ``RuntimeError`` naming the missing CPU feature, as the op itself does.
    """
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
    if dtype not in names:
        raise ValueError(f"cpu_kernel: dtype must be one of {', '.join(map(str, names))}, got {dtype}")
    if not has_compiled_ops():
        return "reference"
    from ssl_lightning import _C  # type: ignore[attr-defined]

    return str(_C.cpu_kernel(names[dtype]))


def compact_conv2d_backward_reference(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    row_idx: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    col_ptr: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    out_channels: int,
    compact_output: bool,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    """Reference twin of the backward op: dense conv gradients with the masked dense weight, packed back."""
    ks, st, pd, dl = list(kernel_size), list(stride), list(padding), list(dilation)
    dense = expand_compact_weight(
        weight, row_idx, row_ptr, col_idx, col_ptr, out_channels, input.shape[1] // groups, ks
    )
    if compact_output:  # removed rows receive no gradient
        full = grad_output.new_zeros(grad_output.shape[0], out_channels, *grad_output.shape[2:])
        grad_output = full.index_copy(1, row_idx.to(full.device), grad_output)
    empty = input.new_empty(0)
    grad_in = conv2d_input(input.shape, dense, grad_output, st, pd, dl, groups) if output_mask[0] else empty
    grad_w = empty
    if output_mask[1]:
        dense_grad = conv2d_weight(input, dense.shape, grad_output, st, pd, dl, groups)
        grad_w = pack_compact_weight(dense_grad, row_idx, row_ptr, col_idx, col_ptr)
    return grad_in, grad_w


if has_compiled_ops():

    @torch.library.register_fake("ssl_lightning::compact_conv2d")
    def _compact_conv2d_fake(  # type: ignore[no-untyped-def]
        input, weight, row_idx, row_ptr, col_idx, col_ptr, bias, kernel_size, stride, padding, dilation, groups,
        out_channels, compact_output,
    ):  # fmt: skip
        _check_index_lists(input, row_idx=row_idx, row_ptr=row_ptr, col_idx=col_idx, col_ptr=col_ptr)
        ho, wo = _out_hw(input.shape[2], input.shape[3], kernel_size, stride, padding, dilation)
        rows = row_idx.shape[0] if compact_output else out_channels
        return input.new_empty((input.shape[0], rows, ho, wo))

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.ssl_lightning.compact_conv2d)
    def _compact_conv2d_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        # The packed weight holds exactly the kept rows x kept columns: one MAC each per output position.
        n, _, ho, wo = out_shape
        return 2 * n * ho * wo * math.prod(weight_shape)

    def _compact_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        (inp, weight, row_idx, row_ptr, col_idx, col_ptr, bias, ks, st, pd, dl, groups, oc, compact) = inputs
        ctx.save_for_backward(inp, weight, row_idx, row_ptr, col_idx, col_ptr)
        ctx.conf = (bias is not None, list(ks), list(st), list(pd), list(dl), groups, oc, compact)

    def _compact_backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        inp, weight, row_idx, row_ptr, col_idx, col_ptr = ctx.saved_tensors
        has_bias, ks, st, pd, dl, groups, oc, compact = ctx.conf
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
        args = (
            grad_out.contiguous(),
            inp,
            weight,
            row_idx,
            row_ptr,
            col_idx,
            col_ptr,
            ks,
            st,
            pd,
            dl,
            groups,
            oc,
            compact,
            mask,
        )
        if torch.is_grad_enabled():
            # create_graph=True (double backward, gradient penalties): the reference twin is built from
            # differentiable torch ops, so second-order gradients flow; the compiled backward has none.
            grad_in, grad_w = compact_conv2d_backward_reference(*args)
        elif inp.device.type == "cpu" or (inp.is_cuda and has_cuda_kernels()):  # kept rows/columns only
            grad_in, grad_w = torch.ops.ssl_lightning.compact_conv2d_backward(*args)
        else:
            grad_in, grad_w = compact_conv2d_backward_reference(*args)
        grad_b = None
        if has_bias and ctx.needs_input_grad[6]:
            per_row = grad_out.sum((0, 2, 3))
            grad_b = per_row.new_zeros(oc).index_add_(0, row_idx.to(per_row.device), per_row) if compact else per_row
        return (
            grad_in if mask[0] else None, grad_w if mask[1] else None, None, None, None, None, grad_b,
            None, None, None, None, None, None, None,
        )  # fmt: skip

    @torch.library.register_fake("ssl_lightning::compact_conv2d_backward")
    def _compact_backward_fake(  # type: ignore[no-untyped-def]
        grad_output, input, weight, row_idx, row_ptr, col_idx, col_ptr, kernel_size, stride, padding, dilation,
        groups, out_channels, compact_output, output_mask,
    ):  # fmt: skip
        return (
            torch.empty_like(input) if output_mask[0] else input.new_empty(0),
            torch.empty_like(weight) if output_mask[1] else weight.new_empty(0),
        )

    torch.library.register_autograd("ssl_lightning::compact_conv2d", _compact_backward, setup_context=_compact_setup)

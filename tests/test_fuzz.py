"""Fuzzing of ``compact_conv2d`` and ``CompactConv2d`` against ``F.conv2d`` on the masked dense weight.

Every drawn case is either valid (the op and every module implementation must match the float64 oracle) or
invalid (the op must raise a clear ``compact_conv2d: ...`` error: never crash, never return garbage).
CI runs ``FAST`` examples per property; the ``slow`` marker runs ``SLOW`` (``python -m pytest -q -m slow
tests/test_fuzz.py``, about 4 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ssl_lightning import CompactConv2d, ops
from ssl_lightning._ext import has_compiled_ops

from .test_compact_conv import _gemm_env, _runs_here

FAST, SLOW = 100, 2000
BACKWARD_FAST, BACKWARD_SLOW = 15, 300
compiled = pytest.mark.skipif(not has_compiled_ops(), reason="ssl_lightning._C not built")
# |got - exact| / max(1, max|exact|) per dtype: fp32 / fp64 are exact up to summation order; the 16-bit types
# round their inputs' products' sum once (AVX-512 kernel) or a few times (bias, then the BLAS tile).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
PATTERNS = ["random", "all_zero", "single_column", "rows_without_columns", "all_kept", "single_row"]


@dataclass(frozen=True)
class Case:
    n: int
    groups: int
    cg: int
    og: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    size: tuple[int, int]
    dtype: torch.dtype
    layout: str  # contiguous | channels_last | sliced (a non-contiguous view)
    pattern: str
    bias: bool
    compact_output: bool
    gemm: str
    seed: int

    @property
    def c(self) -> int:
        return self.cg * self.groups

    @property
    def o(self) -> int:
        return self.og * self.groups


@st.composite
def cases(draw: Any, dtypes: tuple[torch.dtype, ...] = tuple(TOL)) -> Case:
    depthwise = draw(st.booleans())
    if depthwise:
        groups, cg, og = draw(st.integers(1, 6)), 1, draw(st.integers(1, 3))
    else:
        groups, cg, og = draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 5, 13]))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    # the smallest input the dilated kernel fits, plus 0..8 (a few positions up to more than one panel)
    h_min = max(1, dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])
    w_min = max(1, dilation[1] * (kernel[1] - 1) + 1 - 2 * padding[1])
    size = (h_min + draw(st.integers(0, 8)), w_min + draw(st.integers(0, 40)))
    dtype = draw(st.sampled_from(dtypes))
    return Case(
        n=draw(st.integers(0, 5)),
        groups=groups,
        cg=cg,
        og=og,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        size=size,
        dtype=dtype,
        layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
        pattern=draw(st.sampled_from(PATTERNS)),
        bias=draw(st.booleans()),
        compact_output=draw(st.booleans()),
        gemm=draw(st.sampled_from([g for g in GEMMS if g != "avx2" or dtype != torch.float64])),
        seed=draw(st.integers(0, 2**16)),
    )


def kept(case: Case, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """rows bool[o], cols bool[groups, cg*kh*kw] for the case's pattern."""
    k = case.cg * case.kernel[0] * case.kernel[1]
    if case.pattern == "all_zero":
        return torch.zeros(case.o, dtype=torch.bool), torch.zeros(case.groups, k, dtype=torch.bool)
    rows = torch.rand(case.o, generator=g) < 0.6
    cols = torch.rand(case.groups, k, generator=g) < 0.5
    if case.pattern == "all_kept":
        rows, cols = torch.ones_like(rows), torch.ones_like(cols)
    elif case.pattern == "single_column":
        cols = torch.zeros_like(cols)
        cols[torch.arange(case.groups), torch.randint(0, k, (case.groups,), generator=g)] = True
    elif case.pattern == "rows_without_columns":  # kept filters in a group whose columns are all removed
        cols[0] = False
        rows[: case.og] = True
    elif case.pattern == "single_row":
        rows = torch.zeros_like(rows)
        rows[int(torch.randint(0, case.o, (1,), generator=g))] = True
    return rows, cols


def build(case: Case) -> dict[str, Any]:
    """Input, dense masked weight, bias and the op's packed arguments for one case."""
    g = torch.Generator().manual_seed(case.seed)
    h, w = case.size
    x = torch.randn(case.n, case.c, h + 3, w, generator=g)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = (x[:, :, 2 : 2 + h] if case.layout == "sliced" else x[:, :, :h]).to(case.dtype)
    if case.layout == "contiguous":
        x = x.contiguous()
    rows, cols = kept(case, g)
    dense = torch.randn(case.o, case.cg, *case.kernel, generator=g)
    keep = rows[:, None] & cols.repeat_interleave(case.og, 0)  # [o, cg*kh*kw]
    dense = (dense.view(case.o, -1) * keep).view_as(dense).to(case.dtype)
    bias = torch.randn(case.o, generator=g).to(case.dtype) if case.bias else None
    rows_g = rows.view(case.groups, case.og)
    row_idx = rows.nonzero().flatten()
    row_ptr = torch.tensor([0, *rows_g.sum(1).cumsum(0).tolist()])
    col_idx = torch.cat([c.nonzero().flatten() for c in cols])
    col_ptr = torch.tensor([0, *cols.sum(1).cumsum(0).tolist()])
    packed = ops.pack_compact_weight(dense, row_idx, row_ptr, col_idx, col_ptr)
    args = [x, packed, row_idx, row_ptr, col_idx, col_ptr, bias, list(case.kernel), list(case.stride),
            list(case.padding), list(case.dilation), case.groups, case.o, case.compact_output]  # fmt: skip
    return {"x": x, "dense": dense, "bias": bias, "rows": row_idx, "args": args}


def oracle(case: Case, built: dict[str, Any], rows: Tensor | None = None) -> Tensor:
    """F.conv2d in float64; with compact output only ``rows`` (default: the op's kept rows)."""
    x, dense, bias = built["x"].double(), built["dense"].double(), built["bias"]
    out = F.conv2d(x, dense, None if bias is None else bias.double(), case.stride, case.padding, case.dilation,
                   case.groups)  # fmt: skip
    return out[:, built["rows"] if rows is None else rows] if case.compact_output else out


def _error(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)) if want.numel() else 0.0


def _native_16bit_conv(dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """'rows' and 'dense' run F.conv2d. On CPU, oneDNN's fp16 / bf16 convolution (torch 2.13) returns wrong values
    or segfaults for a few shapes this fuzzer found, e.g. bf16, batch 5, kernel 1x3, stride (1, 2), dilation
    (1, 2): wrong values; fp16, input 8x1, kernel 3x1, padding 2, dilation 2, stride (1, 3), 2 groups: SIGSEGV
    (an AVX-512 Xeon). ATen's own convolution is right there, so the modules' logic is checked with it."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.backends.mkldnn.flags(enabled=False)
    return contextlib.nullcontext()


def assert_matches(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == dtype, what
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = _error(got, want)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


# the AVX-512 kernel (auto, on such a CPU), the AVX2 one, and both lowered-tile paths
GEMMS = ["auto", "onednn", "blas", *(["avx2"] if _runs_here("avx2") else [])]


# ------------------------------------------------------------------------------------------- valid cases
def check_valid(case: Case) -> None:
    built = build(case)
    want = oracle(case, built)
    with _gemm_env(case.gemm), torch.no_grad():
        got = ops.compact_conv2d(*built["args"])
        assert_matches(got, want, case.dtype, "compact_conv2d")
        conv = nn.Conv2d(case.c, case.o, case.kernel, case.stride, case.padding, case.dilation, case.groups,
                         bias=case.bias).to(case.dtype)  # fmt: skip
        conv.weight.copy_(built["dense"])
        if built["bias"] is not None:
            assert conv.bias is not None
            conv.bias.copy_(built["bias"])
        for impl in ("fused", "rows", "dense"):
            mod = CompactConv2d.from_conv(conv, impl=impl, compact_output=case.compact_output)
            # the module keeps the filters with a nonzero weight (a kept row without columns is all zero)
            want_mod = oracle(case, built, mod.row_idx)
            with _native_16bit_conv(case.dtype):
                got = mod(built["x"])
            assert_matches(got, want_mod, case.dtype, f"CompactConv2d(impl={impl!r})")
        assert torch.equal(conv.weight, built["dense"]), "from_conv changed the source conv"


_settings = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
_ci = {**_settings, "derandomize": True}  # CI: the same examples every run; the slow runs explore afresh


@settings(max_examples=FAST, **_ci)
@given(cases())
def test_op_and_module_match_dense_conv(case: Case) -> None:
    check_valid(case)


@pytest.mark.slow
@settings(max_examples=SLOW, **_settings)
@given(cases())
def test_op_and_module_match_dense_conv_slow(case: Case) -> None:
    check_valid(case)


# ----------------------------------------------------------------------------------------- invalid cases
def _corrupt(kind: str, args: list[Any], case: Case) -> list[Any]:
    a = list(args)
    x, w, ri, rp, ci, cp = a[:6]
    k_total = case.cg * case.kernel[0] * case.kernel[1]
    if kind == "row_out_of_range":
        a[2] = torch.cat([ri[:-1], torch.tensor([case.o + 3])]) if len(ri) else torch.tensor([case.o])
        if not len(ri):
            a[3] = rp.clone()
            a[3][1:] += 1
    elif kind == "col_out_of_range":
        a[4] = torch.cat([ci[:-1], torch.tensor([k_total])]) if len(ci) else torch.tensor([k_total])
        if not len(ci):
            a[5] = cp.clone()
            a[5][1:] += 1
    elif kind == "negative_col":
        a[4] = torch.cat([ci[:-1], torch.tensor([-1])]) if len(ci) else torch.tensor([-1])
        if not len(ci):
            a[5] = cp.clone()
            a[5][1:] += 1
    elif kind == "ptr_decreasing":
        a[3] = torch.cat([rp[:1], rp[1:] * 0 - 1])
    elif kind == "ptr_length":
        a[5] = torch.cat([cp, cp[-1:]])
    elif kind == "weight_numel":
        a[1] = torch.cat([w, w.new_zeros(1)])
    elif kind == "weight_dtype":
        a[1] = w.to(torch.float64 if w.dtype != torch.float64 else torch.float32)
    elif kind == "weight_2d":
        a[1] = w.view(1, -1)
    elif kind == "index_dtype":
        a[2] = ri.int()
    elif kind == "index_2d":
        a[4] = ci.view(1, -1)
    elif kind == "index_meta":
        a[5] = cp.to("meta")
    elif kind == "bias_size":
        a[6] = torch.zeros(case.o + 1, dtype=case.dtype)
    elif kind == "bias_dtype":
        a[6] = torch.zeros(case.o, dtype=torch.float64 if case.dtype != torch.float64 else torch.float32)
    elif kind == "zero_stride":
        a[8] = [0, 1]
    elif kind == "negative_padding":
        a[9] = [-1, 0]
    elif kind == "zero_dilation":
        a[10] = [1, 0]
    elif kind == "huge_stride":
        a[8] = [2**62, 1]
    elif kind == "kernel_too_big":
        a[0] = x[:, :, :1, :1]
        a[9] = [0, 0]
        a[7] = [case.kernel[0] + 1, case.kernel[1]]  # never fits a 1x1 input
    elif kind == "groups_do_not_divide":
        a[11] = case.c + 1
    elif kind == "input_3d":
        a[0] = x.flatten(0, 1)
    elif kind == "input_int":
        a[0] = x.to(torch.int32)
    elif kind == "duplicate_col":  # group 0 lists a column twice (weights added so the sizes still agree)
        extra = [int(ci[0])] if int(cp[1]) > 0 else [0, 0]
        a[4] = torch.cat([torch.tensor(extra), ci])
        a[5] = cp.clone()
        a[5][1:] += len(extra)
        a[1] = torch.cat([w, w.new_zeros(len(extra) * int(rp[1]))])
    return a


INVALID = [
    "row_out_of_range", "col_out_of_range", "negative_col", "ptr_decreasing", "ptr_length", "weight_numel",
    "weight_dtype", "weight_2d", "index_dtype", "index_2d", "index_meta", "bias_size", "bias_dtype", "zero_stride",
    "negative_padding", "zero_dilation", "huge_stride", "kernel_too_big", "groups_do_not_divide", "input_3d",
    "input_int", "duplicate_col",
]  # fmt: skip


def check_invalid(case: Case, kind: str) -> None:
    built = build(replace(case, bias=True))
    args = _corrupt(kind, built["args"], case)
    with pytest.raises((RuntimeError, ValueError)) as info:
        torch.ops.ssl_lightning.compact_conv2d(*args)
    assert "compact_conv2d" in str(info.value) or "Expected" in str(info.value), f"{kind}: {info.value}"


@compiled
@settings(max_examples=FAST, **_ci)
@given(cases(dtypes=(torch.float32, torch.float64)), st.sampled_from(INVALID))
def test_invalid_arguments_raise_a_clear_error(case: Case, kind: str) -> None:
    check_invalid(case, kind)


@compiled
@pytest.mark.slow
@settings(max_examples=SLOW, **_settings)
@given(cases(dtypes=(torch.float32, torch.float64)), st.sampled_from(INVALID))
def test_invalid_arguments_raise_a_clear_error_slow(case: Case, kind: str) -> None:
    check_invalid(case, kind)


# ---------------------------------------------------------------------------------------------- backward
def check_backward(case: Case) -> None:
    case = replace(case, dtype=torch.float64, n=min(case.n, 2), size=(min(case.size[0], 6), min(case.size[1], 6)))
    h_min = case.dilation[0] * (case.kernel[0] - 1) + 1 - 2 * case.padding[0]
    w_min = case.dilation[1] * (case.kernel[1] - 1) + 1 - 2 * case.padding[1]
    case = replace(case, size=(max(case.size[0], h_min, 1), max(case.size[1], w_min, 1)))
    built = build(case)
    x, w, *idx = built["args"][:6]
    b = built["args"][6]
    rest = built["args"][7:]
    inputs = [x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    if b is not None:
        inputs.append(b.detach().clone().requires_grad_())

    def f(*t: Tensor) -> Tensor:
        return torch.ops.ssl_lightning.compact_conv2d(t[0], t[1], *idx, t[2] if len(t) > 2 else None, *rest)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6)


@compiled
@settings(max_examples=BACKWARD_FAST, **_ci)
@given(cases())
def test_backward_gradcheck_and_double_backward(case: Case) -> None:
    check_backward(case)


@compiled
@pytest.mark.slow
@settings(max_examples=BACKWARD_SLOW, **_settings)
@given(cases())
def test_backward_gradcheck_and_double_backward_slow(case: Case) -> None:
    check_backward(case)

"""compact_conv2d: equals F.conv2d on the masked dense weight over a randomized sweep; gradients; errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_lightning import ops
from ssl_lightning._ext import has_compiled_ops

from .conftest import requires_cuda_kernels

compiled = pytest.mark.skipif(not has_compiled_ops(), reason="ssl_lightning._C not built")


def layout(
    out_channels: int, cg: int, kh: int, kw: int, groups: int, keep_rows: float, keep_cols: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random kept rows / columns per conv group (fractions rounded; 0 and 1 allowed)."""
    g = torch.Generator().manual_seed(seed)
    og, k = out_channels // groups, cg * kh * kw
    rows, cols, rp, cp = [], [], [0], [0]
    for gi in range(groups):
        r = torch.randperm(og, generator=g)[: round(og * keep_rows)].sort().values + gi * og
        c = torch.randperm(k, generator=g)[: round(k * keep_cols)].sort().values
        rows.append(r), cols.append(c)
        rp.append(rp[-1] + len(r)), cp.append(cp[-1] + len(c))
    return torch.cat(rows).long(), torch.tensor(rp), torch.cat(cols).long(), torch.tensor(cp)


def case(seed: int = 0, n: int = 2, groups: int = 2, dtype: torch.dtype = torch.float32, keep=(0.6, 0.5), bias=True):
    g = torch.Generator().manual_seed(seed)
    c, o, k = 4 * groups, 6 * groups, 3
    x = torch.randn(n, c, 9, 8, generator=g, dtype=dtype)
    w = torch.randn(o, c // groups, k, k, generator=g, dtype=dtype)
    b = torch.randn(o, generator=g, dtype=dtype) if bias else None
    ri, rp, ci, cp = layout(o, c // groups, k, k, groups, *keep, seed)
    wc = ops.pack_compact_weight(w, ri, rp, ci, cp)
    return x, wc, ri, rp, ci, cp, b, [k, k], [2, 1], [1, 2], [1, 1], groups, o


def opcheck_samples() -> list[tuple]:
    return [
        (*case(0), False),
        (*case(1, n=1, groups=1, bias=False), True),
        (*case(2, dtype=torch.float64, keep=(1.0, 0.0)), False),
        (*case(3, n=3, groups=3, keep=(0.5, 1.0)), True),
    ]


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """An environment variable (the CPU kernel reads its SSL_LIGHTNING_* ones at every call) set for one block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _gemm_env(choice: str) -> contextlib.AbstractContextManager[None]:
    return _env("SSL_LIGHTNING_GEMM", choice)


def _runs_here(gemm: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether this build and CPU run the forced kernel ``gemm`` (gather: AVX-512, avx2) for ``dtype``."""
    if not has_compiled_ops():
        return False
    try:
        with _gemm_env(gemm):
            ops.cpu_kernel(dtype)
    except RuntimeError:
        return False
    return True


# the gathered-panel kernels this machine runs (an AVX-512 machine also runs the AVX2 one)
PANEL_KERNELS = [k for k in ("gather", "avx2") if _runs_here(k)]


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    cg=st.integers(1, 4),
    og=st.sampled_from([1, 2, 4, 13, 27]),  # 13 and 27: several 12-filter micro-tiles and a partial one
    kernel=st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 5)]),
    stride=st.sampled_from([(1, 1), (2, 2), (3, 1)]),
    padding=st.sampled_from([(0, 0), (1, 1), (2, 0)]),
    dilation=st.sampled_from([(1, 1), (2, 1)]),
    keep_rows=st.sampled_from([0.0, 0.4, 1.0]),
    keep_cols=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    compact_output=st.booleans(),
    with_bias=st.booleans(),
    layout_kind=st.sampled_from(["contiguous", "channels_last", "sliced"]),
    size=st.sampled_from([(11, 10), (4, 37), (2, 70)]),  # rows of 10 / 37 / 70 positions in 32-lane panels
    gemm=st.sampled_from(["auto", "onednn", "blas", *PANEL_KERNELS]),  # the panel kernels and both lowered paths
    seed=st.integers(0, 1000),
)
def test_matches_dense_conv_on_masked_weight(
    n,
    groups,
    cg,
    og,
    kernel,
    stride,
    padding,
    dilation,
    keep_rows,
    keep_cols,
    compact_output,
    with_bias,
    layout_kind,
    size,
    gemm,
    seed,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    c, o = cg * groups, og * groups
    h, w = size
    if (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) < 0:
        h = dilation[0] * (kernel[0] - 1) + 1  # keep at least one output row
    x = torch.randn(n, c, h + 3, w, generator=gen)
    if layout_kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x[:, :, 2 : 2 + h] if layout_kind == "sliced" else x[:, :, :h]  # non-contiguous either way but "contiguous"
    if layout_kind == "contiguous":
        x = x.contiguous()
    dense = torch.randn(o, cg, *kernel, generator=gen)
    bias = torch.randn(o, generator=gen) if with_bias else None
    ri, rp, ci, cp = layout(o, cg, *kernel, groups, keep_rows, keep_cols, seed)
    wc = ops.pack_compact_weight(dense, ri, rp, ci, cp)
    masked = ops.expand_compact_weight(wc, ri, rp, ci, cp, o, cg, kernel)
    expected = F.conv2d(x, masked, bias, stride, padding, dilation, groups)
    if compact_output:
        expected = expected[:, ri]
    with _gemm_env(gemm):
        got = ops.compact_conv2d(
            x, wc, ri, rp, ci, cp, bias, kernel, stride, padding, dilation, groups, o, compact_output
        )
    assert got.shape == expected.shape
    if expected.numel():
        scale = expected.abs().max().clamp(min=1.0)
        assert (got - expected).abs().max() / scale <= 1e-5


def test_masked_weight_is_the_dense_weight_with_zeros() -> None:
    w = torch.randn(4, 2, 3, 3)
    ri, rp, ci, cp = torch.tensor([0, 2, 3]), torch.tensor([0, 3]), torch.tensor([1, 5, 17]), torch.tensor([0, 3])
    masked = ops.expand_compact_weight(ops.pack_compact_weight(w, ri, rp, ci, cp), ri, rp, ci, cp, 4, 2, (3, 3))
    keep = torch.zeros(4, 18, dtype=torch.bool)
    keep[torch.tensor([0, 2, 3])[:, None], torch.tensor([1, 5, 17])[None, :]] = True
    assert torch.equal(masked.view(4, 18), torch.where(keep, w.view(4, 18), torch.zeros(())))


@compiled
@pytest.mark.parametrize("gemm", ["auto", "avx2", "onednn"])
def test_opcheck(gemm: str) -> None:
    if gemm == "avx2" and not _runs_here(gemm):
        pytest.skip("this CPU has no AVX2 / FMA")
    with _gemm_env(gemm):
        for args in opcheck_samples():
            if gemm == "avx2" and args[0].dtype == torch.float64:
                continue  # a forced panel kernel refuses float64 (tested below)
            torch.library.opcheck(torch.ops.ssl_lightning.compact_conv2d.default, args)


@pytest.mark.parametrize("compact_output", [False, True])
def test_gradcheck_float64(compact_output: bool) -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(4, n=2, groups=2, dtype=torch.float64)
    x, wc, b = (t.clone().requires_grad_() for t in (x, wc, b))

    def f(x, wc, b):  # type: ignore[no-untyped-def]
        return ops.compact_conv2d(x, wc, ri, rp, ci, cp, b, *rest, compact_output)

    assert torch.autograd.gradcheck(f, (x, wc, b), eps=1e-6, atol=1e-6)


def test_backward_matches_reference_autograd() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(5, n=2, groups=2)
    x1, w1, b1 = (t.clone().requires_grad_() for t in (x, wc, b))
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, wc, b))
    ops.compact_conv2d(x1, w1, ri, rp, ci, cp, b1, *rest, True).square().sum().backward()
    ops.compact_conv2d_reference(x2, w2, ri, rp, ci, cp, b2, *rest, True).square().sum().backward()
    for a, r in ((x1, x2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)


@compiled
def test_under_torch_compile() -> None:
    args = case(6)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ssl_lightning.compact_conv2d(x, *args[1:], False).relu()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(args[0]), f(args[0]))


def test_fallback_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    args = case(7)
    fast = ops.compact_conv2d(*args, False)
    monkeypatch.setattr(ops, "has_compiled_ops", lambda: False)
    torch.testing.assert_close(ops.compact_conv2d(*args, False), fast, rtol=1e-5, atol=1e-5)


def _bad(**change):  # type: ignore[no-untyped-def]
    x, wc, ri, rp, ci, cp, b, ks, st_, pd, dl, groups, o = case(8)
    args = dict(
        input=x, weight=wc, row_idx=ri, row_ptr=rp, col_idx=ci, col_ptr=cp, bias=b, kernel_size=ks, stride=st_,
        padding=pd, dilation=dl, groups=groups, out_channels=o, compact_output=False,
    )  # fmt: skip
    args.update(change)
    return list(args.values())


@compiled
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"input": torch.ones(2, 8, 9, 8, dtype=torch.int64)}, r"input must be floating point, got Long"),
        ({"input": torch.ones(8, 9, 8)}, r"input must be N x C x H x W, got 3 dims"),
        ({"weight": torch.ones(5)}, r"weight has 5 elements but the index lists need"),
        ({"weight": torch.ones(5, dtype=torch.float64)}, r"weight dtype Double differs from input dtype Float"),
        (
            {
                "col_idx": torch.tensor(
                    [
                        0,
                        1,
                        99,
                        3,
                        4,
                        5,
                        6,
                        7,
                        8,
                        9,
                        10,
                        11,
                        12,
                        13,
                        14,
                        15,
                        16,
                        17,
                        18,
                        19,
                        20,
                        21,
                        22,
                        23,
                        24,
                        25,
                        26,
                        27,
                        28,
                        29,
                        30,
                        31,
                        32,
                        33,
                        34,
                        35,
                    ]
                )
            },
            r"column index 99 is outside C/groups\*KH\*KW = 36",
        ),
        (
            {"row_idx": torch.tensor([0, 1, 2, 11, 6, 7, 8, 9])},
            r"row index 11 of group 0 is outside its filters \[0, 6\)",
        ),
        ({"row_ptr": torch.tensor([0, 7])}, r"row_ptr and col_ptr need groups \+ 1 = 3 entries, got 2 and 3"),
        ({"groups": 3}, r"groups \(3\) must divide the input channels \(8\)"),
        ({"bias": torch.ones(5)}, r"bias must be 1-D with out_channels = 12 entries"),
        ({"row_idx": torch.tensor([0, 1, 2], dtype=torch.int32)}, r"row_idx must be a 1-D int64 tensor"),
        ({"input": torch.ones(2, 8, 1, 1), "padding": [0, 0]}, r"is smaller than the dilated kernel"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, match) -> None:
    args = _bad(**change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ssl_lightning.compact_conv2d(*args)


@requires_cuda_kernels()
@pytest.mark.parametrize("compact_output", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_matches_reference(compact_output: bool, dtype: torch.dtype) -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(9, n=3, groups=2, dtype=dtype)
    expected = ops.compact_conv2d_reference(x, wc, ri, rp, ci, cp, b, *rest, compact_output)
    dev = [t.cuda() for t in (x, wc, ri, rp, ci, cp, b)]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 exact (TF32 follows cuDNN's flag)
        got = torch.ops.ssl_lightning.compact_conv2d(*dev, *rest, compact_output)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    x1 = dev[0].clone().requires_grad_()
    torch.ops.ssl_lightning.compact_conv2d(x1, *dev[1:], *rest, compact_output).sum().backward()
    assert x1.grad is not None and x1.grad.shape == x1.shape


def backward_samples() -> list[tuple]:
    out = []
    for seed, compact_output, mask in [
        (10, False, [True, True]),
        (11, True, [True, False]),
        (12, False, [False, True]),
    ]:
        x, wc, ri, rp, ci, cp, _b, ks, st_, pd, dl, groups, o = case(seed, n=2, groups=2)
        rows = len(ri) if compact_output else o
        ho = (x.shape[2] + 2 * pd[0] - (ks[0] - 1) - 1) // st_[0] + 1
        wo = (x.shape[3] + 2 * pd[1] - (ks[1] - 1) - 1) // st_[1] + 1
        gy = torch.randn(x.shape[0], rows, ho, wo, generator=torch.Generator().manual_seed(seed))
        out.append((gy, x, wc, ri, rp, ci, cp, ks, st_, pd, dl, groups, o, compact_output, mask))
    return out


@compiled
@pytest.mark.parametrize("sample", range(3))
def test_backward_op_matches_reference(sample: int) -> None:
    args = backward_samples()[sample]
    got = torch.ops.ssl_lightning.compact_conv2d_backward(*args)
    want = ops.compact_conv2d_backward_reference(*args)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@compiled
def test_backward_op_opcheck_and_shape_errors() -> None:
    for args in backward_samples():
        torch.library.opcheck(torch.ops.ssl_lightning.compact_conv2d_backward.default, args)
    bad = list(backward_samples()[0])
    bad[0] = bad[0][:, :3]
    with pytest.raises(RuntimeError, match=r"compact_conv2d_backward: grad_output must be 2 x 12 x 5 x 10"):
        torch.ops.ssl_lightning.compact_conv2d_backward(*bad)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_half_precision_inputs_match_fp32_within_rounding(dtype: torch.dtype, rel: float) -> None:
    args = case(13, dtype=dtype)
    got = ops.compact_conv2d(*args, False)
    as_fp32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    want = ops.compact_conv2d_reference(*as_fp32, False)
    assert got.dtype == dtype
    assert float((got.float() - want).abs().max()) <= rel * float(want.abs().max())


@compiled
def test_unknown_gemm_choice_is_a_clear_error() -> None:
    x = torch.randn(1, 2, 5, 5)
    ri, rp, ci, cp = layout(2, 2, 3, 3, 1, 1.0, 0.5, 0)
    wc = ops.pack_compact_weight(torch.randn(2, 2, 3, 3), ri, rp, ci, cp)
    with (
        _gemm_env("fastest"),
        pytest.raises(RuntimeError, match="SSL_LIGHTNING_GEMM must be auto, gather, avx2, onednn or blas"),
    ):
        ops.compact_conv2d(x, wc, ri, rp, ci, cp, None, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2)


@compiled
def test_forcing_the_gather_kernel_where_it_cannot_run_is_a_clear_error() -> None:
    x, *rest = case(5, dtype=torch.float64)
    msg = r"SSL_LIGHTNING_GEMM=gather: .* it runs float32, bfloat16 and float16, got Double"
    with _gemm_env("gather"), pytest.raises(RuntimeError, match=msg):
        ops.compact_conv2d(x, *rest, False)
    with _gemm_env("auto"):  # auto takes the lowered path for float64
        torch.testing.assert_close(ops.compact_conv2d(x, *rest, False), ops.compact_conv2d_reference(x, *rest, False))


@compiled
@pytest.mark.skipif("gather" not in PANEL_KERNELS, reason="needs a CPU with AVX-512F")
def test_isa_cap_makes_the_op_run_as_on_a_cpu_without_avx512() -> None:
    """SSL_LIGHTNING_MAX_ISA caps what auto picks (a CPU without AVX-512 takes the AVX2 kernel, one without
    either the lowered tiles); each choice computes the same result."""
    x, *rest = case(6)
    want = ops.compact_conv2d_reference(x, *rest, False)
    for cap, kernel in [("avx512", "avx512"), ("avx2", "avx2"), ("none", "onednn")]:
        with _env("SSL_LIGHTNING_MAX_ISA", cap), _gemm_env("auto"):
            assert ops.cpu_kernel() == kernel
            torch.testing.assert_close(ops.compact_conv2d(x, *rest, False), want, rtol=1e-5, atol=1e-5)
    with _gemm_env("avx2"):  # forced: the AVX2 kernel although AVX-512 is there
        assert ops.cpu_kernel() == ops.cpu_kernel(torch.bfloat16) == "avx2"
    assert ops.cpu_kernel(torch.float64) == "onednn"  # no panel kernel for float64


@compiled
@pytest.mark.skipif(not PANEL_KERNELS, reason="needs an x86-64 CPU with AVX2 / FMA")
@pytest.mark.parametrize(("cap", "gemm", "hidden"), [("avx2", "gather", "AVX-512"), ("none", "avx2", "AVX2")])
def test_forcing_a_kernel_the_cpu_lacks_names_the_missing_feature(cap: str, gemm: str, hidden: str) -> None:
    """A forced kernel this (capped) CPU cannot run is a clear error naming what is missing, from the op and
    from cpu_kernel alike, never an illegal instruction."""
    if gemm == "gather" and "gather" not in PANEL_KERNELS:
        pytest.skip("this CPU lacks AVX-512 anyway (the uncapped message is tested by the CPU itself)")
    x, *rest = case(7)
    with _env("SSL_LIGHTNING_MAX_ISA", cap), _gemm_env(gemm):
        msg = rf"SSL_LIGHTNING_GEMM={gemm}: .*SSL_LIGHTNING_MAX_ISA={cap} hides {hidden}"
        with pytest.raises(RuntimeError, match=msg + r"\. Unset SSL_LIGHTNING_GEMM or set it to auto"):
            ops.compact_conv2d(x, *rest, False)
        with pytest.raises(RuntimeError, match=msg):
            ops.cpu_kernel()


@compiled
def test_unknown_isa_cap_and_dtype_are_clear_errors() -> None:
    x, *rest = case(8)
    msg = "SSL_LIGHTNING_MAX_ISA must be avx512, avx2 or none, got 'sse'"
    with _env("SSL_LIGHTNING_MAX_ISA", "sse"), pytest.raises(RuntimeError, match=msg):
        ops.compact_conv2d(x, *rest, False)
    with pytest.raises(ValueError, match=r"cpu_kernel: dtype must be one of .* got torch.int32"):
        ops.cpu_kernel(torch.int32)


@pytest.mark.parametrize("gemm", ["auto", "onednn", "avx2"])
@pytest.mark.parametrize("keep_cols", [0.0, 1.0])
@pytest.mark.parametrize("compact_output", [False, True])
def test_all_or_no_columns_kept_over_several_tiles(gemm: str, keep_cols: float, compact_output: bool) -> None:
    """0 % kept columns: the kept filters output their bias; 100 %: the dense conv. 30 filters x 3 groups
    and 7 x 40 positions span several 12-filter (6 for AVX2) tiles and 32-position panels."""
    if gemm == "avx2" and not _runs_here(gemm):
        pytest.skip("this CPU has no AVX2 / FMA")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 40, generator=gen)
    dense = torch.randn(90, 2, 3, 3, generator=gen)
    bias = torch.randn(90, generator=gen)
    ri, rp, ci, cp = layout(90, 2, 3, 3, 3, 0.6, keep_cols, 5)
    wc = ops.pack_compact_weight(dense, ri, rp, ci, cp)
    masked = ops.expand_compact_weight(wc, ri, rp, ci, cp, 90, 2, (3, 3))
    expected = F.conv2d(x, masked, bias, 1, 1, 1, 3)
    if compact_output:
        expected = expected[:, ri]
    with _gemm_env(gemm):
        got = ops.compact_conv2d(x, wc, ri, rp, ci, cp, bias, (3, 3), (1, 1), (1, 1), (1, 1), 3, 90, compact_output)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cg", "keep_cols"), [(80, 0.95), (160, 1.0)])  # k = 684 and 1440 kept columns
@pytest.mark.parametrize("compact_output", [False, True])
@pytest.mark.parametrize("gemm", ["auto", "avx2"])
def test_long_kept_columns_accumulate_over_k_chunks(cg: int, keep_cols: float, compact_output: bool, gemm: str) -> None:
    """More kept columns than one packed k chunk holds (640 on the panel kernels): the partial products of
    the chunks add up, with the bias added once."""
    if gemm == "avx2" and not _runs_here(gemm):
        pytest.skip("this CPU has no AVX2 / FMA")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2 * cg, 6, 9, generator=gen)
    dense = torch.randn(26, cg, 3, 3, generator=gen)
    bias = torch.randn(26, generator=gen)
    ri, rp, ci, cp = layout(26, cg, 3, 3, 2, 0.7, keep_cols, 11)
    assert int((cp[1:] - cp[:-1]).min()) > 640
    wc = ops.pack_compact_weight(dense, ri, rp, ci, cp)
    masked = ops.expand_compact_weight(wc, ri, rp, ci, cp, 26, cg, (3, 3))
    expected = F.conv2d(x, masked, bias, 1, 1, 1, 2)
    if compact_output:
        expected = expected[:, ri]
    with _gemm_env(gemm):
        got = ops.compact_conv2d(x, wc, ri, rp, ci, cp, bias, (3, 3), (1, 1), (1, 1), (1, 1), 2, 26, compact_output)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wo", [1, 2, 3])
@pytest.mark.parametrize("gemm", ["auto", "avx2"])
def test_narrow_outputs_at_stride_1_pack_by_runs_or_by_lanes(dtype: torch.dtype, wo: int, gemm: str) -> None:
    """Stride-1 panels are packed one masked load per run of consecutive positions, at most 8 runs per 16
    lanes: output rows of 3 positions give 6 runs, of 2 exactly 8, of 1 sixteen (read lane by lane instead).
    Padding rows and columns make every tap's lanes a different subset of each run."""
    if gemm == "avx2" and not _runs_here(gemm):
        pytest.skip("this CPU has no AVX2 / FMA")
    gen = torch.Generator().manual_seed(wo)
    x = torch.randn(2, 6, 41, wo + 2, generator=gen).to(dtype)  # kernel 3, padding (1, 0): Wo = wo
    dense = torch.randn(26, 3, 3, 3, generator=gen).to(dtype)
    bias = torch.randn(26, generator=gen).to(dtype)
    ri, rp, ci, cp = layout(26, 3, 3, 3, 2, 0.6, 0.7, wo)
    wc = ops.pack_compact_weight(dense, ri, rp, ci, cp)
    masked = ops.expand_compact_weight(wc, ri, rp, ci, cp, 26, 3, (3, 3))
    expected = F.conv2d(x.double(), masked.double(), bias.double(), 1, (1, 0), 1, 2)
    with _gemm_env(gemm):
        got = ops.compact_conv2d(x, wc, ri, rp, ci, cp, bias, (3, 3), (1, 1), (1, 0), (1, 1), 2, 26)
    assert got.shape == expected.shape == (2, 26, 41, wo)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # 16-bit storage: one rounding of the fp32 result
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


PANEL_KERNELS_16 = [k for k in ("gather", "avx2") if _runs_here(k, torch.bfloat16)]


@pytest.mark.skipif(not PANEL_KERNELS_16, reason="needs a panel kernel (x86-64 AVX2 / FMA or AVX-512 BW/VL)")
@settings(max_examples=60, deadline=None)
@given(
    gemm=st.sampled_from(PANEL_KERNELS_16 or ["gather"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    bf16_dot=st.booleans(),
    n=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    cg=st.integers(1, 4),
    og=st.sampled_from([1, 13, 27]),
    kernel=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
    stride=st.sampled_from([(1, 1), (2, 2), (3, 1)]),  # (2, 2) and (3, 1): lanes read one by one
    padding=st.sampled_from([(0, 0), (1, 1)]),
    dilation=st.sampled_from([(1, 1), (2, 1)]),
    keep_rows=st.sampled_from([0.0, 0.4, 1.0]),
    keep_cols=st.sampled_from([0.0, 0.3, 1.0]),
    compact_output=st.booleans(),
    with_bias=st.booleans(),
    channels_last=st.booleans(),
    size=st.sampled_from([(11, 10), (4, 37), (2, 70)]),
    seed=st.integers(0, 1000),
)
def test_16_bit_storage_rounds_the_fp32_result_once(
    gemm, dtype, bf16_dot, n, groups, cg, og, kernel, stride, padding, dilation, keep_rows, keep_cols, compact_output,
    with_bias, channels_last, size, seed,
) -> None:  # fmt: skip
    """bf16 / fp16 in and out, fp32 inside: the result is the fp32 conv of the same 16-bit values, rounded."""
    gen = torch.Generator().manual_seed(seed)
    c, o = cg * groups, og * groups
    h, w = size
    h = max(h, dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dense = torch.randn(o, cg, *kernel, generator=gen).to(dtype)
    bias = torch.randn(o, generator=gen).to(dtype) if with_bias else None
    ri, rp, ci, cp = layout(o, cg, *kernel, groups, keep_rows, keep_cols, seed)
    wc = ops.pack_compact_weight(dense, ri, rp, ci, cp)
    masked = ops.expand_compact_weight(wc, ri, rp, ci, cp, o, cg, kernel).float()
    expected = F.conv2d(
        x.float(), masked, bias.float() if bias is not None else None, stride, padding, dilation, groups
    )
    if compact_output:
        expected = expected[:, ri]
    # a panel kernel (or an error, never a silent fallback); AVX-512: bf16 by dot products or widened to fp32;
    # AVX2: input, weight and bias widened to fp32 once
    with _gemm_env(gemm), _env("SSL_LIGHTNING_BF16_DOT", "1" if bf16_dot else "0"):
        got = ops.compact_conv2d(
            x, wc, ri, rp, ci, cp, bias, kernel, stride, padding, dilation, groups, o, compact_output
        )
    assert got.dtype == dtype and got.shape == expected.shape
    if expected.numel():
        u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # unit roundoff bound of the storage format
        err = (got.float() - expected).abs()
        assert bool((err <= 2 * u * expected.abs() + 1e-5 * expected.abs().max().clamp(min=1.0)).all())
        # rounded to nearest (even): equal to the rounded fp32 result except where the summation order
        # moves a value across a rounding boundary (~1e-4 of values); truncation would miss half of them
        assert int((got != expected.to(dtype)).sum()) <= max(1, expected.numel() // 100)


@pytest.mark.skipif(not _runs_here("gather", torch.bfloat16), reason="needs the AVX-512 kernel with BW/VL (x86-64)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bf16_dot", [False, True])
@pytest.mark.parametrize("stride", [1, 2])  # stride 2: lanes read one by one
def test_16_bit_long_odd_k_accumulates_over_chunks(dtype: torch.dtype, bf16_dot: bool, stride: int) -> None:
    """685 kept columns per group: two k chunks (bf16 dot products: even chunks of column pairs, the
    last pair half padding), fp32 partial sums carried across chunks and rounded once at the end."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(1, 160, 7, 12, generator=gen).to(dtype)
    dense = torch.randn(26, 80, 3, 3, generator=gen).to(dtype)
    bias = torch.randn(26, generator=gen).to(dtype)
    ri, rp, ci, cp = layout(26, 80, 3, 3, 2, 0.7, 0.9514, 2)
    assert [int(v) for v in cp[1:] - cp[:-1]] == [685, 685]
    wc = ops.pack_compact_weight(dense, ri, rp, ci, cp)
    masked = ops.expand_compact_weight(wc, ri, rp, ci, cp, 26, 80, (3, 3))
    expected = F.conv2d(x.double(), masked.double(), bias.double(), stride, 1, 1, 2)
    with _gemm_env("gather"), _env("SSL_LIGHTNING_BF16_DOT", "1" if bf16_dot else "0"):
        got = ops.compact_conv2d(x, wc, ri, rp, ci, cp, bias, (3, 3), (stride, stride), (1, 1), (1, 1), 2, 26)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (got.double() - expected).abs()
    assert bool((err <= 2 * u * expected.abs() + 1e-4 * expected.abs().max()).all())

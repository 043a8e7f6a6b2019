"""The CUDA compact_conv2d (implicit GEMM, tensor cores, CUDA backward, index plans): every test is marked
``cuda`` and skips without a GPU and the CUDA build; ``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lightning import ops
from ssl_lightning.compaction.layers import CompactConv2d

from .conftest import requires_cuda_kernels
from .test_compact_conv import _env, case, layout

# max |got - ref| / max |ref| allowed per (dtype, tf32): ref is the float64 result of the same (rounded) inputs
TOLERANCE = {
    (torch.float64, False): 1e-12,
    (torch.float32, False): 1e-5,
    (torch.float32, True): 5e-3,
    (torch.float16, False): 5e-3,
    (torch.bfloat16, False): 3e-2,
}


@contextlib.contextmanager
def gemm(kind: str, tf32: bool = False) -> Iterator[None]:
    """SSL_LIGHTNING_CUDA_GEMM (read at every call) and the cuDNN TF32 flag the CUDA kernel follows."""
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        with _env("SSL_LIGHTNING_CUDA_GEMM", kind):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32


def random_case(seed: int) -> tuple:
    """A random grouped / depthwise / strided / dilated / padded geometry with random kept rows and columns."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(*choices):  # type: ignore[no-untyped-def]
        return choices[int(torch.randint(len(choices), (1,), generator=g))]

    kind = pick("plain", "plain", "grouped", "grouped", "depthwise")
    if kind == "depthwise":
        groups = c = pick(4, 16)
        cg, og = 1, pick(1, 2)
    else:
        groups = 1 if kind == "plain" else pick(2, 3)
        cg, og = pick(1, 3, 8, 20), pick(1, 5, 16, 40)
        c = cg * groups
    o = og * groups
    kh, kw = pick(1, 3, 5), pick(1, 3)
    st, pd, dl = [pick(1, 2), pick(1, 2)], [pick(0, 1, 2), pick(0, 1)], [pick(1, 2), pick(1, 1, 2)]
    n, h, w = pick(1, 2, 3), pick(7, 12, 19), pick(6, 11, 17)
    h, w = max(h, dl[0] * (kh - 1) + 1), max(w, dl[1] * (kw - 1) + 1)
    keep = (pick(0.0, 0.4, 1.0, 0.7, 0.5, 0.9), pick(0.0, 0.3, 1.0, 0.6, 0.5, 0.8))
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(o, cg, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64) if pick(True, False) else None
    ri, rp, ci, cp = layout(o, cg, kh, kw, groups, *keep, seed)
    wc = ops.pack_compact_weight(wt, ri, rp, ci, cp)
    return x, wc, ri, rp, ci, cp, b, [kh, kw], st, pd, dl, groups, o


def big_case() -> tuple:
    """Several tiles in every direction: 300 filters (210 kept), 576 columns (about half kept), 2 x 20 x 20."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 20, 20, generator=g, dtype=torch.float64)
    wt = torch.randn(300, 64, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(300, generator=g, dtype=torch.float64)
    ri, rp, ci, cp = layout(300, 64, 3, 3, 1, 0.7, 0.5, 7)
    return x, ops.pack_compact_weight(wt, ri, rp, ci, cp), ri, rp, ci, cp, b, [3, 3], [1, 1], [1, 1], [1, 1], 1, 300


def forward_error(args: tuple, compact_output: bool, dtype: torch.dtype, run: Callable[..., torch.Tensor]) -> float:
    """max |run(...) - ref| / max |ref| for the case ``args`` in ``dtype``; ``run`` takes the op's arguments (the
    tensors rounded to ``dtype``, on the CPU) and returns its output; ref is the float64 reference of the same
    rounded inputs."""
    x, wc, ri, rp, ci, cp, b, *rest = args
    xr, wr, br = (t.to(dtype) if t is not None else None for t in (x, wc, b))
    ref = ops.compact_conv2d_reference(
        xr.double(), wr.double(), ri, rp, ci, cp, br.double() if br is not None else None, *rest, compact_output
    )
    got = run(xr, wr, ri, rp, ci, cp, br, *rest, compact_output)
    assert got.dtype == dtype and got.shape == ref.shape
    if not ref.numel():
        return 0.0
    return (got.double().cpu() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def check_forward(args: tuple, compact_output: bool, dtype: torch.dtype, kind: str, tf32: bool = False) -> None:
    def run(*op_args):  # type: ignore[no-untyped-def]
        dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in op_args]
        with gemm(kind, tf32):
            return torch.ops.ssl_lightning.compact_conv2d(*dev)

    err = forward_error(args, compact_output, dtype, run)
    assert err <= TOLERANCE[(dtype, tf32)], f"{kind} {dtype} tf32={tf32}: relative error {err}"


@requires_cuda_kernels()
@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize(
    "dtype,kind,tf32",
    [
        (torch.float32, "simt", False),
        (torch.float32, "auto", False),
        (torch.float32, "auto", True),
        (torch.float64, "auto", False),
        (torch.float16, "auto", False),
        (torch.bfloat16, "auto", False),
        (torch.bfloat16, "simt", False),
        (torch.float32, "lowered", False),
    ],
)
def test_cuda_forward_matches_reference_on_a_random_sweep(seed: int, dtype: torch.dtype, kind: str, tf32: bool) -> None:
    check_forward(random_case(seed), seed % 2 == 1, dtype, kind, tf32)


@requires_cuda_kernels()
@pytest.mark.parametrize("compact_output", [False, True])
@pytest.mark.parametrize(
    "dtype,kind,tf32",
    [(torch.float32, "simt", False), (torch.float32, "auto", True), (torch.float16, "auto", False),
     (torch.bfloat16, "auto", False)],
)  # fmt: skip
def test_cuda_forward_over_several_tiles(compact_output: bool, dtype: torch.dtype, kind: str, tf32: bool) -> None:
    check_forward(big_case(), compact_output, dtype, kind, tf32)


@requires_cuda_kernels()
def test_cuda_removed_filters_output_their_bias() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(4, n=2, groups=2)
    dev = [t.cuda() for t in (x, wc, ri, rp, ci, cp, b)]
    y = torch.ops.ssl_lightning.compact_conv2d(*dev, *rest, False).cpu()
    removed = sorted(set(range(rest[-1])) - set(ri.tolist()))
    assert removed
    for ch in removed:
        assert torch.all(y[:, ch] == b[ch])


@requires_cuda_kernels()
@pytest.mark.parametrize("sample", range(4))
def test_cuda_opcheck(sample: int) -> None:
    from .test_compact_conv import opcheck_samples

    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in opcheck_samples()[sample]]
    torch.library.opcheck(torch.ops.ssl_lightning.compact_conv2d.default, args)


@requires_cuda_kernels()
@pytest.mark.parametrize("compact_output", [False, True])
def test_cuda_gradcheck(compact_output: bool) -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(5, n=2, groups=2, dtype=torch.float64)
    xd, wd, bd = (t.cuda().requires_grad_() for t in (x, wc, b))
    idx = [t.cuda() for t in (ri, rp, ci, cp)]

    def f(x_: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        return torch.ops.ssl_lightning.compact_conv2d(x_, w_, *idx, b_, *rest, compact_output)

    assert torch.autograd.gradcheck(f, (xd, wd, bd))


@requires_cuda_kernels()
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_backward_op_matches_reference(seed: int, dtype: torch.dtype) -> None:
    x, wc, ri, rp, ci, cp, _b, ks, st, pd, dl, groups, o = random_case(seed)
    compact_output = seed % 2 == 0
    rows = len(ri) if compact_output else o
    y = ops.compact_conv2d_reference(x, wc, ri, rp, ci, cp, None, ks, st, pd, dl, groups, o, compact_output)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert gy.shape[1] == rows
    args = (gy, x, wc, ri, rp, ci, cp, ks, st, pd, dl, groups, o, compact_output, [True, True])
    ref_x, ref_w = ops.compact_conv2d_backward_reference(*args)
    dev = [a.to("cuda", dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in dev]
    with torch.backends.cuda.matmul.flags(allow_tf32=False):
        got_x, got_w = torch.ops.ssl_lightning.compact_conv2d_backward(*dev)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for got, ref in ((got_x, ref_x), (got_w, ref_w)):
        assert got.shape == ref.shape
        if ref.numel():
            assert (got.double().cpu() - ref).abs().max() <= tol * max(ref.abs().max().item(), 1.0)
    # asked-for outputs only
    x_only = torch.ops.ssl_lightning.compact_conv2d_backward(*dev[:-1], [True, False])
    assert x_only[1].numel() == 0 and torch.equal(x_only[0], got_x)


@requires_cuda_kernels()
def test_cuda_forward_is_deterministic_and_backward_has_no_atomics() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = big_case()
    dev = [t.float().cuda() if t.is_floating_point() else t.cuda() for t in (x, wc, ri, rp, ci, cp, b)]
    xr = dev[0].clone().requires_grad_()
    grads = []
    for _ in range(2):
        xr.grad = None
        torch.ops.ssl_lightning.compact_conv2d(xr, *dev[1:], *rest, False).square().sum().backward()
        grads.append(xr.grad.clone())
    assert torch.equal(grads[0], grads[1])


@requires_cuda_kernels()
def test_cuda_steady_state_calls_do_not_synchronise() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(6, n=2, groups=2)
    dev = [t.cuda() for t in (x, wc, ri, rp, ci, cp, b)]
    expected = torch.ops.ssl_lightning.compact_conv2d(*dev, *rest, False)  # first call: plan built (synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = torch.ops.ssl_lightning.compact_conv2d(*dev, *rest, False)
        xg = dev[0].clone().requires_grad_()
        torch.ops.ssl_lightning.compact_conv2d(xg, *dev[1:], *rest, False).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got, expected)


@requires_cuda_kernels()
def test_cuda_index_lists_written_in_place_are_read_again() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(7, n=2, groups=1, keep=(0.5, 0.5))
    dev = [t.cuda() for t in (x, wc, ri, rp, ci, cp, b)]
    torch.ops.ssl_lightning.compact_conv2d(*dev, *rest, False)
    # another valid structure of the same sizes, written into the same tensors
    ri2, _rp, ci2, _cp = layout(rest[-1], x.shape[1], 3, 3, 1, 0.5, 0.5, 99)
    assert not torch.equal(ri2, ri) or not torch.equal(ci2, ci)
    dev[2].copy_(ri2)
    dev[4].copy_(ci2)
    with gemm("auto", tf32=False):
        got = torch.ops.ssl_lightning.compact_conv2d(*dev, *rest, False)
    ref = ops.compact_conv2d_reference(x, wc, ri2, rp, ci2, cp, b, *rest, False)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)


@requires_cuda_kernels()
def test_cuda_graph_capture_replays_the_op() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(8, n=2, groups=2)
    dev = [t.cuda() for t in (x, wc, ri, rp, ci, cp, b)]
    static_x = dev[0].clone()
    with gemm("auto", tf32=False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: the index plan is built here
            torch.ops.ssl_lightning.compact_conv2d(static_x, *dev[1:], *rest, False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = torch.ops.ssl_lightning.compact_conv2d(static_x, *dev[1:], *rest, False)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
    ref = ops.compact_conv2d_reference(new_x.cpu(), wc, ri, rp, ci, cp, b, *rest, False)
    torch.testing.assert_close(static_y.cpu(), ref, rtol=1e-4, atol=1e-4)


@requires_cuda_kernels()
def test_cuda_bad_inputs_raise_clear_errors() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(9, n=1, groups=1)
    dev = [t.cuda() for t in (x, wc, ri, rp, ci, cp, b)]
    with pytest.raises(RuntimeError, match=r"needs a CUDA input|is on"):  # CPU input, CUDA weight
        torch.ops.ssl_lightning.compact_conv2d(x, *dev[1:], *rest, False)
    with pytest.raises(RuntimeError, match="weight is on"):
        torch.ops.ssl_lightning.compact_conv2d(dev[0], wc, *dev[2:], *rest, False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ssl_lightning.compact_conv2d(dev[0].to(torch.float8_e4m3fn), dev[1].to(torch.float8_e4m3fn),
                                               *dev[2:6], None, *rest, False)  # fmt: skip
    bad = dev[4].clone()
    bad[0] = 10**6
    with pytest.raises(RuntimeError, match="column index"):
        torch.ops.ssl_lightning.compact_conv2d(*dev[:4], bad, *dev[5:], *rest, False)
    with pytest.raises(RuntimeError, match="SSL_LIGHTNING_CUDA_GEMM"), gemm("tensor"):
        torch.ops.ssl_lightning.compact_conv2d(*dev, *rest, False)
    # index lists on the CPU with a CUDA input are accepted
    with gemm("simt"):
        got = torch.ops.ssl_lightning.compact_conv2d(dev[0], dev[1], ri, rp, ci, cp, dev[6], *rest, False)
    torch.testing.assert_close(got.cpu(), ops.compact_conv2d_reference(x, wc, ri, rp, ci, cp, b, *rest, False))


@requires_cuda_kernels()
def test_cuda_compact_conv2d_module_and_compile() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    with torch.no_grad():
        conv.weight[::3] = 0  # removed filters
        conv.weight[:, 2:5] = 0  # removed channels
    rows, cols = ops.lowered_nonzero(conv.weight)
    layer = CompactConv2d(conv, rows, cols, impl="fused").cuda()
    conv = conv.cuda()
    x = torch.randn(4, 16, 14, 14, device="cuda")
    with gemm("auto", tf32=False):  # exact fp32 on both sides
        with torch.no_grad():
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
            compiled = torch.compile(layer, fullgraph=True)
            torch.testing.assert_close(compiled(x), conv(x), rtol=1e-4, atol=1e-4)
        xg = x.clone().requires_grad_()
        layer(xg).square().sum().backward()
        xr = x.clone().requires_grad_()
        F.conv2d(xr, conv.weight, conv.bias, padding=1).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-3, atol=1e-3)


@requires_cuda_kernels()
def test_cuda_compact_resnet_measured_and_equal() -> None:
    """compact() on the GPU with measured choices (the autotune times cuDNN against the CUDA op there)."""
    from ssl_lightning import compact
    from ssl_lightning.models import resnet20

    from .test_compaction import zero_structure

    torch.manual_seed(1)
    model = resnet20()
    zero_structure(model, rows=0.2, cols=0.5)
    model = model.cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with gemm("auto", tf32=False), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        fast = compact(model, x, measure=True)
        layers = [m for m in fast.modules() if isinstance(m, CompactConv2d)]
        assert len(layers) >= 10 and all(m.row_idx.is_cuda for m in layers)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        assert {m.impl for m in layers} <= {"fused", "rows", "dense"}

"""The CUDA kernels of compact_conv2d run on the CPU: csrc/cuda/compact_conv_impl.cuh (the implicit-GEMM kernels on
CUDA and tensor cores, the lowered path, the backward's lowering and col2im gather, the index plan) compiled as
C++ against the emulation in tests/cuda_emulation and compared with the reference twins. What a GPU adds on top
(the real warp layout of wmma fragments, memory model, speed) is left to the ``cuda`` tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_lightning import ops

from .test_compact_conv import case
from .test_cuda_conv import TOLERANCE, big_case, forward_error, random_case

HERE = Path(__file__).parent / "cuda_emulation"
BUILD = Path(__file__).parents[1] / "build" / "cuda_emulation"


@pytest.fixture(scope="module")
def emulated() -> Any:
    """torch.ops.ssl_lightning_emulated, built once (about 20 s; reused while the sources do not change). With
    SSL_LIGHTNING_SANITIZE=1 (``.ci/sanitize``) built with AddressSanitizer + UBSan: every read and write of the
    kernels is checked against the tensors' allocations."""
    from torch.utils.cpp_extension import load

    cflags, ldflags, build = ["-std=c++20", "-O2", "-pthread"], ["-pthread"], BUILD
    if os.environ.get("SSL_LIGHTNING_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cflags, ldflags, build = ["-std=c++20", "-O1", "-g", "-pthread", *san], ["-pthread", *san], BUILD / "sanitize"
    build.mkdir(parents=True, exist_ok=True)
    load(
        "ssl_lightning_cuda_emulation",
        [str(HERE / "emulated_ops.cpp")],
        extra_cflags=cflags,
        extra_include_paths=[str(HERE / "stub")],
        extra_ldflags=ldflags,
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.ssl_lightning_emulated


# (dtype, kernel, the tolerance key): "auto" is the tensor-core kernel (TF32 for fp32) in the emulation
KERNELS = [
    (torch.float32, "simt", (torch.float32, False)),
    (torch.float64, "simt", (torch.float64, False)),
    (torch.bfloat16, "simt", (torch.bfloat16, False)),
    (torch.float32, "lowered", (torch.float32, False)),
    (torch.float32, "auto", (torch.float32, True)),
    (torch.float16, "auto", (torch.float16, False)),
    (torch.bfloat16, "auto", (torch.bfloat16, False)),
]


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("dtype,kind,tol", KERNELS)
def test_emulated_cuda_forward_matches_reference(emulated: Any, seed: int, dtype: torch.dtype, kind: str, tol) -> None:  # type: ignore[no-untyped-def]
    err = forward_error(random_case(seed), seed % 2 == 1, dtype, lambda *a: emulated.compact_conv2d(*a, kind))
    assert err <= TOLERANCE[tol], f"{kind} {dtype}: relative error {err}"


@pytest.mark.parametrize("compact_output", [False, True])
@pytest.mark.parametrize("dtype,kind,tol", [KERNELS[0], KERNELS[4], KERNELS[6]])
def test_emulated_cuda_forward_over_several_tiles(emulated: Any, compact_output: bool, dtype, kind, tol) -> None:  # type: ignore[no-untyped-def]
    err = forward_error(big_case(), compact_output, dtype, lambda *a: emulated.compact_conv2d(*a, kind))
    assert err <= TOLERANCE[tol], f"{kind} {dtype}: relative error {err}"


def test_emulated_cuda_forward_writes_removed_filters_bias_and_nothing_else(emulated: Any) -> None:
    x, wc, ri, rp, ci, cp, b, *rest = big_case()
    x, wc, b = x.float(), wc.float(), b.float()
    for kind in ("simt", "auto"):
        y = emulated.compact_conv2d(x, wc, ri, rp, ci, cp, b, *rest, False, kind)
        removed = torch.ones(rest[-1], dtype=torch.bool)
        removed[ri] = False
        assert torch.equal(y[:, removed], b[removed].view(1, -1, 1, 1).expand(y.shape[0], -1, *y.shape[2:]))
        compact = emulated.compact_conv2d(x, wc, ri, rp, ci, cp, b, *rest, True, kind)
        assert torch.equal(compact, y[:, ri])  # the same kernel: compact output is the kept rows exactly


@pytest.mark.parametrize("seed", range(16))
def test_emulated_cuda_backward_matches_reference(emulated: Any, seed: int) -> None:
    x, wc, ri, rp, ci, cp, _b, ks, st, pd, dl, groups, o = random_case(seed)
    compact_output = seed % 2 == 0
    y = ops.compact_conv2d_reference(x, wc, ri, rp, ci, cp, None, ks, st, pd, dl, groups, o, compact_output)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    args = (gy, x, wc, ri, rp, ci, cp, ks, st, pd, dl, groups, o, compact_output)
    ref_x, ref_w = ops.compact_conv2d_backward_reference(*args, [True, True])
    got_x, got_w = emulated.compact_conv2d_backward(*args, [True, True])
    for got, ref in ((got_x, ref_x), (got_w, ref_w)):
        assert got.shape == ref.shape
        if ref.numel():
            assert (got - ref).abs().max() <= 1e-10 * max(ref.abs().max().item(), 1.0)
    only_x = emulated.compact_conv2d_backward(*args, [True, False])
    only_w = emulated.compact_conv2d_backward(*args, [False, True])
    assert torch.equal(only_x[0], got_x) and only_x[1].numel() == 0
    assert torch.equal(only_w[1], got_w) and only_w[0].numel() == 0


def test_plan_cache_reuses_a_plan_until_an_index_tensor_changes(emulated: Any) -> None:
    """The plan cache the CUDA op keeps (index lists checked and uploaded once per index tensors), on the host."""
    _x, _w, ri, rp, ci, cp, *_ = case(0)
    assert ci.numel() > 0
    geometry = (2, 4, 6, 3, 3)  # groups, cg, og, kh, kw of case(0)

    def get(*lists: torch.Tensor) -> list[int]:
        return emulated.plan_cache_get(*lists, *geometry)

    uploads, entries, _ = get(ri, rp, ci, cp)
    assert get(ri, rp, ci, cp)[:2] == [uploads, entries]  # same tensors: the plan is reused, nothing uploaded
    ci2 = ci.clone()
    assert get(ri, rp, ci2, cp)[0] == uploads + 1  # another tensor (same values): checked and uploaded again
    with torch.no_grad():
        ci2.copy_(ci)  # an in-place write bumps the version: the plan is stale
    assert get(ri, rp, ci2, cp)[0] == uploads + 2
    assert get(ri, rp, ci2, cp)[0] == uploads + 2
    with torch.inference_mode():
        inference_ci = ci.clone()
    assert get(ri, rp, inference_ci, cp)[0] == uploads + 3  # inference tensors have no version: never kept
    assert get(ri, rp, inference_ci, cp)[0] == uploads + 4
    size_before = get(ri, rp, ci2, cp)[1]
    del ci2  # its entries die with it, and the device is synchronised before their tables are freed
    _, size_after, syncs = get(ri, rp, ci.clone(), cp)
    assert size_after < size_before + 1 and syncs >= 1
    bad = ci.clone()
    bad[0] = 10**6
    with pytest.raises(RuntimeError, match="column index"):
        get(ri, rp, bad, cp)


def test_plan_cache_miss_during_a_capture_is_a_clear_error(emulated: Any) -> None:
    _x, _w, ri, rp, ci, cp, *_ = case(1, groups=1)
    geometry = (1, 4, 6, 3, 3)
    emulated.plan_cache_get(ri, rp, ci, cp, *geometry)
    emulated.set_capturing(True)
    try:
        emulated.plan_cache_get(ri, rp, ci, cp, *geometry)  # seen before the capture: fine
        with pytest.raises(RuntimeError, match="outside the capture"):
            emulated.plan_cache_get(ri, rp, ci.clone(), cp, *geometry)
    finally:
        emulated.set_capturing(False)


def test_emulated_cuda_limits_are_clear_errors(emulated: Any) -> None:
    """Shapes beyond what the CUDA kernels index (32-bit taps, one grid z-slice per group, 65535 filter tiles)
    are refused with a message, before anything is launched."""
    one = [1, 1]

    def conv(x, w, ri, rp, ci, cp, out_channels, groups, padding=(0, 0)):  # type: ignore[no-untyped-def]
        return emulated.compact_conv2d(x, w, ri, rp, ci, cp, None, one, one, list(padding), one, groups,
                                       out_channels, False, "simt")  # fmt: skip

    x = torch.zeros(1, 1, 1, 1)
    kept = (torch.zeros(1, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="tap offsets beyond 2"):
        conv(x, torch.zeros(1), *kept, *kept, 1, 1, padding=(2**31, 0))
    g = 65536
    per_group = torch.arange(g + 1)
    with pytest.raises(RuntimeError, match="at most 65535 conv groups"):
        conv(torch.zeros(1, g, 1, 1), torch.zeros(g), torch.arange(g), per_group, torch.zeros(g, dtype=torch.long),
             per_group, g, g)  # fmt: skip
    rows = 65535 * 64 + 1
    with pytest.raises(RuntimeError, match="exceed the kernel's grid"):
        conv(x, torch.zeros(0), torch.arange(rows), torch.tensor([0, rows]), torch.zeros(0, dtype=torch.long),
             torch.tensor([0, 0]), rows, 1)  # fmt: skip

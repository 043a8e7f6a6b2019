"""Compiled ops: opcheck, equivalence with the reference twin, clear errors, fallback, torch.compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_lightning import ops
from ssl_lightning._ext import has_compiled_ops

from .conftest import requires_cuda_kernels
from .test_compact_conv import backward_samples, opcheck_samples

compiled = pytest.mark.skipif(not has_compiled_ops(), reason="ssl_lightning._C not built")


def random_sparse_weight(n: int, cg: int, k: int, groups: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n * groups, cg, k, k, generator=g, dtype=torch.float32)
    w[torch.rand(n * groups, generator=g) < 0.3] = 0  # zero rows
    cols = torch.rand(cg, k, k, generator=g) < 0.4
    w[:, cols] = 0  # zero columns
    return w.to(dtype)


@compiled
def test_opcheck_every_registered_op() -> None:
    ns = torch.ops.ssl_lightning
    names = sorted(
        op.split("::")[1].split(".")[0]
        for op in torch._C._dispatch_get_all_op_names()
        if op.startswith("ssl_lightning::")
    )
    assert "lowered_nonzero" in names
    samples = {
        "lowered_nonzero": [
            (random_sparse_weight(4, 3, 3, 2, 0), 2),
            (random_sparse_weight(5, 2, 1, 1, 1, torch.float64), 1),
            (random_sparse_weight(2, 4, 3, 3, 2, torch.bfloat16), 3),
        ],
        "compact_conv2d": opcheck_samples(),
        "compact_conv2d_backward": backward_samples(),
    }
    assert set(names) <= set(samples), f"ops without opcheck samples: {set(names) - set(samples)}"
    for name, cases in samples.items():
        for args in cases:
            torch.library.opcheck(getattr(ns, name).default, args)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    cg=st.integers(1, 5),
    k=st.sampled_from([1, 3, 5]),
    groups=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_lowered_nonzero_matches_reference(n, cg, k, groups, seed, dtype) -> None:
    w = random_sparse_weight(n, cg, k, groups, seed, dtype)
    rows, cols = ops.lowered_nonzero(w, groups)
    ref_rows, ref_cols = ops.lowered_nonzero_reference(w, groups)
    assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    assert cols.shape == (groups, cg * k * k)
    # brute force for the reference itself
    ng = n
    for r in range(n * groups):
        assert rows[r] == bool((w[r] != 0).any())
    for g in range(groups):
        block = w[g * ng : (g + 1) * ng].reshape(ng, -1)
        assert torch.equal(cols[g], (block != 0).any(dim=0))


def test_non_contiguous_and_linear_weights() -> None:
    w = random_sparse_weight(4, 3, 3, 1, 5).to(memory_format=torch.channels_last)
    assert torch.equal(ops.lowered_nonzero(w)[1], ops.lowered_nonzero_reference(w)[1])
    lin = torch.randn(6, 8)
    lin[2] = 0
    lin[:, 5] = 0
    rows, cols = ops.lowered_nonzero(lin.t().contiguous().t())  # a transposed view
    assert rows.tolist() == [True, True, False, True, True, True] and not cols[0, 5]


@pytest.mark.parametrize(
    ("weight", "groups", "match"),
    [
        (torch.randn(4), 1, "weight must have at least 2 dims"),
        (torch.randn(6, 2, 3, 3), 4, r"groups \(4\) must be >= 1 and divide the number of rows \(6\)"),
        (torch.randn(6, 2, 3, 3), 0, r"groups \(0\) must be >= 1"),
    ],
)
def test_wrapper_errors(weight, groups, match) -> None:
    with pytest.raises(ValueError, match=match):
        ops.lowered_nonzero(weight, groups)


@compiled
def test_kernel_checks_reach_the_user() -> None:
    with pytest.raises(RuntimeError, match=r"groups \(4\) must divide the number of rows \(6\)"):
        torch.ops.ssl_lightning.lowered_nonzero(torch.randn(6, 2, 3, 3), 4)
    with pytest.raises(RuntimeError, match="weight must be a floating tensor, got Int"):
        torch.ops.ssl_lightning.lowered_nonzero(torch.ones(4, 4, dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match="weight must have at least one row"):
        torch.ops.ssl_lightning.lowered_nonzero(torch.ones(0, 4), 1)


@compiled
def test_works_under_torch_compile_with_fake_kernel() -> None:
    w = random_sparse_weight(4, 3, 3, 2, 7)

    def count(x: torch.Tensor) -> torch.Tensor:
        rows, cols = torch.ops.ssl_lightning.lowered_nonzero(x, 2)
        return rows.sum() + cols.sum()

    compiled_fn = torch.compile(count, fullgraph=True, backend="eager")
    assert compiled_fn(w) == count(w)


def test_fallback_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "has_compiled_ops", lambda: False)
    w = random_sparse_weight(3, 2, 3, 1, 9)
    rows, cols = ops.lowered_nonzero(w)
    ref = ops.lowered_nonzero_reference(w)
    assert torch.equal(rows, ref[0]) and torch.equal(cols, ref[1])


@requires_cuda_kernels()
def test_cuda_kernel_matches_reference() -> None:
    w = random_sparse_weight(64, 48, 3, 2, 11).cuda()
    rows, cols = ops.lowered_nonzero(w, 2)
    ref = ops.lowered_nonzero_reference(w.cpu(), 2)
    assert torch.equal(rows.cpu(), ref[0]) and torch.equal(cols.cpu(), ref[1])

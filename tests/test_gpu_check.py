"""benchmarks/gpu_check.sh (issue #18): its no-GPU path, and that its test selection (``-m cuda``) is the set of
tests CPU CI skips for want of a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import cuda_kernels_here

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # the script calls `python`: the interpreter running these tests, first on PATH
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the check")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "gpu_check: no GPU here" in run.stdout
    assert not out.exists()  # nothing built, nothing written


def test_cuda_selection_is_what_cpu_ci_skips() -> None:
    """``-m cuda`` selects at least one test, and without a GPU every selected test skips for want of one."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    if cuda_kernels_here():
        assert " passed" in summary and "failed" not in summary, summary
        return
    assert " skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    reasons = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all("needs a GPU and the CUDA build of _C" in line for line in reasons), reasons


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_gpu_benchmark_without_a_gpu_is_a_clear_error() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compact_conv.py"), "--device", "cuda"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0
    assert "--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)" in run.stderr

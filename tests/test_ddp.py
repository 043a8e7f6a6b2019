"""Distributed training on CPU (gloo): every rank takes the same pruning decision and keeps equal weights; with
``compact_at_end`` under ``ddp`` and ``ddp_spawn`` the process that called ``fit`` holds the compacted model;
strategies that shard parameters are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssl_lightning import StructuredSparsity

from .conftest import Module, loader, trainer

sys.path.insert(0, str(Path(__file__).parent))
from ddp_job import DigestPerRank, gathered

JOB = Path(__file__).with_name("ddp_job.py")
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")


@linux_only
def test_ddp_ranks_take_identical_decisions(tmp_path: Path) -> None:
    cb = StructuredSparsity({"filter": 0.2, "shape": 0.2}, phases={"ssl": [0, 2], "finetune": [2, None]})
    t = trainer(
        tmp_path, max_epochs=3, callbacks=[cb, DigestPerRank(tmp_path)], strategy="ddp_spawn", devices=2, num_nodes=1
    )
    torch.manual_seed(0)  # the initial weights (whether λ = 0.2 prunes anything in 2 epochs depends on them)
    t.fit(Module(), loader(n=64, batch=8))
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt")["pruned"]
    g = gathered(tmp_path)
    assert g.shape == (2, 4)
    torch.testing.assert_close(g[0], g[1], rtol=0, atol=0)  # same masks, same weights on both ranks
    assert 0 < g[0, 0] < g[0, 1]  # something pruned, something kept


@linux_only
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_compact_at_end_reaches_the_process_that_called_fit(tmp_path: Path, strategy: str) -> None:
    done = subprocess.run(
        [sys.executable, str(JOB), str(tmp_path), strategy], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for saved in ranks:
        assert saved["pruned"] and saved["world_size"] == 2
        assert saved["compacted"] == ["net.conv1", "net.conv2"]
    g = gathered(tmp_path)
    torch.testing.assert_close(g[0], g[1], rtol=0, atol=0)
    digest = g[0]
    assert 0 < digest[0] < digest[1]  # something pruned, something kept
    driver = torch.load(tmp_path / "driver.pt")
    assert driver["compacted"] == ["net.conv1", "net.conv2"]  # the compacted structure, not the dense one
    assert driver["shapes"]["net.conv1.weight"] != (8, 3, 3, 3)
    torch.testing.assert_close(driver["output"], ranks[0]["output"], rtol=0, atol=0)  # the trained weights


def test_compact_at_end_under_spawn_needs_a_module_that_carries_the_structure(tmp_path: Path) -> None:
    cb = StructuredSparsity({"filter": 0.1}, compact_at_end="net")
    t = trainer(tmp_path, strategy="ddp_spawn", devices=2)
    with pytest.raises(ValueError, match=r"compact_at_end='net' with a DDPStrategy .* Mix in ssl_lightning"):
        cb.setup(t, Module(), "fit")


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_strategies_that_shard_parameters_are_refused(strategy: str) -> None:
    import lightning.pytorch.strategies as strategies

    cb = StructuredSparsity({"filter": 0.1})
    fake = SimpleNamespace(strategy=getattr(strategies, strategy).__new__(getattr(strategies, strategy)))
    with pytest.raises(ValueError, match=rf"does not support {strategy}: it shards parameters"):
        cb.setup(fake, Module(), "fit")  # type: ignore[arg-type]

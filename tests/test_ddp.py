"""Two CPU processes (gloo, ddp_spawn): every rank takes the same pruning decision and keeps equal weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from ssl_lightning import StructuredSparsity

from .conftest import Module, loader, trainer


class DigestPerRank(Callback):
    """At the end of training each rank gathers every rank's mask and weight digests and saves them."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        ssl = next(c for c in trainer.callbacks if isinstance(c, StructuredSparsity))
        masks = torch.cat([m.flatten().float() for _, m in sorted(ssl.masks.items())])
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        digest = torch.stack(
            [masks.sum(), torch.tensor(float(masks.numel())), (masks * torch.arange(len(masks))).sum(), weights.sum()]
        )
        gathered = trainer.strategy.all_gather(digest)  # [world, 4]
        torch.save({"gathered": gathered, "pruned": ssl._pruned}, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo ddp_spawn test runs on Linux")
def test_ddp_ranks_take_identical_decisions(tmp_path: Path) -> None:
    cb = StructuredSparsity({"filter": 0.2, "shape": 0.2}, phases={"ssl": [0, 2], "finetune": [2, None]})
    t = trainer(
        tmp_path, max_epochs=3, callbacks=[cb, DigestPerRank(tmp_path)], strategy="ddp_spawn", devices=2, num_nodes=1
    )
    t.fit(Module(), loader(n=64, batch=8))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["pruned"]
        g = saved["gathered"]
        assert g.shape == (2, 4)
        torch.testing.assert_close(g[0], g[1], rtol=0, atol=0)  # same masks, same weights on both ranks
        assert 0 < g[0, 0] < g[0, 1]  # something pruned, something kept

"""Two CPU ranks (gloo) train with SSL, prune, fine-tune and compact at the end; run by ``test_ddp.py``.

    python tests/ddp_job.py OUT_DIR {ddp,ddp_spawn}

Each rank saves ``rank{r}.pt``: its digest of masks and weights (``gathered`` stacks every rank's, so the
ranks can be compared) and the compacted model's output on a fixed input. The process that called
``fit`` (the main process of ddp_spawn; rank 0 of ddp, which runs this script itself) saves ``driver.pt``:
the structure and output of the model it holds after ``fit``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_lightning import CompactConv2d, CompactionCheckpointing, StructuredSparsity
from ssl_lightning.callback import SparsityCallback


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))), 2)
        return self.fc(x.flatten(1))


class Lit(CompactionCheckpointing, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def probe() -> Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class DigestPerRank(pl.Callback):
    """Saves ``rank{r}.pt`` at the end of fit (after compaction) or, with ``at="train_end"``, when training ends
    (before a PSP callback folds its α into the weights)."""

    def __init__(self, out: Path, at: str = "fit_end") -> None:
        self.out, self.at = out, at

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at == "train_end":
            self._save(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # after the compaction
        if self.at == "fit_end":
            self._save(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, SparsityCallback))  # type: ignore[attr-defined]
        masks = torch.cat([m.flatten().float() for _, m in sorted(cb.masks.items())])
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        digest = torch.stack(
            [masks.sum(), torch.tensor(float(masks.numel())), (masks * torch.arange(len(masks))).sum(), weights.sum()]
        )
        with torch.no_grad():
            output = pl_module.eval()(probe())
        saved = {
            # saved, not all-gathered: a collective on a Python tensor just before the spawned rank exits let
            # gloo's worker thread free that tensor during interpreter shutdown (SIGABRT in 1 of ~40 runs)
            "digest": digest,
            "output": output,
            "compacted": [n for n, m in pl_module.named_modules() if isinstance(m, CompactConv2d)],
            "pruned": cb._pruned,
            "world_size": trainer.world_size,
            "alphas": sum(p.numel() for n, p in pl_module.named_parameters() if ".alpha_" in n),
        }
        torch.save(saved, self.out / f"rank{trainer.global_rank}.pt")


def gathered(out: Path, world_size: int = 2) -> torch.Tensor:
    """Every rank's digest (``DigestPerRank``), stacked: world_size x 4."""
    return torch.stack([torch.load(out / f"rank{r}.pt")["digest"] for r in range(world_size)])


class SetAlpha(pl.Callback):
    """Every other PSP α starts at ``low`` (after the dense phase α is trained): with decay, those fall under the
    threshold while the others stay, independently of what the loss on random data defends."""

    def __init__(self, low: float = 0.02) -> None:
        self.low = low

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if ".alpha_" in name:
                    p[1::2] = self.low


def main() -> None:
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    ssl = StructuredSparsity(
        {"filter": 0.6, "shape": 0.6},
        layer_lambdas={"net.conv2": 0.8},
        phases={"dense": [0, 1], "ssl": [1, 3], "finetune": [3, None]},
        compact_at_end="net",
        compact_batch=8,
    )
    trainer = pl.Trainer(
        default_root_dir=out,
        max_epochs=4,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[ssl, DigestPerRank(out)],
    )
    model = Lit()
    trainer.fit(model, DataLoader(data, batch_size=8))
    if trainer.global_rank == 0:  # the main process of ddp_spawn, rank 0 of ddp
        with torch.no_grad():
            output = model.eval()(probe())
        torch.save(
            {
                "output": output,
                "compacted": [n for n, m in model.named_modules() if isinstance(m, CompactConv2d)],
                "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, Tensor)},
            },
            out / "driver.pt",
        )


if __name__ == "__main__":
    main()

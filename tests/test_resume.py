"""Crash and resume: a SIGKILLed training resumed from its last checkpoint ends with the same masks and weights
as an uninterrupted one (built-in data module, shuffling on); a kill while a checkpoint is being written
leaves the previous checkpoint loadable. Each run is a separate process (``resume_job.py``)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("resume_job.py")


def run_job(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(JOB), str(out), *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run_job(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "final.pt")


def assert_same_run(a: dict, b: dict) -> None:
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


@pytest.mark.parametrize(("step", "phase"), [(22, "ssl"), (28, "finetune")])
def test_sigkill_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, uninterrupted: dict, step: int, phase: str
) -> None:
    killed = run_job(tmp_path, "--kill-at-step", str(step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "final.pt").exists()
    resumed = run_job(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = torch.load(tmp_path / "final.pt")
    assert_same_run(uninterrupted, result)
    kept = sum(int(m.sum()) for m in result["masks"].values())
    assert 0 < kept < sum(m.numel() for m in result["masks"].values())  # the run did prune


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(
    tmp_path: Path, uninterrupted: dict
) -> None:
    # writes: epoch 0 file, last.ckpt, epoch 1 file, last.ckpt (4th: killed halfway)
    killed = run_job(tmp_path, "--kill-in-checkpoint-write", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and last["global_step"] == 8  # the previous, complete checkpoint
    resumed = run_job(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, torch.load(tmp_path / "final.pt"))


def test_training_order_changes_every_epoch_and_is_a_function_of_seed_and_epoch(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import TensorDataset

    from ssl_lightning.data.sampling import EpochShuffleSampler, train_loader

    data = TensorDataset(torch.arange(12.0).view(12, 1), torch.zeros(12, dtype=torch.long))
    seen: list[list[int]] = []

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 2)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(batch[0].flatten().int().tolist())
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.0)

    pl.Trainer(default_root_dir=tmp_path, max_epochs=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(Recorder(), train_loader(data, 12, seed=4))  # fmt: skip
    assert len(seen) == 3 and all(sorted(order) == list(range(12)) for order in seen)
    assert seen[0] != seen[1] != seen[2]  # Lightning called set_epoch: a new order each epoch
    sampler = EpochShuffleSampler(12, seed=4)
    for epoch, order in enumerate(seen):
        sampler.set_epoch(epoch)
        assert list(sampler) == order  # the order is a function of (seed, epoch) alone


def test_the_order_is_pytorchs_shuffled_loader_order_at_every_epoch_even_after_a_jump() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from ssl_lightning.data.sampling import EpochShuffleSampler

    data = TensorDataset(torch.arange(50))
    reference = DataLoader(data, 7, shuffle=True, generator=torch.Generator().manual_seed(3))
    orders = [[int(v) for batch in reference for v in batch[0]] for _ in range(5)]
    sampler = EpochShuffleSampler(50, seed=3)
    for epoch in [0, 1, 2, 3, 4, 2, 4]:  # in turn, then back (a resumed run) and forward again
        sampler.set_epoch(epoch)
        assert list(sampler) == orders[epoch]
    keyed = EpochShuffleSampler(50, seed=3, keyed=True)
    keyed.set_epoch(2)
    assert list(keyed) == [i + 100 for i in orders[2]]

"""A compacted model inside a LightningModule: checkpoints rebuild the structure; a resumed fit is identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from ssl_lightning import CompactConv2d, compact
from ssl_lightning.compaction import CHECKPOINT_KEY
from ssl_lightning.models import ImageClassifier, resnet20

from .conftest import loader, trainer


def sparse_resnet() -> nn.Module:
    torch.manual_seed(0)
    m = resnet20(num_classes=4)
    with torch.no_grad():
        m.blocks[1].conv1.weight.zero_()  # a whole residual branch
        m.blocks[1].conv2.weight.zero_()
        m.blocks[0].conv1.weight[[2, 5]] = 0  # filters, coupled with their BN channel
        m.blocks[0].bn1.weight[[2, 5]] = 0
        m.blocks[0].bn1.bias[[2, 5]] = 0
        m.blocks[4].conv2.weight[:, :, :2] = 0  # filter shapes
        half = list(range(1, 16, 2))  # 8 of 16: the default align=8 keeps the other 8
        m.blocks[2].conv1.weight[half] = 0  # filters only (uncoupled): BN shift 0.5 -> constant behind padding
        m.blocks[2].bn1.bias[half] = 0.5
    return m


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *_: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def test_checkpoint_after_compaction_loads_and_resumes_identically(tmp_path: Path) -> None:
    data = loader(n=32, batch=8, shape=(3, 32, 32))  # 4 steps per epoch
    clf = ImageClassifier(sparse_resnet(), num_classes=4, lr=0.05, milestones=[1])
    clf.model = compact(clf.model, torch.randn(2, 3, 32, 32), measure=False)
    assert any(isinstance(m, CompactConv2d) for m in clf.modules())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = Losses()
    trainer(tmp_path, max_epochs=2, callbacks=[full, ckpt], enable_checkpointing=True).fit(clf, data)
    assert len(full.losses) == 8
    path = tmp_path / "ckpt" / "epoch=0.ckpt"

    raw = torch.load(path, weights_only=True)  # plain data only: the plan is JSON-like
    assert set(raw[CHECKPOINT_KEY]) == {"model"} and raw[CHECKPOINT_KEY]["model"]["depth"]

    loaded = ImageClassifier.load_from_checkpoint(path, model=resnet20(num_classes=4))  # dense model, rebuilt
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in clf.parameters())
    assert "model.blocks.1.conv1.weight" not in loaded.state_dict()

    resumed = Losses()
    fresh = ImageClassifier(resnet20(num_classes=4), num_classes=4, lr=0.05, milestones=[1])
    trainer(tmp_path / "resume", max_epochs=2, callbacks=[resumed]).fit(fresh, data, ckpt_path=path)
    assert len(resumed.losses) == 4
    # Same weights, momentum buffers and LR schedule (milestone at epoch 1): the next steps are identical.
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), rtol=1e-6, atol=1e-6)


def test_compacted_model_runs_under_torch_compile_and_export() -> None:
    model = sparse_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    fast = compact(model, x, measure=False)  # depth-removed block, sliced channels, padded fold, fused op
    assert type(fast.blocks[2].conv2).__name__ == "PaddedFoldConv2d"
    with torch.no_grad():
        want = fast(x)
        got = torch.compile(fast, fullgraph=True)(x)  # inductor; the custom op runs through its fake kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in exported.graph.nodes}
    assert "ssl_lightning.compact_conv2d.default" in targets  # the fused op stays one node in the program
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-6, atol=1e-6)

    plain = compact(model, x, measure=False, shapes=False)  # for exporters without the custom op (ONNX)
    program = torch.export.export(plain, (x,))
    assert not any("ssl_lightning" in str(n.target) for n in program.graph.nodes)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())  # depth cut


def test_callback_compacts_at_fit_end_and_logs_the_report(tmp_path: Path) -> None:
    import csv

    import pytest
    from lightning.pytorch.loggers import CSVLogger

    from ssl_lightning import StructuredSparsity

    from .conftest import SmallNet

    torch.manual_seed(0)
    clf = ImageClassifier(SmallNet(), num_classes=4, lr=0.05, weight_decay=0.0)
    cb = StructuredSparsity(
        {"filter": 1.0, "neuron_out": 1.0},
        phases={"ssl": [0, 3], "finetune": [3, None]},
        compact_at_end="model",
        compact_align=1,  # exact channel counts: SmallNet has only 8-16 per layer
    )
    dense_params = sum(p.numel() for p in clf.parameters())
    logger = CSVLogger(tmp_path, name="run")
    trainer(tmp_path, max_epochs=4, callbacks=[cb], logger=logger).fit(clf, loader(n=64, batch=16))
    report = cb.compaction
    assert report is not None and report.params_compact < report.params
    assert sum(p.numel() for p in clf.parameters()) == report.params_compact < dense_params
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("compaction/speedup")]
    assert logged and float(logged[-1]["compaction/params"]) == report.params_compact
    assert "| **model** |" in report.to_markdown()

    with pytest.raises(ValueError, match=r"compact_at_end='net' is not a submodule of ImageClassifier; its children"):
        trainer(tmp_path, max_epochs=1, callbacks=[StructuredSparsity({"filter": 0.1}, compact_at_end="net")]).fit(
            ImageClassifier(SmallNet(), num_classes=4), loader()
        )
    with pytest.raises(ValueError, match=r"compact_at_end must be the name of a submodule"):
        StructuredSparsity({"filter": 0.1}, compact_at_end="")


def test_compaction_at_the_prune_boundary_carries_optimizer_state_and_resumes(tmp_path: Path) -> None:
    import pytest

    from ssl_lightning import StructuredSparsity

    from .conftest import SmallNet

    def build() -> ImageClassifier:
        torch.manual_seed(0)
        return ImageClassifier(SmallNet(), num_classes=4, lr=0.05, weight_decay=0.0, milestones=[3])

    def callback() -> StructuredSparsity:
        return StructuredSparsity(
            {"filter": 3.0, "neuron_out": 3.0},
            phases={"ssl": [0, 2], "finetune": [2, None]},
            compact_at_end="model",
            compact_when="prune",
            compact_align=1,
        )

    data = loader(n=64, batch=16)  # 4 steps per epoch
    clf, cb, full = build(), callback(), Losses()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    t = trainer(tmp_path, max_epochs=4, callbacks=[cb, full, ckpt], enable_checkpointing=True)
    t.fit(clf, data)
    report = cb.compaction
    assert report is not None and report.params_compact < report.params  # compacted when fine-tuning began
    assert sum(p.numel() for p in clf.parameters()) == report.params_compact
    (opt,) = t.optimizers
    optimized = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in clf.parameters()}  # the optimizer follows the new model
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in optimized)
    assert len(full.losses) == 16 and all(torch.isfinite(torch.tensor(full.losses)))

    # A checkpoint written after the compaction resumes into identical fine-tuning steps.
    resumed = Losses()
    trainer(tmp_path / "r", max_epochs=4, callbacks=[callback(), resumed]).fit(
        build(), data, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt"
    )
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[12:]), rtol=1e-6, atol=1e-6)

    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"compact_when='prune' swaps modules .* \(DDP, world size 2\)"):
        callback().on_fit_start(SimpleNamespace(world_size=2), build())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"compact_when='prune' needs compact_at_end"):
        StructuredSparsity({"filter": 0.1}, compact_when="prune")
    with pytest.raises(ValueError, match=r"compact_when must be one of 'fit_end', 'prune', got 'later'"):
        StructuredSparsity({"filter": 0.1}, compact_at_end="model", compact_when="later")  # type: ignore[arg-type]

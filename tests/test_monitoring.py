"""The model-level sparsity figures are monitorable (trainer.callback_metrics on every step, ModelCheckpoint,
EarlyStopping, the progress bar), and the prune boundary warns when it removed nothing or a whole layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from ssl_lightning import StructuredSparsity

from .conftest import Module, loader, trainer

PHASES = {"dense": [0, 1], "ssl": [1, 3], "finetune": [3, None]}


def test_model_checkpoint_and_early_stopping_monitor_sparsity_figures(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ssl = StructuredSparsity({"filter": 0.3, "shape": 0.3}, phases=PHASES, prune_threshold=1e-3)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="ssl/total/flops_remaining", mode="min", save_top_k=1)
    stop = EarlyStopping(monitor="ssl/total/shape_sparsity", mode="max", stopping_threshold=0.05, patience=100,
                         check_on_train_epoch_end=True)  # fmt: skip
    t = trainer(tmp_path, max_epochs=20, callbacks=[ssl, best, stop], enable_checkpointing=True)
    t.fit(Module(), loader())
    assert t.current_epoch < 19 and t.should_stop  # stopped once 5 % of the filter shapes were gone
    assert float(t.callback_metrics["ssl/total/shape_sparsity"]) > 0.05
    assert best.best_model_path and float(best.best_model_score) < 1.0  # the sparsest checkpoint is kept
    assert "ssl/total/flops_remaining" in t.progress_bar_metrics
    assert float(t.callback_metrics["ssl/phase"]) in (1.0, 2.0)


def test_the_prune_boundary_warns_when_nothing_or_a_whole_layer_is_pruned(tmp_path: Path) -> None:
    weak = StructuredSparsity({"filter": 1e-6}, phases=PHASES, include=["net.conv1"])
    with pytest.warns(UserWarning, match=r"the sparsity phase ended with nothing pruned \(kept all 216 weights\)"):
        trainer(tmp_path, max_epochs=4, callbacks=[weak]).fit(Module(), loader())
    strong = StructuredSparsity({"element": 50.0}, phases=PHASES, include=["net.conv2"])
    with pytest.warns(UserWarning, match=r"every weight of net.conv2 was pruned"):
        trainer(tmp_path, max_epochs=4, callbacks=[strong]).fit(Module(), loader())


def test_the_callback_arguments_are_hyperparameters_of_every_logger(tmp_path: Path) -> None:
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    ssl = StructuredSparsity({"filter": 0.3}, phases=PHASES, couple=True, include=["net.conv1"])
    csv = CSVLogger(tmp_path / "csv")
    trainer(tmp_path, max_epochs=1, callbacks=[ssl], logger=[csv]).fit(Module(), loader())
    saved = yaml.safe_load(Path(csv.log_dir, "hparams.yaml").read_text())["ssl"]
    assert saved["callback"] == "StructuredSparsity" and saved["lambdas"] == {"filter": 0.3}
    assert saved["couple"] is True and saved["include"] == ["net.conv1"] and saved["phases"]["ssl"] == [1, 3]


def test_tensorboard_gets_scalars_histograms_and_the_chart_and_csv_the_scalars(tmp_path: Path) -> None:
    import csv as csvlib

    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ssl = StructuredSparsity({"filter": 0.3, "shape": 0.3}, phases=PHASES, log_every_n_steps=2)
    tb, csv = TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "csv")
    trainer(tmp_path, max_epochs=2, callbacks=[ssl], logger=[tb, csv]).fit(Module(), loader())
    events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "ssl/total/flops_remaining" in tags["scalars"] and "ssl/total/shape_sparsity" in tags["scalars"]
    assert any(t.startswith("ssl_hist/") for t in tags["histograms"]), tags["histograms"]
    assert "ssl/layer_sparsity" in tags["images"]
    assert "ssl/phase_name/text_summary" in tags["tensors"]  # the phase by name, at each change
    with open(Path(csv.log_dir, "metrics.csv")) as f:
        header = next(csvlib.reader(f))
    assert "ssl/total/flops_remaining" in header and not any(h.startswith("ssl_hist/") for h in header)

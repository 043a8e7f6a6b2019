"""Pruning granularities (Mao et al. 2017): group shapes against brute-force loops, the ℓ1 (element) proximal step,
the pruning schedules, GranularityPruning reaching its targets in a Trainer, and its errors."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from ssl_lightning import GranularityPruning
from ssl_lightning.groups import build_groups
from ssl_lightning.penalty import proximal_step_
from ssl_lightning.schedules import PhaseSchedule, sparsity_target

from .conftest import Module, PlainSGD, loader, trainer

PHASES = {"dense": [0, 1], "ssl": [1, 3], "finetune": [3, None]}


class OneConv(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, (2, 3), groups=groups)
        self.head = nn.Conv2d(6, 2, 1)  # the output layer (no filter groups), so conv gets them

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x))


def brute_force(w: Tensor, kind: str, groups: int) -> list[float]:
    """Group norms by explicit loops, in the documented group order."""
    n, cg, kh, kw = w.shape
    bank = n // groups
    if kind == "element":
        return [
            float(w[i, c, a, b].abs()) for i, c, a, b in itertools.product(range(n), range(cg), range(kh), range(kw))
        ]
    if kind == "vector":
        return [float(w[i, c, a, :].norm()) for i, c, a in itertools.product(range(n), range(cg), range(kh))]
    if kind == "kernel2d":
        return [float(w[i, c].norm()) for i, c in itertools.product(range(n), range(cg))]
    if kind == "filter":
        return [float(w[i].norm()) for i in range(n)]
    if kind == "channel":
        return [float(w[g * bank : (g + 1) * bank, c].norm()) for g, c in itertools.product(range(groups), range(cg))]
    assert kind == "shape"
    return [
        float(w[g * bank : (g + 1) * bank, c, a, b].norm())
        for g, c, a, b in itertools.product(range(groups), range(cg), range(kh), range(kw))
    ]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", ["element", "vector", "kernel2d", "filter", "channel", "shape"])
def test_each_granularity_groups_the_slices_a_brute_force_loop_finds(kind: str, groups: int) -> None:
    torch.manual_seed(0)
    model = OneConv(groups)
    (family,) = [g for g in build_groups(model, {kind: 1.0}, include=["conv"]) if g.modules == ("conv",)]
    torch.testing.assert_close(family.norms(), torch.tensor(brute_force(model.conv.weight.detach(), kind, groups)))


def test_vector_and_element_sizes_and_element_on_linear() -> None:
    model = OneConv()
    (vector,) = build_groups(model, {"vector": 1.0}, include=["conv"])
    assert (vector.num_groups, vector.group_size) == (6 * 4 * 2, 3)  # one kernel row of 3 taps
    lin = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    families = build_groups(lin, {"element": 1.0})
    assert [(g.name, g.num_groups, g.group_size) for g in families] == [("0:element", 15, 1), ("2:element", 6, 1)]


def test_the_element_groups_proximal_step_is_soft_thresholding() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    w = lin.weight.detach().clone()
    groups = build_groups(nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 2)), {"element": 0.5}, include=["0"])
    proximal_step_(groups, 1.0, lambda p: 0.2)  # threshold lr·λ = 0.1
    torch.testing.assert_close(lin.weight.detach(), torch.sign(w) * (w.abs() - 0.1).clamp(min=0))


def test_the_pruning_schedules_at_chosen_steps() -> None:
    s = PhaseSchedule(ssl_start=10, ssl_end=20, unit="step")
    gradual = [sparsity_target(s, t, 0.8, "gradual") for t in (0, 9, 10, 12, 15, 19, 20, 30)]
    # s(t) = 0.8·(1 − (1 − (t − 10)/10)³)
    assert gradual == pytest.approx([0, 0, 0, 0.8 * (1 - 0.8**3), 0.8 * (1 - 0.5**3), 0.8 * (1 - 0.1**3), 0.8, 0.8])
    every_5 = [sparsity_target(s, t, 0.8, "gradual", frequency=5) for t in (10, 14, 15, 19)]
    assert every_5 == pytest.approx([0, 0, 0.8 * (1 - 0.5**3), 0.8 * (1 - 0.5**3)])
    iterative = [sparsity_target(s, t, 0.75, "iterative", cycles=2) for t in (9, 10, 14, 15, 19, 20)]
    assert iterative == pytest.approx([0, 0.5, 0.5, 0.75, 0.75, 0.75])  # half of what is left, twice
    assert [sparsity_target(s, t, 0.6, "one_shot") for t in (10, 19, 20)] == [0, 0, 0.6]


class Counts(Callback):
    """Pruned (all-zero) groups of conv2 per granularity family, after every step."""

    def __init__(self) -> None:
        self.pruned: list[int] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, GranularityPruning))
        g = next(g for g in cb.groups if g.modules == ("net.conv2",))
        self.pruned.append(int((g.norms() == 0).sum()))


@pytest.mark.parametrize(
    ("granularity", "groups"), [("element", 288), ("vector", 96), ("kernel", 32), ("filter", 8), ("shape", 72)]
)
def test_one_shot_pruning_reaches_the_target_per_layer_within_one_group(
    tmp_path: Path, granularity: str, groups: int
) -> None:
    torch.manual_seed(0)
    cb = GranularityPruning(granularity, 0.6, phases=PHASES, include=["net.conv1", "net.conv2"])
    counts = Counts()
    trainer(tmp_path, max_epochs=4, callbacks=[cb, counts]).fit(PlainSGD(), loader())  # 4 steps per epoch
    assert counts.pruned[:12] == [0] * 12  # nothing before the boundary (epoch 3)
    assert counts.pruned[12:] == [round(0.6 * groups)] * 4  # then the target, frozen while fine-tuning


def test_gradual_pruning_grows_monotonically_keeps_what_it_pruned_and_ends_at_the_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cb = GranularityPruning(
        "kernel", 0.75, schedule="gradual", unit="step", phases={"ssl": [0, 8], "finetune": [8, None]},
        include=["net.conv2"],
    )  # fmt: skip
    counts = Counts()
    seen: list[Tensor] = []

    class Zeros(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append((pl_module.net.conv2.weight.detach().flatten(2) == 0).all(dim=2))

    trainer(tmp_path, max_steps=12, callbacks=[cb, counts, Zeros()]).fit(PlainSGD(), loader())
    expected = [round(32 * sparsity_target(cb.schedule, t, 0.75, "gradual")) for t in range(12)]
    assert counts.pruned == expected and expected[-1] == 24 and expected[1] > 0
    for before, after in itertools.pairwise(seen):
        assert not (before & ~after).any()  # a pruned kernel never comes back


def test_global_scope_ranks_all_layers_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PlainSGD(lr=0.0)  # the weights stay as set: the ranking is known
    with torch.no_grad():
        module.net.conv1.weight.mul_(0.01)  # conv1's kernels are the least important of all
    cb = GranularityPruning("kernel", 0.25, scope="global", phases=PHASES, include=["net.conv1", "net.conv2"])
    trainer(tmp_path, max_epochs=4, callbacks=[cb]).fit(module, loader())
    conv1 = (module.net.conv1.weight.flatten(2) == 0).all(dim=2)
    conv2 = (module.net.conv2.weight.flatten(2) == 0).all(dim=2)
    assert int(conv1.sum()) + int(conv2.sum()) == round(0.25 * (24 + 32))  # 14 kernels over both layers
    assert int(conv1.sum()) == 14 and int(conv2.sum()) == 0


def test_layer_sparsity_overrides_the_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PlainSGD()
    cb = GranularityPruning(
        "filter", 0.5, layer_sparsity={"net.conv2": 0.25}, phases=PHASES, include=["net.conv1", "net.conv2"]
    )
    trainer(tmp_path, max_epochs=4, callbacks=[cb]).fit(module, loader())
    assert int((module.net.conv1.weight.flatten(1) == 0).all(dim=1).sum()) == 4
    assert int((module.net.conv2.weight.flatten(1) == 0).all(dim=1).sum()) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"granularity": "block"},
            r"granularity must be one of 'element', 'vector', 'kernel', 'filter', 'channel', 'shape', got 'block'",
        ),
        ({"sparsity": 1.0}, r"sparsity must be a fraction in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"sparsity must be a finite number >= 0, got -0.1"),
        ({"layer_sparsity": {"conv1": 1.5}}, r"layer_sparsity\['conv1'\] must be a fraction in \[0, 1\), got 1.5"),
        ({"schedule": "cosine"}, r"schedule must be one of 'one_shot', 'iterative', 'gradual', got 'cosine'"),
        ({"scope": "model"}, r"scope must be one of 'layer', 'global', got 'model'"),
        ({"cycles": 0}, r"cycles must be an int >= 1, got 0"),
        ({"index_bits": 0}, r"index_bits must be an int >= 1, got 0"),
        ({"phases": {"ssl": [0, None]}}, r"phases must give the pruning window as an 'ssl' interval with an end"),
        ({"phases": {"ssl": [5, 2]}}, r"phases\['ssl'\]: end must be None or an int > start, got \[5, 2\]"),
    ],
)
def test_init_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"granularity": "kernel", "sparsity": 0.5, "phases": PHASES, **kwargs}
    with pytest.raises(ValueError, match=match):
        GranularityPruning(**args)


def test_a_granularity_the_selected_layers_do_not_have_names_the_argument(tmp_path: Path) -> None:
    cb = GranularityPruning("vector", 0.5, phases=PHASES, include=["net.fc1"])
    with pytest.raises(ValueError, match=r"granularity 'vector' needs nn.Conv2d layers, but none of the selected"):
        trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(Module(), loader())


def test_index_storage_counts_fillers_like_deep_compression() -> None:
    from ssl_lightning.report import index_storage

    keep = torch.zeros(30, dtype=torch.bool)
    keep[[0, 11, 12, 29]] = True  # distances 1, 11, 1, 17
    # 3-bit indices reach 8 positions: distance 11 needs one filler (at +8), 17 needs two (+8, +16)
    assert index_storage(keep, 3) == (4 + 3, 3)
    assert index_storage(keep, 4) == (4 + 1, 1)  # 4 bits reach 16: only 17 needs a filler
    assert index_storage(keep, 5) == (4, 0)
    assert index_storage(torch.zeros(5, dtype=torch.bool), 2) == (0, 0)
    with pytest.raises(ValueError, match=r"index_bits must be an int >= 1, got 0"):
        index_storage(keep, 0)


def test_storage_report_against_a_hand_computed_layer() -> None:
    from ssl_lightning.report import storage_report

    conv = nn.Conv2d(2, 3, 3, bias=False)  # 3 filters x 2 channels x 3 x 3 = 54 weights, 6 kernels
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0  # kernel 0
        conv.weight[2, 1, 0, 2] = 2.0  # kernel 5
    model = nn.Sequential(conv)
    (kernel,) = storage_report(model, "kernel", value_bits=8, index_bits=2)
    # kernels 0 and 5 kept: distances 1 and 5; 2-bit indices reach 4 -> one filler; 3 entries of 9 values
    assert (kernel.groups, kernel.groups_kept, kernel.fillers) == (6, 2, 1)
    assert (kernel.value_bits_total, kernel.index_bits_total, kernel.dense_bits) == (3 * 9 * 8, 3 * 2, 54 * 8)
    assert kernel.compression == pytest.approx(432 / 222) and kernel.bytes_read == 222 / 8
    (element,) = storage_report(model, "element", value_bits=8, index_bits=2)
    # weights 4 and 47 kept: distances 5 (one filler) and 43 (ten fillers: every 4 positions)
    assert (element.groups_kept, element.fillers, element.stored_bits) == (2, 11, 13 * (8 + 2))
    with torch.no_grad():  # the same two kernels, now dense: coarse groups save the per-weight indices
        conv.weight[0, 0].fill_(1.0)
        conv.weight[2, 1].fill_(2.0)
    (dense_kernels,) = storage_report(model, "kernel", value_bits=8, index_bits=2)
    (dense_elements,) = storage_report(model, "element", value_bits=8, index_bits=2)
    assert dense_kernels.stored_bits == 222  # as above
    assert dense_elements.stored_bits == (18 + 9) * (8 + 2)  # 9 fillers bridge the 36 zeros between the kernels
    (filt,) = storage_report(model, "filter")
    assert (filt.groups, filt.groups_kept, filt.group_size) == (3, 2, 18)
    with pytest.raises(ValueError, match=r"granularity must be one of 'element', 'vector'"):
        storage_report(model, "row")


def test_logs_targets_and_storage_of_its_granularity(tmp_path: Path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from ssl_lightning.report import storage_report

    torch.manual_seed(0)
    module = PlainSGD()
    logger = CSVLogger(tmp_path)
    cb = GranularityPruning("kernel", 0.5, phases=PHASES, include=["net.conv2"], index_bits=3, log_every_n_steps=4)
    trainer(tmp_path, max_epochs=4, callbacks=[cb], logger=logger).fit(module, loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        last = {k: float(v) for k, v in list(csv.DictReader(f))[-1].items() if v != ""}
    (expected,) = storage_report(module, "kernel", index_bits=3, layers=["net.conv2"])
    assert last["granularity/net.conv2/compression"] == pytest.approx(expected.compression)
    assert last["granularity/total/bytes_read"] == pytest.approx(expected.bytes_read)
    assert last["granularity/net.conv2/kernel2d_target"] == 0.5 and last["granularity/total/kernel2d_sparsity"] == 0.5


def test_sparsity_report_stores_each_weight_in_its_cheapest_encoding() -> None:
    from ssl_lightning import sparsity_report
    from ssl_lightning.report import storage_report

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    with torch.no_grad():
        model[0].weight[:, 1:].zero_()  # three of four input channels gone: channel / shape encodings win
        model[3].weight[:, ::10] = 0.0
    report = sparsity_report(model, torch.randn(1, 4, 6, 6))
    conv, lin = report.layers
    candidates = {g: storage_report(model, g, layers=["0"])[0].stored_bits for g in
                  ("element", "vector", "kernel", "filter", "channel", "shape")}  # fmt: skip
    assert conv.stored_bits == min(candidates.values()) and conv.encoding == min(candidates, key=candidates.get)
    assert conv.encoding in ("channel", "kernel") and conv.compression > 3
    assert lin.encoding == "dense" and lin.stored_bits == lin.weight_bits  # 90 % dense: indices would cost more
    metrics = report.metrics("ssl")
    assert metrics["ssl/0/compression"] == pytest.approx(conv.compression)
    assert metrics["ssl/total/stored_bytes"] == (conv.stored_bits + lin.stored_bits) / 8

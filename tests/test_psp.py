"""ParameterizedPruning (PSP): α per structure, its own weight decay, the threshold gate with comeback, pruning,
folding back into a plain model, resume, DDP and misconfiguration."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_lightning import ParameterizedPruning, StructuredSparsity
from ssl_lightning.callback import OWNED_DECAY_KEY

from .conftest import Module, PlainSGD, loader, trainer

sys.path.insert(0, str(Path(__file__).parent))
from ddp_job import DigestPerRank, SetAlpha, gathered

PHASES = {"dense": [0, 1], "ssl": [1, 3], "finetune": [3, None]}


class Snapshot(Callback):
    """Every named parameter (α included, before folding) after each optimizer step and at the end of training."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []
        self.at_train_end: dict[str, Tensor] = {}
        self.output: Tensor | None = None
        self.probe = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(7))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_train_end = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        with torch.no_grad():
            self.output = pl_module.eval()(self.probe)
        pl_module.train()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"structures": {}}, r"structures must be a non-empty mapping of structure type -> α weight decay"),
        ({"structures": {"row": 0.1}}, r"structures: unknown structure type 'row'; allowed: filter, channel"),
        ({"structures": {"depth": 0.1}}, r"structures: unknown structure type 'depth' \(depth needs a branch-output"),
        (
            {"structures": {"channel": -1e-3}},
            r"structures\['channel'\] \(the weight decay of its α\) must be a finite number >= 0, got -0.001",
        ),
        ({"threshold": 0.0}, r"threshold must be a finite number > 0, got 0.0"),
        ({"threshold": -0.1}, r"threshold must be a finite number > 0, got -0.1"),
        ({"decay_schedule": "cosine"}, r"decay_schedule must be one of 'constant', 'warmup', 'ramp', got 'cosine'"),
        ({"decay_schedule": "ramp"}, r"decay_schedule='ramp' needs an SSL phase with an end"),
        ({"unit": "batch"}, r"unit must be one of 'epoch', 'step', got 'batch'"),
    ],
)
def test_init_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("structures", {"channel": 1e-2})
    with pytest.raises(ValueError, match=match):
        ParameterizedPruning(**kwargs)


def test_a_structure_type_with_no_such_layer_names_the_argument(tmp_path: Path) -> None:
    cb = ParameterizedPruning({"neuron_in": 0.1}, include=["net.conv1", "net.conv2"])
    with pytest.raises(ValueError, match=r"structures: structure type 'neuron_in' needs nn.Linear layers"):
        trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(Module(), loader())


@pytest.mark.filterwarnings("ignore:ParameterizedPruning. the filter")
def test_the_model_is_unchanged_at_the_start_and_alpha_has_one_entry_per_structure(tmp_path: Path) -> None:
    module = Module()
    x = torch.randn(4, 3, 8, 8)
    before = module.eval()(x)
    cb = ParameterizedPruning({"filter": 0.1, "channel": 0.1, "shape": 0.1, "kernel2d": 0.1, "neuron_out": 0.1})
    cb.setup(trainer(tmp_path), module, "fit")
    torch.testing.assert_close(module(x), before, rtol=0, atol=0)
    sizes = {n.split("parametrizations.")[0] + n.rsplit("_", 1)[1]: p.numel() for n, p in module.named_parameters()
             if "alpha" in n}  # fmt: skip
    # conv2 has 2 conv groups of 4 input channels: channel/shape structures are per group bank
    assert sizes == {
        "net.conv1.filter": 8,
        "net.conv1.channel": 3,
        "net.conv1.shape": 27,
        "net.conv1.kernel2d": 24,
        "net.conv2.filter": 8,
        "net.conv2.channel": 8,
        "net.conv2.shape": 72,
        "net.conv2.kernel2d": 32,
        "net.fc1.out": 16,
    }  # fmt: skip  (fc2 produces the outputs: no neuron_out structures)


def test_alpha_gets_exactly_its_own_weight_decay_and_the_weights_only_the_users(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, decay, lr, user_decay = Module(), 0.3, 0.05, 1e-4  # Module: SGD(lr 0.05, momentum 0.9, wd 1e-4)
    twin = copy.deepcopy(module.net)
    snap = Snapshot()
    cb = ParameterizedPruning({"channel": decay, "neuron_in": decay})
    trainer(tmp_path, max_steps=1, callbacks=[cb, snap]).fit(module, loader())

    # hand-written oracle: W_eff = W ⊙ α over input channels (per conv-group bank) / input features
    x, y = next(iter(loader()))
    params = {n: p.detach().clone().requires_grad_() for n, p in twin.named_parameters()}
    alphas = {"conv1": torch.ones(3), "conv2": torch.ones(8), "fc1": torch.ones(128), "fc2": torch.ones(16)}
    alphas = {k: a.requires_grad_() for k, a in alphas.items()}
    eff = dict(params)
    eff["conv1.weight"] = params["conv1.weight"] * alphas["conv1"].view(1, 3, 1, 1)
    w2 = params["conv2.weight"].view(2, 4, 4, 9) * alphas["conv2"].view(2, 1, 4, 1)  # [bank, out, in, taps]
    eff["conv2.weight"] = w2.reshape(8, 4, 3, 3)
    eff["fc1.weight"] = params["fc1.weight"] * alphas["fc1"]
    eff["fc2.weight"] = params["fc2.weight"] * alphas["fc2"]
    loss = F.cross_entropy(torch.func.functional_call(twin, eff, (x,)), y)
    loss.backward()
    # first SGD step with momentum: the buffer is the (decayed) gradient itself
    after = snap.steps[0]
    for name, p in params.items():
        parametrized = name.endswith(".weight") and not name.startswith("bn")  # the weights α scale
        key = f"net.{name.removesuffix('.weight')}.parametrizations.weight.original" if parametrized else f"net.{name}"
        expected = p.detach() - lr * (p.grad + user_decay * p.detach())
        torch.testing.assert_close(after[key], expected, msg=name)
    for layer, a in alphas.items():
        kind = "channel" if layer.startswith("conv") else "neuron_in"
        expected = 1.0 - lr * (a.grad + decay * 1.0)  # α's own decay, not the user's 1e-4
        torch.testing.assert_close(after[f"net.{layer}.parametrizations.weight.0.alpha_{kind}"], expected, msg=layer)
    opt = module.trainer.optimizers[0]  # type: ignore[union-attr]
    assert [g.get(OWNED_DECAY_KEY) for g in opt.param_groups] == [None, decay]  # α only in its own group


class Regression(pl.LightningModule):
    """y = 3·x0 + x1 through Linear(2, 1) starting at w = [1, 1]: the loss wants input 0 used more."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.fill_(1.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.lin(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.005)


def regression_data(n: int = 64) -> DataLoader:
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, (3 * x[:, :1] + x[:, 1:])), batch_size=8)


def test_a_structure_under_the_threshold_is_zero_and_comes_back_when_alpha_grows(tmp_path: Path) -> None:
    seen: list[tuple[float, float]] = []  # (α of input 0, effective weight of input 0) before each step

    class Push(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            with torch.no_grad():
                pl_module.lin.parametrizations.weight[0].alpha_neuron_in[0] = 0.01  # under ε = 0.1

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            alpha = pl_module.lin.parametrizations.weight[0].alpha_neuron_in
            seen.append((float(alpha[0]), float(pl_module.lin.weight[0, 0].detach())))

    cb = ParameterizedPruning({"neuron_in": 0.0}, threshold=0.1, unit="step", phases={"ssl": [0, 24], "finetune":
                              [24, None]})  # fmt: skip
    module = Regression()
    trainer(tmp_path, max_steps=32, callbacks=[cb, Push()]).fit(module, regression_data())
    assert seen[0] == (pytest.approx(0.01), 0.0)  # gated: exactly zero in the forward pass
    gated = [s for s in seen if s[0] < 0.1]
    assert len(gated) >= 2 and all(w == 0.0 for _, w in gated)
    assert [a for a, _ in seen[: len(gated)]] == sorted(a for a, _ in seen[: len(gated)])  # α climbs while gated
    back = seen[len(gated)]
    assert back[0] >= 0.1 and back[1] != 0.0  # it came back before the prune boundary (step 24)
    assert bool(cb.masks["lin.weight"][0, 0])  # and survived pruning
    assert float(module.lin.weight[0, 0]) > 0.5  # folded: the model uses input 0 again


def test_pruning_masks_weights_and_alpha_and_folding_gives_the_same_outputs_and_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PlainSGD()
    keys = list(module.state_dict())
    snap = Snapshot()
    cb = ParameterizedPruning({"channel": 5.0, "neuron_in": 5.0}, phases=PHASES)  # α ×0.75 per step
    trainer(tmp_path, max_epochs=5, callbacks=[cb, SetAlpha(), snap]).fit(module, loader())
    assert list(module.state_dict()) == keys  # plain model, original keys in their original order
    assert not any("alpha" in n for n, _ in module.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(snap.probe), snap.output, rtol=0, atol=0)
    w1 = module.net.conv1.weight
    dead = (w1 == 0).all(dim=(0, 2, 3))
    pruned_alpha = snap.at_train_end["net.conv1.parametrizations.weight.0.alpha_channel"] == 0
    assert torch.equal(pruned_alpha, torch.tensor([False, True, False]))  # the α that started at 0.02
    assert torch.equal(dead, pruned_alpha)  # pruned channels: α = 0 and exact zeros in the folded weight
    fc1_dead = (module.net.fc1.weight == 0).all(dim=0)
    assert int(fc1_dead.sum()) == 64 and not fc1_dead[0::2].any()
    assert all(g["params"] == [] for g in module.trainer.optimizers[0].param_groups if OWNED_DECAY_KEY in g)  # type: ignore[union-attr]


def test_alpha_is_frozen_at_one_in_the_dense_phase_and_pruned_alpha_stays_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    snap = Snapshot()
    cb = ParameterizedPruning({"channel": 5.0}, phases=PHASES)
    trainer(tmp_path, max_epochs=5, callbacks=[cb, SetAlpha(), snap]).fit(PlainSGD(), loader())  # 4 steps/epoch
    name = "net.conv2.parametrizations.weight.0.alpha_channel"
    start = torch.tensor([1.0, 0.02] * 4)
    assert all(torch.equal(s[name], start) for s in snap.steps[:4])  # dense phase: untouched
    assert (snap.steps[4][name] < start).all()
    finetune = [s[name] for s in snap.steps[12:]]
    zero = finetune[0] == 0
    assert zero.any() and all(torch.equal(a[zero], torch.zeros(int(zero.sum()))) for a in finetune)


def test_alpha_follows_the_lr_schedule_of_its_weights(tmp_path: Path) -> None:
    class Scheduled(Module):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)}

    torch.manual_seed(0)
    cb = ParameterizedPruning({"channel": 0.1})
    module = Scheduled()
    trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(module, loader())
    groups = module.trainer.optimizers[0].param_groups  # type: ignore[union-attr]
    assert [g["lr"] for g in groups] == pytest.approx([0.05 * 0.5**3] * 2)


def test_resume_from_a_mid_psp_checkpoint_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    def run(root: Path, epochs: int, ckpt: str | None = None) -> tuple[Module, ParameterizedPruning]:
        torch.manual_seed(0)
        module = Module()  # momentum SGD: the resumed α momenta matter
        cb = ParameterizedPruning({"channel": 5.0, "neuron_in": 5.0}, phases=PHASES)
        saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
        callbacks = [cb, saver] if ckpt else [cb, SetAlpha(), saver]  # (a resumed run restores α)
        trainer(root, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True).fit(
            module, loader(), ckpt_path=ckpt
        )
        return module, cb

    full, full_cb = run(tmp_path / "a", 5)
    run(tmp_path / "b", 2)  # stops in the middle of the PSP phase (epochs 1-2)
    ckpt = tmp_path / "b" / "ckpt" / "epoch=1-step=8.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert any("alpha_channel" in k for k in saved["state_dict"])
    resumed, resumed_cb = run(tmp_path / "b", 5, str(ckpt))
    assert full_cb.masks.keys() == resumed_cb.masks.keys() and full_cb.masks
    for k in full_cb.masks:
        assert torch.equal(full_cb.masks[k], resumed_cb.masks[k]), k
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_ddp_ranks_hold_identical_alpha_masks_and_weights(tmp_path: Path) -> None:
    if sys.platform != "linux":
        pytest.skip("gloo multi-process tests run on Linux")
    cb = ParameterizedPruning({"channel": 5.0, "neuron_in": 5.0}, phases={"ssl": [0, 2], "finetune": [2, None]})
    digest = DigestPerRank(tmp_path, at="train_end")  # before folding: α are still parameters
    t = trainer(tmp_path, max_epochs=3, callbacks=[cb, SetAlpha(), digest], strategy="ddp_spawn", devices=2,
                num_nodes=1)  # fmt: skip
    t.fit(PlainSGD(), loader(n=64, batch=8))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["pruned"] and saved["alphas"] > 0
    g = gathered(tmp_path)
    torch.testing.assert_close(g[0], g[1], rtol=0, atol=0)  # same masks, α and weights on both ranks
    assert 0 < g[0, 0] < g[0, 1]  # something pruned, something kept


def test_psp_and_ssl_on_the_same_layers_are_refused_and_on_disjoint_layers_allowed(tmp_path: Path) -> None:
    psp = ParameterizedPruning({"channel": 0.1}, include=["net.conv2"])
    ssl = StructuredSparsity({"shape": 0.1, "filter": 0.1}, include=["net.conv2"])
    with pytest.raises(ValueError, match=r"StructuredSparsity and ParameterizedPruning both act on net.conv2.weight"):
        trainer(tmp_path, max_steps=1, callbacks=[psp, ssl]).fit(Module(), loader())
    psp = ParameterizedPruning({"neuron_in": 0.1}, include=["net.fc1"])
    ssl = StructuredSparsity({"shape": 0.1}, include=["net.conv1", "net.conv2"])
    trainer(tmp_path, max_steps=2, callbacks=[psp, ssl]).fit(Module(), loader())


def test_weights_outside_every_optimizer_are_an_error(tmp_path: Path) -> None:
    class Partial(Module):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.net.fc2.parameters(), lr=0.05)

    cb = ParameterizedPruning({"channel": 0.1})
    with pytest.raises(ValueError, match=r"net.conv1.weight, net.conv2.weight are regularized but no optimizer "
                       r"updates them, so PSP cannot act on them"):  # fmt: skip
        trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(Partial(), loader())


def test_filter_alpha_before_batchnorm_warns(tmp_path: Path) -> None:
    cb = ParameterizedPruning({"filter": 0.1}, include=["net.conv1"])
    with pytest.warns(UserWarning, match=r"filter / neuron_out α of net.conv1 sit before a BatchNorm"):
        cb.setup(trainer(tmp_path), Module(), "fit")


def test_logs_alpha_figures_and_the_same_sparsity_figures_as_ssl(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cb = ParameterizedPruning({"channel": 5.0}, phases=PHASES, log_every_n_steps=4)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, max_epochs=5, callbacks=[cb, SetAlpha()], logger=logger).fit(PlainSGD(), loader())
    import csv

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = {k: float(v) for k, v in rows[-1].items() if v != ""}
    for key in ("psp/total/alpha_below", "psp/net.conv2/channel_alpha_below", "psp/net.conv2/channel_sparsity",
                "psp/total/channel_sparsity", "psp/total/flops_remaining", "psp/alpha_decay/channel", "psp/phase"):  # fmt: skip
        assert key in last, key
    assert 0 < last["psp/total/channel_sparsity"] < 1


def test_compact_at_end_compacts_the_folded_model(tmp_path: Path) -> None:
    from ssl_lightning import CompactConv2d

    torch.manual_seed(0)
    cb = ParameterizedPruning({"channel": 5.0, "neuron_in": 5.0}, phases=PHASES, compact_at_end="net", compact_align=1)
    module = PlainSGD()
    trainer(tmp_path, max_epochs=5, callbacks=[cb, SetAlpha()]).fit(module, loader())
    assert cb.compaction is not None and cb.compaction.params_compact < cb.compaction.params
    assert module.net.fc1.in_features == 64 or any(isinstance(m, CompactConv2d) for m in module.net.modules())


def test_alpha_histograms_and_figures_reach_wandb_offline_files(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from .conftest import read_wandb_history

    logger = WandbLogger(save_dir=str(tmp_path), project="psp-test", offline=True)
    cb = ParameterizedPruning({"channel": 5.0}, phases=PHASES, log_every_n_steps=4)
    trainer(tmp_path, max_epochs=4, callbacks=[cb, SetAlpha()], logger=logger).fit(PlainSGD(), loader())
    logger.experiment.finish()
    keys = set().union(*read_wandb_history(tmp_path))
    assert {"psp_hist/net.conv2:channel/alpha/_type", "psp/total/alpha_below", "psp/layer_sparsity/_type"} <= keys

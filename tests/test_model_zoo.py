"""The model zoo: 16 networks nobody on the project wrote (transformers vision models from their config classes,
MONAI networks; optional extra ``zoo``, skipped without it), random structured zeros (filters / hidden neurons,
shape columns, every other residual branch; coupled and uncoupled). ``compact`` must succeed, match the
original (rel. 1e-4) and remove what the structure allows. ``benchmarks/model_zoo.py`` prints the full-size
table (docs/model_zoo.md)."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.compaction import compact_with_info
from ssl_lightning.graph import analyze
from tests.zoo import ZOO, zero_branches, zero_structure

# What the zero structure cannot reach, and why (everything else must lose channels).
NO_CHANNELS = {
    "hf-bit": "every conv standardises its weight (WeightStandardizedConv2d) and every norm is a GroupNorm with "
    "its own forward: no groups, channels kept",
    "hf-convnextv2": "GRN divides each hidden channel by the mean over all channels: none can go alone",
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("couple", [False, True], ids=["uncoupled", "coupled"])
@pytest.mark.parametrize("name", list(ZOO))
def test_third_party_network_compacts_exactly_and_loses_what_its_zeros_allow(name: str, couple: bool) -> None:
    pytest.importorskip("transformers" if name.startswith("hf-") else "monai")
    torch.manual_seed(0)
    model, x = ZOO[name](True)
    analysis = analyze(model, (x,))
    zero_structure(model, seed=0, couple=couple)
    zeroed = zero_branches(model, analysis.depth_branches)
    info = compact_with_info(model, x, measure=False, align=1)
    y = torch.randn_like(x)
    with torch.no_grad():
        want, have = model(y), info.model(y)
    torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert len(info.depth) == len(zeroed), info.notes  # every zeroed residual branch is cut out
    params = sum(p.numel() for p in info.model.parameters()) / sum(p.numel() for p in model.parameters())
    if name == "hf-bit":
        assert not info.channels.out_keep and not info.replaced
    elif name == "hf-convnextv2":  # the hidden Linear neurons stay; zero branches still go
        assert not any("pwconv" in n for n in info.channels.out_keep)
    else:
        assert info.channels.out_keep, info.channels.skipped[:5]
        assert params < 0.7


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_coupled_groups_build_and_train_on_transformers_resnet_and_monai_densenet() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("monai")
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch import Tensor
    from torch.utils.data import DataLoader, TensorDataset

    from ssl_lightning import StructuredSparsity

    class Classifier(pl.LightningModule):
        def __init__(self, net: torch.nn.Module, x: Tensor) -> None:
            super().__init__()
            self.net = net
            self.example_input_array = x[:1]

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    for name in ("hf-resnet18", "monai-densenet121"):
        torch.manual_seed(0)
        net, x = ZOO[name](True)
        module = Classifier(net.train(), x)
        data = DataLoader(TensorDataset(x.repeat(3, 1, 1, 1), torch.randint(0, 10, (6,))), batch_size=2)
        cb = StructuredSparsity({"filter": 1e-4}, couple=True)
        trainer = pl.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, data)
        assert trainer.global_step == 3
        coupled = [g for g in cb.groups if len({m.name.rsplit(".", 1)[0] for m in g.members}) > 1]
        assert len(coupled) >= 5, name  # filters tied to their BN channels and consumers
        if name == "monai-densenet121":  # some BN reads its channels at an offset inside a concatenation
            assert any(m.narrow is not None and m.narrow[1] > 0 and ".norm" in m.name for g in coupled
                       for m in g.members)  # fmt: skip

r"""Parameterized Structured Pruning (PSP; Schindler, Roth, Pernkopf, Fröning 2019, arXiv 1906.05180).

Formulation used here. Every structure *s* of a selected weight (a filter, an input channel, a GEMM column, a
2-D kernel, an input / output neuron: the group types of :mod:`ssl_lightning.groups`) gets one learnable scale
α_s, initialised to 1 so the model's function is unchanged. The forward pass uses

    W_eff = W ⊙ Π_types expand(g(α)),   g(α) = α · 1[|α| ≥ ε]

(a :mod:`torch.nn.utils.parametrize` parametrization of the weight). α is trained by the user's optimizer with
the hyperparameters of its weight's parameter group (learning rate, momentum, LR schedule) but with its own weight
decay, applied only in the sparsity phase ("ssl", scaled by the strength schedule); the weights keep exactly the
user's decay. The threshold gate passes gradients straight through (dg/dα = 1): a structure under ε is zero in
the forward pass, yet α still sees the loss gradient of bringing it back, so it returns if the loss wants it
(the paper's "dynamically learn the shape"). Weight decay pulls every α toward 0 and only structures whose loss
gradient resists stay large, which separates important from unimportant structures. At the prune boundary the
structures under ε are pruned for good (weights and α masked and frozen, like SSL's prune); when fit ends α is
folded into the weights (W ← W_eff), leaving a plain model with exact zeros and its original ``state_dict`` keys,
which :func:`~ssl_lightning.compact` turns into a smaller, faster one.

Choosing the decay: a structure the loss does not defend shrinks by (1 − lr·d)^(steps/(1 − momentum)) roughly,
so it crosses ε within the sparsity phase when lr·d·steps/(1 − momentum) ≳ ln(1/ε) (≈ 4.6 for ε = 1e-2).

A filter (or output neuron) directly followed by BatchNorm is scale-invariant: BN(α·z) = BN(z), so its α gets no
loss gradient and decay alone removes it. Parameterize the next layer's input ``channel`` instead (α then sits
after BN and the nonlinearity); the callback warns when it sees the pattern.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize
from typing_extensions import override

from ssl_lightning.callback import SparsityCallback, _check_number
from ssl_lightning.groups import GROUP_TYPES, Group, Selector
from ssl_lightning.methods.base import SparsityMethod
from ssl_lightning.penalty import keep_masks

__all__ = ["PSP", "PSP_TYPES", "ParameterizedPruning", "StructureScale"]

PSP_TYPES: tuple[str, ...] = tuple(t for t in GROUP_TYPES if t != "depth")


class StructureScale(nn.Module):
    """Parametrization ``W -> W ⊙ Π_k expand(g(α_k))`` with one α vector per structure type ``k`` on this weight.

    ``specs``: type -> (view shape of W, broadcast shape of α in that view) from the group's
    :class:`~ssl_lightning.groups.Member`; α_k has prod(keep shape) entries (one per structure).
    """

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], threshold: float) -> None:
        super().__init__()
        self.specs = {k: (tuple(v), tuple(keep)) for k, (v, keep) in specs.items()}
        self.threshold = float(threshold)
        for kind, (_, keep) in self.specs.items():
            self.register_parameter(f"alpha_{kind}", nn.Parameter(torch.ones(math.prod(keep))))

    def alpha(self, kind: str) -> Tensor:
        a = getattr(self, f"alpha_{kind}")
        assert isinstance(a, Tensor)
        return a

    def gate(self, kind: str) -> Tensor:
        """g(α) = α·1[|α| ≥ ε] in value, gradient 1 (straight through)."""
        a = self.alpha(kind)
        return a + (a * (a.abs() >= self.threshold) - a).detach()

    def forward(self, w: Tensor) -> Tensor:
        out = w
        for kind, (view, keep) in self.specs.items():
            out = (out.reshape(view) * self.gate(kind).to(w.dtype).reshape(keep)).reshape(w.shape)
        return out


class PSP(SparsityMethod):
    """The PSP method on the seam: owns the α of every structure (see the module docstring)."""

    name = "psp"
    label = "PSP"

    def __init__(self, threshold: float = 1e-2) -> None:
        self.threshold = threshold
        self._where: dict[str, tuple[str, str, str]] = {}  # group name -> (module path, tensor attr, type)
        self._module: nn.Module | None = None
        self._anchors: dict[int, tuple[Tensor, float]] = {}
        self._order: dict[str, list[str]] = {}

    def _scale(self, module: nn.Module, path: str, attr: str) -> StructureScale:
        scale = getattr(module.get_submodule(path).parametrizations, attr)[0]
        assert isinstance(scale, StructureScale)
        return scale

    def alpha_of(self, group: Group) -> Tensor:
        """The α vector (one entry per structure) of ``group``."""
        assert self._module is not None, "PSP.attach has not run"
        path, attr, kind = self._where[group.name]
        return self._scale(self._module, path, attr).alpha(kind)

    @override
    def attach(self, module: nn.Module, groups: Sequence[Group]) -> None:
        per_tensor: dict[str, dict[str, Any]] = {}
        for g in groups:
            if g.kind not in PSP_TYPES:
                raise ValueError(
                    f"structures: type {g.kind!r} is not parameterized by PSP (allowed: {', '.join(PSP_TYPES)}); a "
                    "depth structure needs a scale on a residual branch's output, use StructuredSparsity(lambdas="
                    "{'depth': ...}) for depth"
                )
            if len(g.members) != 1 or g.members[0].narrow is not None:
                raise ValueError(
                    f"couple=True: PSP parameterizes one weight per structure, but {g.name} spans "
                    f"{', '.join(m.name for m in g.members)}; use couple=False (parameterize the consumer's input "
                    "'channel' to remove a channel with what produces it)"
                )
            m = g.members[0]
            per_tensor.setdefault(m.name, {})[g.kind] = (m.view_shape, m.keep_shape)
        self._module, self._where, self._anchors = module, {}, {}
        self._order = {}  # module path -> its parameter names before attach (fold restores the order)
        for pname, specs in per_tensor.items():
            path, _, attr = pname.rpartition(".")
            owner = module.get_submodule(path)
            if parametrize.is_parametrized(owner, attr):
                scales = getattr(owner.parametrizations, attr)
                if not (len(scales) == 1 and isinstance(scales[0], StructureScale) and scales[0].specs == specs):
                    raise ValueError(
                        f"{pname} already carries a parametrization that is not this PSP's; remove it "
                        "(torch.nn.utils.parametrize.remove_parametrizations) or exclude the layer"
                    )
            else:
                self._order.setdefault(path, list(owner._parameters))
                weight = getattr(owner, attr)
                scale = StructureScale(specs, self.threshold).to(device=weight.device)
                with warnings.catch_warnings():  # parametrize warns about deepcopy of non-leaf tensors: not ours
                    warnings.simplefilter("ignore", UserWarning)
                    parametrize.register_parametrization(owner, attr, scale)
        for g in groups:
            m = g.members[0]
            path, _, attr = m.name.rpartition(".")
            self._where[g.name] = (path, attr, g.kind)
            self._anchors[id(self.alpha_of(g))] = (m.param, g.lam)

    @override
    def owned_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        if self._module is None:
            return {}
        out = {}
        for path, attr, kind in self._where.values():
            if parametrize.is_parametrized(self._module.get_submodule(path), attr):
                prefix = f"{path}.parametrizations.{attr}.0.alpha_{kind}"
                out[prefix] = self._scale(self._module, path, attr).alpha(kind)
        return out

    @override
    def anchors(self) -> dict[int, tuple[Tensor, float]]:
        return self._anchors

    @override
    def finish(self, module: nn.Module) -> None:
        if self._module is None:
            return
        for path, attr in sorted({(p, a) for p, a, _ in self._where.values()}):
            owner = self._module.get_submodule(path)
            if parametrize.is_parametrized(owner, attr):
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
            order = self._order.get(path)
            if order is not None and set(order) == set(owner._parameters):  # the original state_dict key order
                params = dict(owner._parameters)
                owner._parameters.clear()
                owner._parameters.update((k, params[k]) for k in order)

    def _keep(self, group: Group) -> Tensor:
        return self.alpha_of(group).detach().abs() >= self.threshold

    @override
    def prune_masks(self, groups: Sequence[Group], threshold: float) -> dict[str, Tensor]:
        """Structures with |α| < ε: their weights and their α are masked (zero, frozen)."""
        assert self._module is not None
        keeps = [self._keep(g) for g in groups]
        masks = keep_masks(groups, keeps)
        for g, keep in zip(groups, keeps, strict=True):
            path, attr, kind = self._where[g.name]
            masks[f"{path}.parametrizations.{attr}.0.alpha_{kind}"] = keep.clone()
        return masks

    @override
    def zero_groups(self, group: Group) -> Tensor:
        if self._module is None or not self._attached(group):
            return super().zero_groups(group)
        norms = group.norms()
        return ~self._keep(group).to(norms.device) | (norms == 0)

    def _attached(self, group: Group) -> bool:
        path, attr, _ = self._where.get(group.name, ("", "", ""))
        return (
            bool(path)
            and self._module is not None
            and parametrize.is_parametrized(self._module.get_submodule(path), attr)
        )

    @override
    def metrics(self, groups: Sequence[Group], prefix: str, scale: float) -> dict[str, float]:
        out: dict[str, float] = {}
        below = total = 0
        for g in groups:
            if not self._attached(g):
                continue
            a = self.alpha_of(g).detach().abs()
            under = int((a < self.threshold).sum())
            below, total = below + under, total + a.numel()
            layer = g.modules[0]
            out[f"{prefix}/{layer}/{g.kind}_alpha_below"] = under / a.numel()
            out[f"{prefix}/{layer}/{g.kind}_alpha_mean"] = float(a.mean())
            out[f"{prefix}/alpha_decay/{g.kind}"] = g.lam * scale
        if total:
            out[f"{prefix}/total/alpha_below"] = below / total
        return out

    @override
    def histograms(self, groups: Sequence[Group]) -> dict[str, Tensor]:
        return {f"{g.name}/alpha": self.alpha_of(g).detach() for g in groups if self._attached(g)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}  # α live in the model's state_dict, their momenta in the optimizer's


class ParameterizedPruning(SparsityCallback):
    r"""Parameterized Structured Pruning for any LightningModule with Conv2d / Linear layers (see
    :mod:`ssl_lightning.methods.psp` for the formulation).

    Args:
        structures: structure type -> weight decay of its α, types from ``filter, channel, shape, kernel2d,
            neuron_in, neuron_out`` (the group types of ``StructuredSparsity``). No default decay: it depends
            on the run length; a structure the loss does not defend is removed within the sparsity phase when
            lr·decay·steps/(1 − momentum) ≳ ln(1/threshold).
        threshold: ε; structures with |α| < ε are zero in the forward pass and pruned at the end of the sparsity
            phase. Default 1e-2: such a structure contributes under 1 % of its starting scale.
        include, exclude: module selectors (regex fully matching a module name, or a class / class name).
        layer_decay: regex -> decay multiplier, or regex -> {type: decay} per-layer overrides.
        phases: ``{"dense": [0, a], "ssl": [a, b], "finetune": [b, None]}`` on the ``unit`` clock ("ssl" is the
            sparsity-learning phase of every method): α is frozen at 1 in ``dense``, decayed in ``ssl`` and trained
            without decay in ``finetune``; structures under ε are pruned when ``ssl`` ends. Default: PSP from
            the start, never pruned (the gate still zeroes structures under ε).
        unit: ``"epoch"`` or ``"step"``.
        decay_schedule: ``"constant"``, ``"warmup"`` (linear over ``warmup`` units) or ``"ramp"`` (over the
            sparsity phase): multiplier of α's decay.
        finetune_lr_factor, log_every_n_steps, log_histograms, compact_at_end, compact_batch, compact_align: as
            for :class:`~ssl_lightning.StructuredSparsity`. α is folded into the weights when fit ends, before
            compaction; call :meth:`fold` to fold earlier (e.g. after an interrupted fit).
    """

    log_prefix = "psp"
    _strength = "the α decay (structures, layer_decay) or the threshold"

    def __init__(
        self,
        structures: Mapping[str, float],
        *,
        threshold: float = 1e-2,
        include: Sequence[Selector] | None = None,
        exclude: Sequence[Selector] = (),
        layer_decay: Mapping[str, float | Mapping[str, float]] | None = None,
        phases: Mapping[str, Sequence[int | None]] | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        decay_schedule: Literal["constant", "warmup", "ramp"] = "constant",
        warmup: int = 0,
        finetune_lr_factor: float = 1.0,
        log_every_n_steps: int = 50,
        log_histograms: bool = True,
        compact_at_end: str | None = None,
        compact_batch: int = 32,
        compact_align: int | Literal["auto"] = "auto",
    ) -> None:
        if not isinstance(structures, Mapping) or not structures:
            raise ValueError(
                "structures must be a non-empty mapping of structure type -> α weight decay, e.g. "
                f"{{'channel': 1e-2}}, got {structures!r}"
            )
        for kind, decay in structures.items():
            if kind not in PSP_TYPES:
                why = " (depth needs a branch-output scale: use StructuredSparsity)" if kind == "depth" else ""
                raise ValueError(f"structures: unknown structure type {kind!r}{why}; allowed: {', '.join(PSP_TYPES)}")
            _check_number(f"structures[{kind!r}] (the weight decay of its α)", decay)
        _check_number("threshold", threshold, strict=True)
        self._init_shared(
            include=include,
            exclude=exclude,
            layer_lambdas=layer_decay,
            couple=False,
            depth_blocks=None,
            scale_by_group_size=False,
            phases=phases,
            unit=unit,
            lambda_schedule=decay_schedule,
            warmup=warmup,
            prune_threshold=threshold,
            finetune_lr_factor=finetune_lr_factor,
            log_every_n_steps=log_every_n_steps,
            log_histograms=log_histograms,
            compact_at_end=compact_at_end,
            compact_batch=compact_batch,
            compact_align=compact_align,
            compact_when="fit_end",
            schedule_arg="decay_schedule",
        )
        self.structures = dict(structures)
        self.threshold = threshold
        self.sparsity_method: PSP = PSP(threshold)

    def group_spec(self) -> dict[str, float]:
        return self.structures

    def set_strength(self, value: float, ratios: Mapping[str, float] | None = None) -> None:
        self.structures = self._scaled(self.structures, value, ratios, "structures")

    def _build_groups(self, pl_module: LightningModule, spec: Mapping[str, float]) -> list[Group]:
        try:
            return super()._build_groups(pl_module, spec)
        except ValueError as err:  # name this callback's arguments, not group lasso's
            msg = str(err).replace("layer_lambdas", "layer_decay").replace("lambdas", "structures")
            raise ValueError(msg.replace("group type", "structure type")) from None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._warn_scale_invariant(pl_module)

    def _warn_scale_invariant(self, pl_module: LightningModule) -> None:
        layers = {g.modules[0] for g in self.groups if g.kind in ("filter", "neuron_out")}
        if not layers or self._analysis is None:
            return
        modules = dict(pl_module.named_modules())
        hits = sorted(
            p
            for sp in self._analysis.spaces
            for p in sp.producers
            if p in layers and any(isinstance(modules.get(n), nn.modules.batchnorm._BatchNorm) for n in sp.passthrough)
        )
        if hits:
            rank_zero_warn(
                f"ParameterizedPruning: the filter / neuron_out α of {', '.join(hits[:5])} sit before a BatchNorm, "
                "which cancels any scale (BN(α·z) = BN(z)): the loss cannot defend them and weight decay alone "
                "decides. Parameterize the following layer's input 'channel' instead."
            )

    def fold(self, pl_module: LightningModule, trainer: Trainer | None = None) -> None:
        """Fold α into the weights now (W ← W·g(α)): a plain model with its original ``state_dict`` keys and the
        same outputs; the optimizers (of ``trainer``, if given) forget α."""
        self.finish(trainer, pl_module)

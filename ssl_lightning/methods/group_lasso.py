"""Group lasso (Wen et al., 2016): the method of :class:`StructuredSparsity` and that callback.

``"proximal"``: after each optimizer step the group soft-threshold w_g ← w_g·max(0, 1 − lr·λ/‖w_g‖) (exact
zeros). ``"gradient"``: the paper's form, λ·w_g/‖w_g‖ added to the gradient before the step, then weights with
|w| < ``zero_threshold`` are zeroed (the original code's element zero-out).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from ssl_lightning.callback import SparsityCallback, _check_choice, _check_number
from ssl_lightning.groups import GROUP_TYPES, Group, Selector, validate_lambdas
from ssl_lightning.methods.base import SparsityMethod
from ssl_lightning.penalty import add_group_lasso_grad_, group_lasso, proximal_step_, zero_small_

__all__ = ["GroupLasso", "StructuredSparsity"]

FORMS = ("proximal", "gradient")


class GroupLasso(SparsityMethod):
    name = "group_lasso"
    label = "SSL"

    def __init__(self, form: Literal["proximal", "gradient"] = "proximal", zero_threshold: float = 0.0) -> None:
        if form not in FORMS:
            raise ValueError(f"method must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
        self.form, self.zero_threshold = form, zero_threshold

    def before_step(self, groups: Sequence[Group], scale: float) -> None:
        if self.form == "gradient":
            add_group_lasso_grad_(groups, scale)

    def after_step(
        self, groups: Sequence[Group], params: Sequence[Tensor], scale: float, lr_of: Callable[[Tensor], float]
    ) -> None:
        if self.form == "proximal":
            proximal_step_(groups, scale, lr_of)
        zero_small_(params, self.zero_threshold)

    def metrics(self, groups: Sequence[Group], prefix: str, scale: float) -> dict[str, float]:
        return {f"{prefix}/group_lasso": float(group_lasso(groups, 1.0))}


class StructuredSparsity(SparsityCallback):
    r"""Structured Sparsity Learning (Wen et al., 2016) for any LightningModule with Conv2d / Linear layers.

    Args:
        lambdas: group type -> λ, types from ``filter, channel, shape, kernel2d, neuron_in, neuron_out, depth``.
        method: ``"proximal"`` (group soft-threshold after each optimizer step: exact zeros) or
            ``"gradient"`` (the paper: λ·w/‖w_g‖ added to the gradient, then |w| < ``zero_threshold`` → 0).
        include, exclude: module selectors (regex fully matching a module name, or a class / class name).
        layer_lambdas: regex -> λ multiplier, or regex -> {type: λ} per-layer overrides.
        couple: filter / neuron_out groups also span bias, BN channel and consumer input channels (``torch.fx``).
        depth_blocks: module names forming one depth group each (default: residual branches found by ``torch.fx``).
        scale_by_group_size: multiply λ by sqrt(group size).
        phases: ``{"dense": [0, a], "ssl": [a, b], "finetune": [b, None]}`` on the ``unit`` clock; groups are
            pruned (masked, frozen) at the end of ``ssl``. Default: SSL from the start, never pruned.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps).
        lambda_schedule: ``"constant"``, ``"warmup"`` (linear over ``warmup`` units) or ``"ramp"`` (over SSL).
        zero_threshold: element zero-out after each SSL step (default 1e-4 for ``gradient``, off for ``proximal``).
        prune_threshold: groups whose RMS weight ‖w_g‖/sqrt(|g|) is at or below this are pruned.
        finetune_lr_factor: learning rates are multiplied by this once, when fine-tuning starts.
        log_every_n_steps: sparsity figures are sent to the trainer's loggers every this many steps.
        log_histograms: also send group-norm histograms and a per-layer chart when a WandbLogger is attached.
        compact_at_end: name of the LightningModule's submodule (e.g. ``"model"``) to replace by its
            :func:`~ssl_lightning.compact`-ed copy when ``fit`` ends; example inputs are the first
            ``compact_batch`` samples of the first training batch. Parameters, MACs and measured latency,
            dense vs compacted, go to the trainer's loggers (``compaction/...``) and to :attr:`compaction`.
        compact_batch: number of samples used to check and time the compaction.
        compact_align: kept channel counts are rounded up to a multiple of this (1: exact; "auto": exact or
            rounded up to 8 per channel space, measured or modeled), see ``compact``.
        compact_when: ``"fit_end"`` (default) or ``"prune"``: compact at the end of the SSL phase, right after
            pruning, so fine-tuning trains the smaller model; optimizer state (momentum, Adam moments) is carried
            through the compaction plan and LR schedulers keep their state. Needs a ``finetune`` phase.
    """

    _non_finite_fix: ClassVar[dict[str, str]] = {
        **SparsityCallback._non_finite_fix,
        "ssl": "lower the learning rate or λ (lambdas)",
    }

    def __init__(
        self,
        lambdas: Mapping[str, float],
        *,
        method: Literal["proximal", "gradient"] = "proximal",
        include: Sequence[Selector] | None = None,
        exclude: Sequence[Selector] = (),
        layer_lambdas: Mapping[str, float | Mapping[str, float]] | None = None,
        couple: bool = False,
        depth_blocks: Sequence[str] | None = None,
        scale_by_group_size: bool = False,
        phases: Mapping[str, Sequence[int | None]] | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        lambda_schedule: Literal["constant", "warmup", "ramp"] = "constant",
        warmup: int = 0,
        zero_threshold: float | None = None,
        prune_threshold: float = 1e-4,
        finetune_lr_factor: float = 1.0,
        log_every_n_steps: int = 50,
        log_histograms: bool = True,
        compact_at_end: str | None = None,
        compact_batch: int = 32,
        compact_align: int | Literal["auto"] = "auto",
        compact_when: Literal["fit_end", "prune"] = "fit_end",
    ) -> None:
        validate_lambdas(lambdas)
        _check_choice("method", method, FORMS)
        if zero_threshold is not None:
            _check_number("zero_threshold", zero_threshold)
        _check_number("prune_threshold", prune_threshold)
        self._init_shared(
            include=include,
            exclude=exclude,
            layer_lambdas=layer_lambdas,
            couple=couple,
            depth_blocks=depth_blocks,
            scale_by_group_size=scale_by_group_size,
            phases=phases,
            unit=unit,
            lambda_schedule=lambda_schedule,
            warmup=warmup,
            prune_threshold=prune_threshold,
            finetune_lr_factor=finetune_lr_factor,
            log_every_n_steps=log_every_n_steps,
            log_histograms=log_histograms,
            compact_at_end=compact_at_end,
            compact_batch=compact_batch,
            compact_align=compact_align,
            compact_when=compact_when,
        )
        self.lambdas = dict(lambdas)
        self.method = method
        self.zero_threshold = zero_threshold if zero_threshold is not None else (1e-4 if method == "gradient" else 0.0)
        self.sparsity_method = GroupLasso(method, self.zero_threshold)

    def group_spec(self) -> dict[str, float]:
        return self.lambdas

    def set_strength(self, value: float, ratios: Mapping[str, float] | None = None) -> None:
        self.lambdas = self._scaled(self.lambdas, value, ratios, "lambdas")

    def metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """All scalar figures: per-layer structure, per-type zero-group fractions, penalty, λ, phase."""
        out = super().metrics(trainer, pl_module)
        scale = self.lambda_scale(trainer)
        for kind in GROUP_TYPES:
            if kind in self.lambdas:
                out[f"ssl/lambda/{kind}"] = self.lambdas[kind] * scale
        return out

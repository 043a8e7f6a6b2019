"""``StructuredSparsity``: the Lightning glue around groups, the sparsity method (:mod:`ssl_lightning.methods`),
schedules and report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from ssl_lightning.groups import GROUP_TYPES, Group, Selector, build_groups, group_parameters, validate_lambdas
from ssl_lightning.methods import GroupLasso, SparsityMethod
from ssl_lightning.penalty import apply_masks_, group_lasso, mask_grads_
from ssl_lightning.report import CompactionReport, sparsity_report
from ssl_lightning.schedules import LAMBDA_SCHEDULES, PhaseSchedule, lambda_factor

__all__ = ["StructuredSparsity"]

_PHASE_CODE = {"dense": 0, "ssl": 1, "finetune": 2}
_MASK_PREFIX = "ssl_mask_"


def _check_choice(arg: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_number(arg: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):  # type: ignore[operator]
        op = ">" if strict else ">="
        raise ValueError(f"{arg} must be a finite number {op} {minimum:g}, got {value!r}")


def _check_strategy(trainer: Trainer) -> None:
    """Group norms need whole parameters: strategies that shard them (FSDP, DeepSpeed ZeRO-3, tensor / model
    parallel) would give each rank the norms of its own shards and different pruning decisions."""
    name = type(trainer.strategy).__name__
    if any(key in name for key in ("FSDP", "ModelParallel")):
        raise ValueError(
            f"StructuredSparsity does not support {name}: it shards parameters, so group norms (and pruning "
            "decisions) would be computed on shards. Use a single device or strategy='ddp' / 'ddp_spawn' "
            "(Lightning's DDP keeps whole parameters on every rank; multi-node DDP works the same way)."
        )


class StructuredSparsity(Callback):
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
        compact_align: kept channel counts are rounded up to a multiple of this (1: exact), see ``compact``.
        compact_when: ``"fit_end"`` (default) or ``"prune"``: compact at the end of the SSL phase, right after
            pruning, so fine-tuning trains the smaller model; optimizer state (momentum, Adam moments) is carried
            through the compaction plan and LR schedulers keep their state. Needs a ``finetune`` phase.
    """

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
        compact_align: int = 8,
        compact_when: Literal["fit_end", "prune"] = "fit_end",
    ) -> None:
        validate_lambdas(lambdas)
        _check_choice("method", method, ("proximal", "gradient"))
        _check_choice("unit", unit, ("epoch", "step"))
        _check_choice("lambda_schedule", lambda_schedule, LAMBDA_SCHEDULES)
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 ({unit}s), got {warmup!r}")
        if zero_threshold is not None:
            _check_number("zero_threshold", zero_threshold)
        _check_number("prune_threshold", prune_threshold)
        _check_number("finetune_lr_factor", finetune_lr_factor, strict=True)
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        if compact_at_end is not None and (not isinstance(compact_at_end, str) or not compact_at_end):
            raise ValueError(
                f"compact_at_end must be the name of a submodule of the LightningModule (e.g. 'model') or None, "
                f"got {compact_at_end!r}"
            )
        if not isinstance(compact_batch, int) or compact_batch < 1:
            raise ValueError(f"compact_batch must be an int >= 1, got {compact_batch!r}")
        if not isinstance(compact_align, int) or compact_align < 1:
            raise ValueError(f"compact_align must be an int >= 1, got {compact_align!r}")
        _check_choice("compact_when", compact_when, ("fit_end", "prune"))
        self.schedule = PhaseSchedule.from_intervals(phases or {"ssl": [0, None]}, unit=unit)
        if compact_when == "prune" and (compact_at_end is None or self.schedule.ssl_end is None):
            raise ValueError(
                "compact_when='prune' needs compact_at_end (the submodule to compact) and an SSL phase that ends, "
                f"e.g. phases={{'ssl': [0, 10], 'finetune': [10, None]}}; got compact_at_end={compact_at_end!r}, "
                f"phases={phases!r}"
            )
        if lambda_schedule == "ramp" and self.schedule.ssl_end is None:
            raise ValueError("lambda_schedule='ramp' needs an SSL phase with an end, e.g. phases={'ssl': [0, 10]}")
        self.lambdas = dict(lambdas)
        self.method = method
        self.include, self.exclude = include, exclude
        self.layer_lambdas = dict(layer_lambdas or {})
        self.couple, self.depth_blocks, self.scale_by_group_size = couple, depth_blocks, scale_by_group_size
        self.lambda_schedule, self.warmup = lambda_schedule, warmup
        self.zero_threshold = zero_threshold if zero_threshold is not None else (1e-4 if method == "gradient" else 0.0)
        self.sparsity_method: SparsityMethod = GroupLasso(method, self.zero_threshold)
        self.prune_threshold = prune_threshold
        self.finetune_lr_factor = finetune_lr_factor
        self.log_every_n_steps = log_every_n_steps
        self.log_histograms = log_histograms
        self.compact_at_end, self.compact_batch, self.compact_align = compact_at_end, compact_batch, compact_align
        self.compact_when = compact_when
        self.compaction: CompactionReport | None = None  # filled when compact_at_end ran

        self.groups: list[Group] = []
        self._params: dict[str, Tensor] = {}
        self._spatial: dict[str, int] = {}
        self._hooks: list[Any] = []
        self._groups_of: dict[int, list[Group]] = {}  # id(optimizer) -> the groups whose parameters it updates
        self._spatial_hooks: dict[str, Any] = {}
        self._pruned = False
        self._pending_masks: dict[str, Tensor] | None = None
        self._mask_owner: dict[str, tuple[nn.Module, str]] = {}
        self._step_state: tuple[str, float] = ("dense", 0.0)
        self._last_logged = -1

    # ----------------------------------------------------------------- clock
    def clock(self, trainer: Trainer) -> int:
        return trainer.global_step if self.schedule.unit == "step" else trainer.current_epoch

    def phase(self, trainer: Trainer) -> str:
        return self.schedule.phase_at(self.clock(trainer))

    def lambda_scale(self, trainer: Trainer) -> float:
        return lambda_factor(self.schedule, self.clock(trainer), self.lambda_schedule, self.warmup)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current keep-masks by parameter name (the module buffers themselves)."""
        return {p: getattr(mod, buf) for p, (mod, buf) in self._mask_owner.items()}

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer)
        if self.compact_at_end is not None:
            try:
                pl_module.get_submodule(self.compact_at_end)
            except AttributeError:
                children = ", ".join(repr(n) for n, _ in pl_module.named_children()) or "none"
                raise ValueError(
                    f"compact_at_end={self.compact_at_end!r} is not a submodule of {type(pl_module).__name__}; "
                    f"its children are {children}"
                ) from None
            self._check_compaction_returns(trainer, pl_module)
        self._set_groups(pl_module, self._build_groups(pl_module, self.lambdas))

    def _check_compaction_returns(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """ddp_spawn / ddp_notebook train in worker processes and hand the main process only a state_dict, which
        loads into its dense module only if the module can rebuild the compacted structure from it."""
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        from ssl_lightning.compaction import CompactionCheckpointing

        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _MultiProcessingLauncher) and not isinstance(pl_module, CompactionCheckpointing):
            raise ValueError(
                f"compact_at_end={self.compact_at_end!r} with a {type(trainer.strategy).__name__} that trains in "
                "spawned/forked workers: the main process receives only a state_dict, which cannot load into the "
                f"dense {type(pl_module).__name__}. Mix in ssl_lightning.CompactionCheckpointing "
                f"(class {type(pl_module).__name__}(CompactionCheckpointing, LightningModule)), which carries the "
                "compacted structure in the state_dict, or use strategy='ddp', or compact after fit with "
                "ssl_lightning.compact"
            )

    def _build_groups(self, pl_module: LightningModule, lambdas: Mapping[str, float]) -> list[Group]:
        return build_groups(
            pl_module,
            lambdas,
            include=self.include,
            exclude=self.exclude,
            layer_lambdas=self.layer_lambdas,
            couple=self.couple,
            depth_blocks=self.depth_blocks,
            scale_by_group_size=self.scale_by_group_size,
        )

    def _set_groups(self, pl_module: LightningModule, groups: list[Group]) -> None:
        self.groups = groups
        self._params = group_parameters(self.groups)
        self._layers = sorted({n for g in self.groups for n in g.modules})
        for name, mod in pl_module.named_modules():
            if isinstance(mod, nn.Conv2d) and name in self._layers:
                self._spatial_hooks[name] = mod.register_forward_hook(self._record_spatial(name))
        rank_zero_info(
            f"StructuredSparsity: {sum(g.num_groups for g in self.groups)} groups in {len(self.groups)} families "
            f"over {len(self._layers)} layers ({', '.join(sorted({g.kind for g in self.groups}))})"
        )

    def _record_spatial(self, name: str) -> Any:
        """Forward hook recording a conv's output positions (for FLOP figures) once, then removing itself."""

        def hook(_m: nn.Module, _i: Any, y: Tensor) -> None:
            self._spatial[name] = int(y.shape[-1] * y.shape[-2])
            self._spatial_hooks.pop(name).remove()

        return hook

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.compact_when == "prune" and trainer.world_size > 1 and not self._pruned:
            raise ValueError(
                "compact_when='prune' swaps modules in the middle of fit, which a multi-process strategy (DDP, "
                f"world size {trainer.world_size}) cannot follow: use compact_when='fit_end', then fine-tune the "
                "compacted model in a new fit"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        current = {id(p) for p in pl_module.parameters()}
        if any(id(p) not in current for p in self._params.values()):  # restored a compacted model after setup
            self._rebuild_groups(trainer, pl_module)
        if self._pending_masks is not None:  # resumed from a checkpoint written after pruning
            self._install_masks(pl_module, self._pending_masks)
            apply_masks_(self._params, self.masks)
            self._pending_masks = None
        self._register_step_hooks(trainer)

    def _rebuild_groups(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Groups, FLOP hooks and step hooks for the model's current modules (after a compaction)."""
        self._remove_hooks()
        self._mask_owner.clear()
        # After compaction some group types may have no plain layer left (every conv became a CompactConv2d):
        # build what still applies, type by type. These groups only keep remaining zeros frozen and log.
        try:
            groups = self._build_groups(pl_module, self.lambdas)
        except (ValueError, RuntimeError):
            groups = []
            for kind, lam in self.lambdas.items():
                try:
                    groups += self._build_groups(pl_module, {kind: lam})
                except (ValueError, RuntimeError):
                    continue
        self._set_groups(pl_module, groups)

    def _register_step_hooks(self, trainer: Trainer) -> None:
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = sorted({m.name for g in self.groups for m in g.members if id(m.param) not in optimized})
        if missing:
            raise ValueError(
                f"StructuredSparsity: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} are regularized "
                "but no optimizer updates them, so SSL cannot act on them; add them to an optimizer or exclude "
                "their layers (exclude=[...])"
            )
        self._groups_of.clear()
        for opt in trainer.optimizers:
            lr_of = {id(p): group for group in opt.param_groups for p in group["params"]}
            mine = [g for g in self.groups if id(g.members[0].param) in lr_of]
            self._groups_of[id(opt)] = mine
            self._hooks.append(opt.register_step_post_hook(self._after_step_hook(mine, lr_of)))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._pruned and self.phase(trainer) == "finetune":
            self.prune(trainer, pl_module)
            if self.compact_when == "prune" and self.compact_at_end is not None:
                self._compact_in_fit(trainer, pl_module, batch)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        phase, scale = self.phase(trainer), self.lambda_scale(trainer)
        self._step_state = (phase, scale)
        if phase == "ssl":
            # only the groups this optimizer updates: with several optimizers each group is acted on once
            raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
            self.sparsity_method.before_step(self._groups_of.get(id(raw), self.groups), scale)
        if self._mask_owner:
            mask_grads_(self._params, self.masks)

    def _after_step_hook(self, groups: list[Group], lr_of: dict[int, dict[str, Any]]) -> Any:
        params = list(group_parameters(groups).values())  # each tensor once, though several families share it

        def hook(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            phase, scale = self._step_state
            if phase == "ssl":
                self.sparsity_method.after_step(groups, params, scale, lambda p: float(lr_of[id(p)]["lr"]))
            if self._mask_owner:
                apply_masks_(self._params, self.masks)

        return hook

    def _stop_non_finite(self, trainer: Trainer, what: str) -> None:
        phase = self.phase(trainer)
        fix = {
            "dense": "lower the learning rate",
            "ssl": "lower the learning rate or λ (lambdas)",
            "finetune": "lower the learning rate or finetune_lr_factor",
        }[phase]
        raise FloatingPointError(
            f"StructuredSparsity: {what} at step {trainer.global_step} (epoch {trainer.current_epoch}, {phase} "
            f"phase); training stopped before any checkpoint with non-finite values was written. To fix: {fix}, "
            "enable gradient clipping (Trainer(gradient_clip_val=...)) or check the input data, then resume from "
            "the last good checkpoint (Trainer.fit(..., ckpt_path=...))."
        )

    def _check_finite_weights(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One fused reduction over every floating parameter (a single host sync)."""
        params = [p.detach() for p in pl_module.parameters() if p.is_floating_point() and p.numel()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            bad = [n for n, p in pl_module.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
            self._stop_non_finite(trainer, f"NaN/inf in parameter(s) {', '.join(bad[:5])}")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1 and not bool(torch.isfinite(loss.detach())):
            self._stop_non_finite(trainer, f"the training loss is {float(loss)}")
        step = trainer.global_step
        if step != self._last_logged and step % self.log_every_n_steps == 0:
            self._last_logged = step
            self.log_sparsity(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs while the checkpoint is assembled, before it is written: a NaN model never replaces a good file
        self._check_finite_weights(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_finite_weights(trainer, pl_module)
        if trainer.global_step != self._last_logged:
            self._last_logged = trainer.global_step
            self.log_sparsity(trainer, pl_module)
        if self.log_histograms and trainer.is_global_zero:
            self._log_wandb_chart(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.compact_at_end is not None and self.compact_when == "fit_end":
            self.compact(trainer, pl_module, self.compact_at_end)

    def _compact_in_fit(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Compact at the SSL -> fine-tune boundary: optimizers follow the new parameters (state carried through
        the plan), and groups, masks and hooks are rebuilt for the compacted modules."""
        from ssl_lightning.compaction import transfer_optimizer_state

        assert self.compact_at_end is not None
        dense = pl_module.get_submodule(self.compact_at_end)
        self.compact(trainer, pl_module, self.compact_at_end, batch=batch)
        compacted = pl_module.get_submodule(self.compact_at_end)
        transfer_optimizer_state(trainer.optimizers, pl_module, self.compact_at_end, dense, compacted)
        self._rebuild_groups(trainer, pl_module)
        masks = self.sparsity_method.prune_masks(self.groups, self.prune_threshold)  # zero groups stay frozen
        masks = trainer.strategy.broadcast(masks, src=0)
        self._install_masks(pl_module, masks)
        apply_masks_(self._params, self.masks)
        self._register_step_hooks(trainer)

    def compact(self, trainer: Trainer, pl_module: LightningModule, name: str, batch: Any = None) -> CompactionReport:
        """Replace ``pl_module.<name>`` by its compacted copy (checked equal on ``batch``, by default the first
        training batch), log the dense-vs-compacted report to the trainer's loggers and return it. Every DDP rank
        compacts the same weights; timing-based choices are made only on a single process (else from the kept
        fractions)."""
        from ssl_lightning.compaction import compact_with_info
        from ssl_lightning.report import compaction_report

        if batch is None:
            loader = trainer.train_dataloader
            if loader is None:
                raise RuntimeError("StructuredSparsity.compact needs the training dataloader for example inputs")
            batch = next(iter(loader))
        x = batch[0] if isinstance(batch, list | tuple) else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"compact_at_end needs tensor inputs as the first element of a batch, got {type(x)}")
        x = x[: self.compact_batch].to(pl_module.device)
        dense = pl_module.get_submodule(name)
        info = compact_with_info(dense, x, measure=trainer.world_size == 1, align=self.compact_align)
        report = compaction_report(dense, info.model, x, timing=trainer.is_global_zero)
        pl_module.set_submodule(name, info.model)
        self.compaction = report
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(report.metrics("compaction"), step=trainer.global_step)
        rank_zero_info(f"StructuredSparsity: compacted {name}\n{report.to_markdown()}")
        return report

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in [*self._hooks, *self._spatial_hooks.values()]:
            h.remove()
        self._hooks.clear()
        self._spatial_hooks.clear()

    # ---------------------------------------------------------------- pruning
    def prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Zero and freeze every group at or below ``prune_threshold``; scale LRs for fine-tuning."""
        masks = self.sparsity_method.prune_masks(self.groups, self.prune_threshold)
        masks = trainer.strategy.broadcast(masks, src=0)  # one decision for every DDP rank
        self._install_masks(pl_module, masks)
        apply_masks_(self._params, self.masks)
        self._pruned = True
        if self.finetune_lr_factor != 1.0:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= self.finetune_lr_factor
                    if "initial_lr" in group:
                        group["initial_lr"] *= self.finetune_lr_factor
            for cfg in trainer.lr_scheduler_configs:
                sched = cfg.scheduler
                if hasattr(sched, "base_lrs"):
                    sched.base_lrs = [lr * self.finetune_lr_factor for lr in sched.base_lrs]
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        rank_zero_info(f"StructuredSparsity: pruned at {self.schedule.unit} {self.clock(trainer)}; kept {kept}/{total}")

    def _install_masks(self, pl_module: LightningModule, masks: Mapping[str, Tensor]) -> None:
        """Masks live as non-persistent module buffers (they follow ``.to(device)``); the callback's own
        state carries them in checkpoints, so the model's state_dict stays loadable without this callback."""
        for pname, mask in masks.items():
            if pname not in self._params:
                raise KeyError(
                    f"checkpoint mask for {pname!r} matches no regularized parameter; the model or the "
                    "callback's layer selection changed since the checkpoint was written"
                )
            mod_name, _, attr = pname.rpartition(".")
            mod = pl_module.get_submodule(mod_name)
            buf = _MASK_PREFIX + attr
            mod.register_buffer(buf, mask.to(device=self._params[pname].device, dtype=torch.bool), persistent=False)
            self._mask_owner[pname] = (mod, buf)

    # ---------------------------------------------------------------- logging
    def metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """All scalar figures: per-layer structure, per-type zero-group fractions, penalty, λ, phase."""
        out = sparsity_report(pl_module, spatial=self._spatial, layers=self._layers).metrics("ssl")
        scale = self.lambda_scale(trainer)
        zero: dict[str, list[int]] = {}
        for g in self.groups:
            norms = g.norms()
            z = zero.setdefault(g.kind, [0, 0])
            z[0] += int((norms == 0).sum())
            z[1] += g.num_groups
            if g.kind == "depth":
                out[f"ssl/{g.modules[0]}/depth_zero"] = float(norms.sum() == 0)
        for kind, (nz, total) in zero.items():
            out[f"ssl/total/{kind}_sparsity"] = nz / total
        out["ssl/group_lasso"] = float(group_lasso(self.groups, 1.0))
        for kind in GROUP_TYPES:
            if kind in self.lambdas:
                out[f"ssl/lambda/{kind}"] = self.lambdas[kind] * scale
        out["ssl/phase"] = float(_PHASE_CODE[self.phase(trainer)])
        return out

    def log_sparsity(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Send :meth:`metrics` (and group-norm histograms to W&B) to every logger of the trainer."""
        if not trainer.loggers or not trainer.is_global_zero:
            return
        metrics = self.metrics(trainer, pl_module)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        wandb_loggers = self._wandb_loggers(trainer)
        if self.log_histograms and wandb_loggers:
            import wandb

            hists = {f"ssl_hist/{g.name}": wandb.Histogram(g.norms().cpu().tolist()) for g in self.groups}
            for lg in wandb_loggers:
                lg.log_metrics(hists, step=step)

    @staticmethod
    def _wandb_loggers(trainer: Trainer) -> list[Any]:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _log_wandb_chart(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        loggers = self._wandb_loggers(trainer)
        if not loggers:
            return
        from ssl_lightning.report import plot_layer_sparsity

        image = plot_layer_sparsity(sparsity_report(pl_module, spatial=self._spatial, layers=self._layers))
        for lg in loggers:
            lg.log_image("ssl/layer_sparsity", [image], step=step)

    # ------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "pruned": self._pruned,
            "masks": {k: v.detach().cpu() for k, v in self.masks.items()},
            "method": self.sparsity_method.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pruned = bool(state_dict["pruned"])
        masks = state_dict.get("masks") or {}
        self._pending_masks = dict(masks) if masks else None
        self.sparsity_method.load_state_dict(state_dict.get("method", {}))  # absent in earlier checkpoints

"""``SparsityCallback``: the Lightning glue every sparsity method shares.

One base owns what methods have in common: groups (:mod:`ssl_lightning.groups`), phases and schedules
(:mod:`ssl_lightning.schedules`), prune / freeze masks as module buffers, checkpoint state, rank-0 decisions
broadcast to every DDP rank, extra parameters a method owns (their own optimizer parameter groups), logging,
non-finite checks and compaction at the end of fit or at the prune boundary. A method
(:mod:`ssl_lightning.methods`) says what it does around an optimizer step and how it decides what to prune; its
public callback (``StructuredSparsity``, ``ParameterizedPruning``) validates its own arguments and builds it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from ssl_lightning.graph import GraphAnalysis, analyze
from ssl_lightning.groups import Group, Selector, build_groups, group_parameters
from ssl_lightning.penalty import apply_masks_, mask_grads_
from ssl_lightning.report import CompactionReport, sparsity_report
from ssl_lightning.schedules import LAMBDA_SCHEDULES, PhaseSchedule, lambda_factor

if TYPE_CHECKING:
    from ssl_lightning.methods.base import SparsityMethod

__all__ = ["OWNED_DECAY_KEY", "SparsityCallback"]

_PHASE_CODE = {"dense": 0, "ssl": 1, "finetune": 2}
_MASK_PREFIX = "ssl_mask_"
# Key of the optimizer parameter groups a callback adds for its method's own parameters: the full-strength
# weight decay, scaled by the schedule before every step (the group's "weight_decay" is the scaled value).
OWNED_DECAY_KEY = "ssl_lightning_decay"
# Scheduler attributes holding one entry per parameter group (extended when a group is added).
_PER_GROUP_SCHEDULER_LISTS = ("base_lrs", "max_lrs", "min_lrs", "lr_lambdas", "_last_lr")


def _check_choice(arg: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_number(arg: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):  # type: ignore[operator]
        op = ">" if strict else ">="
        raise ValueError(f"{arg} must be a finite number {op} {minimum:g}, got {value!r}")


def _check_strategy(trainer: Trainer, owner: str) -> None:
    """Group norms need whole parameters: strategies that shard them (FSDP, DeepSpeed ZeRO-3, tensor / model
    parallel) would give each rank the norms of its own shards and different pruning decisions."""
    name = type(trainer.strategy).__name__
    if any(key in name for key in ("FSDP", "ModelParallel")):
        raise ValueError(
            f"{owner} does not support {name}: it shards parameters, so group norms (and pruning "
            "decisions) would be computed on shards. Use a single device or strategy='ddp' / 'ddp_spawn' "
            "(Lightning's DDP keeps whole parameters on every rank; multi-node DDP works the same way)."
        )


class SparsityCallback(Callback):
    """Shared base of the sparsity callbacks; see the module docstring. Not used directly.

    Subclasses call :meth:`_init_shared` from ``__init__`` with the arguments every method has (documented on
    :class:`~ssl_lightning.StructuredSparsity`), set :attr:`sparsity_method`, and return their group spec
    (group type -> the coefficient stored as each family's ``lam``) from :meth:`group_spec`.
    """

    log_prefix = "ssl"
    #: advice in the non-finite error, by phase
    _non_finite_fix: ClassVar[dict[str, str]] = {
        "dense": "lower the learning rate",
        "ssl": "lower the learning rate or the regularization strength",
        "finetune": "lower the learning rate or finetune_lr_factor",
    }

    sparsity_method: SparsityMethod
    _init_args: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> SparsityCallback:
        # the constructor's arguments as given (defaults filled in): logged as hyperparameters at fit start
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind_partial(obj, *args, **kwargs)
            bound.apply_defaults()
            obj._init_args = {k: v for k, v in bound.arguments.items() if k != "self"}
        except TypeError:  # wrong arguments: __init__ reports them
            obj._init_args = {}
        return obj

    def hyperparameters(self) -> dict[str, Any]:
        """The callback's class and every constructor argument, as plain values (logged to every logger at fit
        start under ``log_prefix``)."""

        def plain(v: Any) -> Any:
            if isinstance(v, Mapping):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [plain(x) for x in v]
            return v if isinstance(v, int | float | str | bool | type(None)) else str(v)

        return {"callback": type(self).__name__, **{k: plain(v) for k, v in self._init_args.items()}}

    def _init_shared(
        self,
        *,
        include: Sequence[Selector] | None,
        exclude: Sequence[Selector],
        layer_lambdas: Mapping[str, float | Mapping[str, float]] | None,
        couple: bool,
        depth_blocks: Sequence[str] | None,
        scale_by_group_size: bool,
        phases: Mapping[str, Sequence[int | None]] | None,
        unit: str,
        lambda_schedule: str,
        warmup: int,
        prune_threshold: float,
        finetune_lr_factor: float,
        log_every_n_steps: int,
        log_histograms: bool,
        compact_at_end: str | None,
        compact_batch: int,
        compact_align: int | Literal["auto"],
        compact_when: str,
        schedule_arg: str = "lambda_schedule",
    ) -> None:
        _check_choice("unit", unit, ("epoch", "step"))
        _check_choice(schedule_arg, lambda_schedule, LAMBDA_SCHEDULES)
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 ({unit}s), got {warmup!r}")
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
        if compact_align != "auto" and (
            isinstance(compact_align, bool) or not isinstance(compact_align, int) or compact_align < 1
        ):
            raise ValueError(f"compact_align must be 'auto' or an int >= 1, got {compact_align!r}")
        _check_choice("compact_when", compact_when, ("fit_end", "prune"))
        self.schedule = PhaseSchedule.from_intervals(phases or {"ssl": [0, None]}, unit=unit)  # type: ignore[arg-type]
        if compact_when == "prune" and (compact_at_end is None or self.schedule.ssl_end is None):
            raise ValueError(
                "compact_when='prune' needs compact_at_end (the submodule to compact) and an SSL phase that ends, "
                f"e.g. phases={{'ssl': [0, 10], 'finetune': [10, None]}}; got compact_at_end={compact_at_end!r}, "
                f"phases={phases!r}"
            )
        if lambda_schedule == "ramp" and self.schedule.ssl_end is None:
            raise ValueError(f"{schedule_arg}='ramp' needs an SSL phase with an end, e.g. phases={{'ssl': [0, 10]}}")
        self.include, self.exclude = include, exclude
        self.layer_lambdas = dict(layer_lambdas or {})
        self.couple, self.depth_blocks, self.scale_by_group_size = couple, depth_blocks, scale_by_group_size
        self.lambda_schedule, self.warmup = lambda_schedule, warmup
        self.prune_threshold = prune_threshold
        self.finetune_lr_factor = finetune_lr_factor
        self.log_every_n_steps = log_every_n_steps
        self.log_histograms = log_histograms
        self.compact_at_end, self.compact_batch, self.compact_align = compact_at_end, compact_batch, compact_align
        self.compact_when = compact_when
        self.compaction: CompactionReport | None = None  # filled when compact_at_end ran

        self.groups: list[Group] = []
        self._layers: list[str] = []
        self._params: dict[str, Tensor] = {}  # every tensor masks act on: group members and owned parameters
        self._spatial: dict[str, int] = {}
        self._hooks: list[Any] = []
        self._groups_of: dict[int, list[Group]] = {}  # id(optimizer) -> the groups whose parameters it updates
        self._spatial_hooks: dict[str, Any] = {}
        self._pruned = False
        self._pending_masks: dict[str, Tensor] | None = None
        self._mask_owner: dict[str, tuple[nn.Module, str]] = {}
        self._step_state: tuple[str, float] = ("dense", 0.0)
        self._last_logged = -1
        self._phase_logged: str | None = None  # the phase last written by name (TensorBoard text, W&B summary)
        self._monitored: dict[str, float] = {}  # model-level figures logged through pl_module.log every step
        self._owned: dict[str, Tensor] = {}  # the method's own parameters (e.g. PSP's α) until they are folded
        self._others: list[SparsityCallback] = []  # the Trainer's other sparsity callbacks
        self._analysis: GraphAnalysis | None = None  # the graph the groups were last built from

    # ------------------------------------------------------------ subclass API
    def group_spec(self) -> dict[str, float]:
        """Group type -> coefficient (λ for group lasso, α weight decay for PSP) for :func:`build_groups`."""
        raise NotImplementedError

    def set_strength(self, value: float, ratios: Mapping[str, float] | None = None) -> None:
        """Set every group type's coefficient to ``value`` × its ratio (1 when not given; used by
        ``ssl-lightning sweep``). Raises ``ValueError`` for a ratio of a type the callback does not use."""
        raise NotImplementedError

    @staticmethod
    def _scaled(
        spec: Mapping[str, float], value: float, ratios: Mapping[str, float] | None, arg: str
    ) -> dict[str, float]:
        ratios = dict(ratios or {})
        unknown = sorted(set(ratios) - set(spec))
        if unknown:
            raise ValueError(
                f"--ratio: {', '.join(repr(k) for k in unknown)} not among the recipe's {arg} ({', '.join(spec)}); "
                f"give ratios for those types only"
            )
        bad = {k: v for k, v in ratios.items() if not (isinstance(v, int | float) and v >= 0)}
        if bad:
            raise ValueError(f"--ratio values must be numbers >= 0, got {bad}")
        return {k: value * float(ratios.get(k, 1.0)) for k in spec}

    @property
    def name(self) -> str:
        return type(self).__name__

    # ----------------------------------------------------------------- clock
    def clock(self, trainer: Trainer) -> int:
        return trainer.global_step if self.schedule.unit == "step" else trainer.current_epoch

    def phase(self, trainer: Trainer) -> str:
        return self.schedule.phase_at(self.clock(trainer))

    def lambda_scale(self, trainer: Trainer) -> float:
        return lambda_factor(self.schedule, self.clock(trainer), self.lambda_schedule, self.warmup)  # type: ignore[arg-type]

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current keep-masks by parameter name (the module buffers themselves)."""
        return {p: getattr(mod, buf) for p, (mod, buf) in self._mask_owner.items()}

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer, self.name)
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
        # two sparsity callbacks on one Trainer: allowed on disjoint layers only (checked when groups are set)
        self._others = [c for c in trainer.callbacks if isinstance(c, SparsityCallback) and c is not self]  # type: ignore[attr-defined]
        self._set_groups(pl_module, self._build_groups(pl_module, self.group_spec()))
        # before the checkpoint (if any) is restored: the method's parameters must exist to receive their values
        self.sparsity_method.attach(pl_module, self.groups)
        self._owned = self.sparsity_method.owned_parameters(pl_module)
        self._params.update(self._owned)

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

    def _build_groups(self, pl_module: LightningModule, spec: Mapping[str, float]) -> list[Group]:
        inputs = _example_inputs(pl_module)
        self._analysis = analyze(pl_module, inputs)  # kept for the method's own checks of the same graph
        return build_groups(
            pl_module,
            spec,
            include=self.include,
            exclude=self.exclude,
            layer_lambdas=self.layer_lambdas,
            couple=self.couple,
            depth_blocks=self.depth_blocks,
            scale_by_group_size=self.scale_by_group_size,
            example_inputs=inputs,
            analysis=self._analysis,
        )

    def _set_groups(self, pl_module: LightningModule, groups: list[Group]) -> None:
        for other in self._others:
            shared = sorted(set(group_parameters(groups)) & set(group_parameters(other.groups)))
            if shared:
                raise ValueError(
                    f"{self.name} and {other.name} both act on {', '.join(shared[:3])}"
                    f"{' ...' if len(shared) > 3 else ''}: two sparsity methods on the same weights would fight "
                    "over them (and over their pruning decisions). Give them disjoint layers with include=[...] / "
                    "exclude=[...], or use one method"
                )
        self.groups = groups
        self._params = group_parameters(self.groups)
        self._layers = sorted({n for g in self.groups for n in g.modules})
        for name, mod in pl_module.named_modules():
            if isinstance(mod, nn.Conv2d) and name in self._layers:
                self._spatial_hooks[name] = mod.register_forward_hook(self._record_spatial(name))
        rank_zero_info(
            f"{self.name}: {sum(g.num_groups for g in self.groups)} groups in {len(self.groups)} families "
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
        for logger in trainer.loggers:  # loggers write on rank zero only
            logger.log_hyperparams({self.log_prefix: self.hyperparameters()})
        # optimizers exist, their saved state (on resume) is not loaded yet: give the method's parameters their
        # own groups now, so a resumed optimizer has the same groups as the one that was saved
        if self._owned:
            self._check_optimized(trainer)
            self._adopt_owned_parameters(trainer, self._owned)

    def _check_optimized(self, trainer: Trainer) -> None:
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = sorted({m.name for g in self.groups for m in g.members if id(m.param) not in optimized})
        if missing:
            raise ValueError(
                f"{self.name}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} are regularized "
                f"but no optimizer updates them, so {self.sparsity_method.label} cannot act on them; add them to an "
                "optimizer (configure_optimizers) or exclude their layers (exclude=[...])"
            )

    def _adopt_owned_parameters(self, trainer: Trainer, owned: Mapping[str, Tensor]) -> None:
        """Move the method's parameters out of whatever optimizer groups the user's ``configure_optimizers`` put
        them in (``self.parameters()`` includes them) into groups of their own, one per optimizer group of the
        weights they belong to: same hyperparameters and LR schedule, their own weight decay
        (:data:`OWNED_DECAY_KEY`, applied by the optimizer as ``weight_decay``)."""
        ids = {id(p) for p in owned.values()}
        anchor = self.sparsity_method.anchors()  # id(owned param) -> (weight it scales, decay)
        for opt in trainer.optimizers:
            if any(OWNED_DECAY_KEY in g for g in opt.param_groups):
                continue  # adopted already (a second fit on the same optimizer)
            for group in opt.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            index_of = {id(p): i for i, group in enumerate(opt.param_groups) for p in group["params"]}
            new: dict[tuple[int, float], list[Tensor]] = {}
            for p in owned.values():
                weight, decay = anchor[id(p)]
                if id(weight) in index_of:
                    new.setdefault((index_of[id(weight)], decay), []).append(p)
            for (i, decay), params in new.items():
                before = len(opt.param_groups)
                hyper = {k: v for k, v in opt.param_groups[i].items() if k != "params"}
                opt.add_param_group({**hyper, "params": params, "weight_decay": 0.0, OWNED_DECAY_KEY: decay})
                for cfg in trainer.lr_scheduler_configs:
                    sched = cfg.scheduler
                    if getattr(sched, "optimizer", None) is not opt:
                        continue
                    for attr in _PER_GROUP_SCHEDULER_LISTS:
                        values = getattr(sched, attr, None)
                        if isinstance(values, list) and len(values) == before:
                            values.append(values[i])

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
        spec = self.group_spec()
        try:
            groups = self._build_groups(pl_module, spec)
        except (ValueError, RuntimeError):
            groups = []
            for kind, lam in spec.items():
                try:
                    groups += self._build_groups(pl_module, {kind: lam})
                except (ValueError, RuntimeError):
                    continue
        self._set_groups(pl_module, groups)

    def _register_step_hooks(self, trainer: Trainer) -> None:
        self._check_optimized(trainer)
        self._groups_of.clear()
        for opt in trainer.optimizers:
            lr_of = {id(p): group for group in opt.param_groups for p in group["params"]}
            mine = [g for g in self.groups if id(g.members[0].param) in lr_of]
            self._groups_of[id(opt)] = mine
            self._hooks.append(opt.register_step_post_hook(self._after_step_hook(mine, lr_of)))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        phase = self.phase(trainer)
        if not self._pruned and phase == "ssl":
            self.sparsity_method.current_masks = self.masks
            masks = self.sparsity_method.masks_at(self.groups, self.clock(trainer))
            if masks is not None:
                masks = trainer.strategy.broadcast(masks, src=0)  # one decision for every DDP rank
                self._install_masks(pl_module, masks)
                apply_masks_(self._params, self.masks)
        if not self._pruned and phase == "finetune":
            self.prune(trainer, pl_module)
            if self.compact_when == "prune" and self.compact_at_end is not None:
                self._compact_in_fit(trainer, pl_module, batch)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        phase, scale = self.phase(trainer), self.lambda_scale(trainer)
        self._step_state = (phase, scale)
        raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        for group in raw.param_groups:
            if OWNED_DECAY_KEY in group:
                group["weight_decay"] = group[OWNED_DECAY_KEY] * scale
        if phase == "ssl":
            # only the groups this optimizer updates: with several optimizers each group is acted on once
            self.sparsity_method.before_step(self._groups_of.get(id(raw), self.groups), scale)
        elif phase == "dense":  # train normally: the method's own parameters stay where they started
            for p in self._owned.values():
                p.grad = None
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
        raise FloatingPointError(
            f"{self.name}: {what} at step {trainer.global_step} (epoch {trainer.current_epoch}, {phase} "
            f"phase); training stopped before any checkpoint with non-finite values was written. To fix: "
            f"{self._non_finite_fix[phase]}, enable gradient clipping (Trainer(gradient_clip_val=...)) or check the "
            "input data, then resume from the last good checkpoint (Trainer.fit(..., ckpt_path=...))."
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
        due = step != self._last_logged and step % self.log_every_n_steps == 0
        if due:
            self._last_logged = step
            self.log_sparsity(trainer, pl_module)
        elif not self._monitored:  # first batch, or just pruned: monitorable values now, loggers on their cadence
            self._monitored = self._monitor_subset(self.metrics(trainer, pl_module))
        self._log_monitored(pl_module)

    def _monitor_subset(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The model-level figures (``<prefix>/total/*``, ``<prefix>/phase``) that ``ModelCheckpoint`` /
        ``EarlyStopping`` can monitor."""
        prefix = self.log_prefix
        return {k: v for k, v in metrics.items() if k.startswith(f"{prefix}/total/") or k == f"{prefix}/phase"}

    def _log_monitored(self, pl_module: LightningModule) -> None:
        """Every training step, the latest model-level figures go through ``pl_module.log`` (not to the
        loggers, which get every figure from :meth:`log_sparsity`): they are in ``trainer.callback_metrics``
        on every rank (identical weights give identical values) and the remaining FLOPs in the progress bar."""
        if not self._monitored:
            return
        flops = f"{self.log_prefix}/total/flops_remaining"
        rest = {k: v for k, v in self._monitored.items() if k != flops}
        pl_module.log_dict(rest, on_step=True, on_epoch=False, logger=False, batch_size=1)
        if flops in self._monitored:
            pl_module.log(flops, self._monitored[flops], on_step=True, on_epoch=False, logger=False, prog_bar=True,
                          batch_size=1)  # fmt: skip

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
            self._log_chart(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._owned:
            self.finish(trainer, pl_module)
        if self.compact_at_end is not None and self.compact_when == "fit_end":
            self.compact(trainer, pl_module, self.compact_at_end)

    def finish(self, trainer: Trainer | None, pl_module: LightningModule) -> None:
        """Hand the model back in plain form: the method folds its own parameters into the weights (for PSP the
        scales α), the optimizers forget them, and masks keep acting on the weights only."""
        owned, self._owned = self._owned, {}
        ids = {id(p) for p in owned.values()}
        self.sparsity_method.finish(pl_module)
        for name in owned:
            self._params.pop(name, None)
            self._mask_owner.pop(name, None)
        for opt in trainer.optimizers if trainer is not None else []:
            for group in opt.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            for p in [p for p in opt.state if id(p) in ids]:
                del opt.state[p]

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
                raise RuntimeError(f"{self.name}.compact needs the training dataloader for example inputs")
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
        rank_zero_info(f"{self.name}: compacted {name}\n{report.to_markdown()}")
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
        """Zero and freeze every group the method prunes (see ``prune_threshold``); scale LRs for fine-tuning."""
        self.sparsity_method.current_masks = self.masks
        masks = self.sparsity_method.prune_masks(self.groups, self.prune_threshold)
        masks = trainer.strategy.broadcast(masks, src=0)  # one decision for every DDP rank
        self._install_masks(pl_module, masks)
        apply_masks_(self._params, self.masks)
        self._pruned = True
        self._monitored = {}  # stale: recomputed at the end of this batch
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
        weights = {p: m for p, m in masks.items() if p in group_parameters(self.groups)}
        kept = sum(int(m.sum()) for m in weights.values())
        total = sum(m.numel() for m in weights.values())
        rank_zero_info(
            f"{self.name}: pruned at {self.schedule.unit} {self.clock(trainer)}; kept {kept}/{total} weights "
            f"({100 * kept / max(total, 1):.1f} %) of the regularized layers"
        )
        self._warn_prune_outcome(weights, kept, total)

    #: what to change when pruning removed nothing / everything, by callback
    _strength = "λ (lambdas, layer_lambdas)"

    def _warn_prune_outcome(self, weights: Mapping[str, Tensor], kept: int, total: int) -> None:
        """Tuning feedback at the prune boundary: nothing pruned, or a layer with no weight left."""
        from lightning.pytorch.utilities import rank_zero_warn

        if total and kept == total:
            rank_zero_warn(
                f"{self.name}: the sparsity phase ended with nothing pruned (kept all {total} weights): the "
                f"regularization was too weak for this run; raise {self._strength} or lengthen the 'ssl' phase"
            )
        dead = sorted(p.removesuffix(".weight") for p, m in weights.items() if m.numel() and not bool(m.any()))
        if dead:
            rank_zero_warn(
                f"{self.name}: every weight of {', '.join(dead[:5])} was pruned, so the model's output no longer "
                f"depends on that layer's input; lower {self._strength} for it"
            )

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
        """All scalar figures: per-layer structure, per-type zero-group fractions, the method's own figures,
        phase."""
        prefix = self.log_prefix
        out = sparsity_report(pl_module, spatial=self._spatial, layers=self._layers).metrics(prefix)
        zero: dict[str, list[int]] = {}
        for g in self.groups:
            zeros = self.sparsity_method.zero_groups(g)
            z = zero.setdefault(g.kind, [0, 0])
            z[0] += int(zeros.sum())
            z[1] += g.num_groups
            if g.kind == "depth":
                out[f"{prefix}/{g.modules[0]}/depth_zero"] = float(zeros.all())
        for kind, (nz, total) in zero.items():
            out[f"{prefix}/total/{kind}_sparsity"] = nz / total
        out.update(self.sparsity_method.metrics(self.groups, prefix, self.lambda_scale(trainer)))
        out[f"{prefix}/phase"] = float(_PHASE_CODE[self.phase(trainer)])
        return out

    def log_sparsity(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Send :meth:`metrics` (and histograms to W&B) to every logger of the trainer; keep the model-level
        figures for ``pl_module.log``."""
        metrics = self.metrics(trainer, pl_module)
        self._monitored = self._monitor_subset(metrics)
        if not trainer.loggers or not trainer.is_global_zero:
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        wandb_loggers, tensorboards = self._wandb_loggers(trainer), self._tensorboards(trainer)
        phase = self.phase(trainer)
        if phase != self._phase_logged:  # the phase by name where a logger takes text
            self._phase_logged = phase
            for writer in tensorboards:
                writer.add_text(f"{self.log_prefix}/phase_name", phase, step)
            for lg in wandb_loggers:
                lg.experiment.summary[f"{self.log_prefix}/phase_name"] = phase
        if self.log_histograms and (wandb_loggers or tensorboards):
            values = {
                f"{self.log_prefix}_hist/{k}": v.cpu() for k, v in self.sparsity_method.histograms(self.groups).items()
            }
            if wandb_loggers:
                import wandb

                hists = {k: wandb.Histogram(v.tolist()) for k, v in values.items()}
                for lg in wandb_loggers:
                    lg.log_metrics(hists, step=step)
            for writer in tensorboards:  # native TensorBoard histograms; CSV takes only the scalars
                for k, v in values.items():
                    writer.add_histogram(k, v, step)

    @staticmethod
    def _wandb_loggers(trainer: Trainer) -> list[Any]:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    @staticmethod
    def _tensorboards(trainer: Trainer) -> list[Any]:
        """The SummaryWriters of the trainer's TensorBoard loggers."""
        from lightning.pytorch.loggers import TensorBoardLogger

        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _log_chart(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """The per-layer sparsity chart as an image: a W&B image, a TensorBoard image (CSV has no images)."""
        loggers, tensorboards = self._wandb_loggers(trainer), self._tensorboards(trainer)
        if not loggers and not tensorboards:
            return
        from ssl_lightning.report import plot_layer_sparsity

        report = sparsity_report(pl_module, spatial=self._spatial, layers=self._layers)
        image = plot_layer_sparsity(report)
        columns = ["layer", "filters kept", "filters", "channels kept", "channels", "shape sparsity", "FLOPs remaining"]
        rows = [[s.name, s.filters_kept, s.filters, s.channels_kept, s.channels, s.col_sparsity,
                 s.flop_fraction if s.macs else None] for s in report.layers]  # fmt: skip
        for lg in loggers:  # the chart as an image, the figures as a native W&B table (sortable, chartable)
            lg.log_image(f"{self.log_prefix}/layer_sparsity", [image], step=step)
            lg.log_table(f"{self.log_prefix}/layers", columns=columns, data=rows, step=step)
        for writer in tensorboards:
            writer.add_image(f"{self.log_prefix}/layer_sparsity", image, step, dataformats="HWC")

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


def __getattr__(name: str) -> Any:
    """``ssl_lightning.callback.StructuredSparsity`` (its home before the method seam) keeps working."""
    if name == "StructuredSparsity":
        from ssl_lightning.methods.group_lasso import StructuredSparsity

        return StructuredSparsity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _example_inputs(pl_module: LightningModule) -> tuple[Tensor, ...] | None:
    """``pl_module.example_input_array`` (Lightning's convention) as positional inputs on the module's device,
    to check the graph analysis against a real run; None when unset or given as keyword arguments."""
    x = pl_module.example_input_array
    if isinstance(x, Tensor):
        x = (x,)
    if not isinstance(x, tuple | list) or not all(isinstance(t, Tensor) for t in x):
        return None
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    return tuple(t.to(device) for t in x)

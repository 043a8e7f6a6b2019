"""Compaction: turn learned zero groups into a smaller, faster model, equivalence-checked.

Stages, on a deep copy of the model (the original is untouched):

0. depth removal (:mod:`ssl_lightning.depth_removal`): a residual branch whose weights are all zero is
   cut out of its block, its constant output kept as a per-channel buffer;
1. channel removal (:mod:`ssl_lightning.channel_removal`): channels that every consumer ignores or that
   are a foldable constant are sliced out of their producers, BN / depthwise / PReLU layers and
   consumers, across residual adds, concatenations and flatten→Linear, with the constants folded into
   the consumers' biases;
2. every remaining ``nn.Conv2d`` whose lowered weight still has all-zero rows (filters) or columns
   (filter-shape fibers) becomes a drop-in :class:`~ssl_lightning.CompactConv2d` (full-width output),
   and every ``nn.Linear`` with all-zero input columns a :class:`~ssl_lightning.CompactLinear` (gather the
   kept features, smaller GEMM), unless the dense layer measures as fast on the layer's real input.

The result is checked against the original on the example and random inputs; a mismatch raises
:class:`CompactionError` naming the first layer that differs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ssl_lightning.channel_removal import ChannelPlan, apply_channel_plan, capture_inputs, plan_channel_removal
from ssl_lightning.compact_conv import CompactConv2d
from ssl_lightning.compact_linear import CompactLinear
from ssl_lightning.depth_removal import apply_depth_plan, plan_and_remove_depth
from ssl_lightning.ops import lowered_nonzero

PLAN_VERSION = 2
_PLAN_ATTR = "_ssl_lightning_plan"  # depth + channel plan ride on the compacted model (kept by deepcopy)

__all__ = [
    "CHECKPOINT_KEY",
    "STATE_DICT_KEY",
    "CompactionCheckpointing",
    "CompactionError",
    "CompactionResult",
    "apply_compaction_plan",
    "compact",
    "compact_with_info",
    "compaction_plan",
    "compaction_plans",
    "restore_compaction",
    "transfer_optimizer_state",
]


class CompactionError(RuntimeError):
    """The compacted model does not reproduce the original; names the first layer that differs."""


@dataclass
class CompactionResult:
    model: nn.Module
    replaced: dict[str, str] = field(default_factory=dict)  # layer name -> implementation chosen
    kept_dense: list[str] = field(default_factory=list)  # sparse layers where the dense conv was fastest
    channels: ChannelPlan = field(default_factory=ChannelPlan)  # channels removed per module
    depth: list[dict[str, Any]] = field(default_factory=list)  # residual branches cut out
    notes: list[str] = field(default_factory=list)  # what was found removable but kept, and why
    max_abs_error: float = 0.0


def _as_tuple(x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _trials(inputs: tuple[Tensor, ...], extra: int = 2) -> list[tuple[Tensor, ...]]:
    """The example inputs and ``extra`` random inputs with the same shapes and statistics."""
    g = torch.Generator().manual_seed(0)
    return [inputs] + [
        tuple(torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) * t.std() + t.mean() for t in inputs)
        if all(t.is_floating_point() for t in inputs)
        else inputs
        for _ in range(extra)
    ]


def _run(model: nn.Module, inputs: tuple[Tensor, ...]) -> object:
    with torch.no_grad():
        return model(*inputs)


def _outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    with torch.no_grad():
        leaves, _ = tree_flatten(model(*inputs))
    return [t for t in leaves if isinstance(t, Tensor)]


def _layer_outputs(model: nn.Module, names: Sequence[str], inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_hook(lambda _m, _i, y, n=n: out.__setitem__(n, y.detach().clone()))
        for n in names
        if n in mods  # a module of a removed branch is gone
    ]
    try:
        _outputs(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return out


def compact(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    measure: bool = True,
    align: int = 8,
    channels: bool = True,
    shapes: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> nn.Module:
    """A compacted, equivalence-checked copy of ``model`` (see :func:`compact_with_info`)."""
    return compact_with_info(
        model,
        example_inputs,
        measure=measure,
        align=align,
        channels=channels,
        shapes=shapes,
        verify=verify,
        rtol=rtol,
        atol=atol,
    ).model


def compact_with_info(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    measure: bool = True,
    align: int = 8,
    channels: bool = True,
    shapes: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> CompactionResult:
    """Return a compacted copy of ``model`` (the original is untouched), built and checked in eval mode
    (BN running statistics; constants are folded for them) and returned in the mode ``model`` was in.

    measure: pick each layer's implementation by timing it on the input it sees for ``example_inputs``
    (else from the kept fractions). align: kept channel counts (and the row-only conv's filter counts)
    are rounded up to a multiple of this, since oneDNN/cuDNN are slower on odd counts; 1 keeps exactly the
    needed channels. channels: cut zero residual branches and remove channels across layers (stages 0-1).
    shapes: swap layers with remaining zero rows / columns for ``CompactConv2d`` / ``CompactLinear``
    (stage 2); ``shapes=False`` leaves only plain PyTorch modules (e.g. for ONNX export).
    verify: check the compacted model against the original on the example and two random inputs of the
    same shapes; raise :class:`CompactionError` naming the first layer whose output differs beyond
    ``rtol``/``atol`` (relative to the layer's output scale).
    """
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an integer >= 1, got {align!r}")
    inputs = _as_tuple(example_inputs)
    was_training = model.training
    try:
        return _compact_in_eval(model, inputs, measure, align, channels, shapes, verify, rtol, atol, was_training)
    finally:
        model.train(was_training)  # also when compaction fails: the caller's model is left as it was given


def _compact_in_eval(
    original: nn.Module,
    inputs: tuple[Tensor, ...],
    measure: bool,
    align: int,
    channels: bool,
    shapes: bool,
    verify: bool,
    rtol: float,
    atol: float,
    was_training: bool,
) -> CompactionResult:
    original.eval()
    if verify:
        _check_finite(_outputs(original, inputs), "the model's output on the example inputs")
    new = copy.deepcopy(original).eval()
    plan = ChannelPlan()
    depth: list[dict[str, Any]] = []
    notes: list[str] = []
    if channels:
        trials = _trials(inputs)
        depth, notes = plan_and_remove_depth(new, trials, _run)
        try:
            plan, corrections = plan_channel_removal(new, trials, _run, align=align)
        except RuntimeError as err:  # not traceable by torch.fx: channels stay, convs are still swapped
            warnings.warn(f"compact: channel removal skipped: {err}", stacklevel=2)
        else:
            apply_channel_plan(new, plan, corrections)
            notes += plan.kept_constant
            if plan.unsupported:
                warnings.warn(
                    "compact: channels feeding these stay whole (the graph analysis cannot follow them): "
                    + "; ".join(plan.unsupported),
                    stacklevel=2,
                )
    setattr(new, _PLAN_ATTR, {"depth": depth, "channels": plan.to_dict()})
    convs = {n: m for n, m in new.named_modules() if isinstance(m, nn.Conv2d)}
    for name, conv in convs.items():
        if type(conv) is not nn.Conv2d:
            warnings.warn(
                f"compact: {name} is a {type(conv).__name__} (a Conv2d subclass with its own forward); left dense",
                stacklevel=2,
            )
    convs = {n: m for n, m in convs.items() if type(m) is nn.Conv2d and shapes}
    linears = {n: m for n, m in new.named_modules() if type(m) is nn.Linear and shapes}
    captured = capture_inputs(new, [*convs, *linears], [inputs], _run)  # the input each layer sees
    seen = {n: xs[0] for n, xs in captured.items() if xs}
    result = CompactionResult(new, channels=plan, depth=depth, notes=notes)
    for name, conv in convs.items():
        rows, cols = lowered_nonzero(conv.weight.detach(), conv.groups)
        if bool(rows.all()) and bool(cols.all()):
            continue  # nothing learned to remove
        if name not in seen:
            warnings.warn(f"compact: {name} is not reached by the example inputs; left dense", stacklevel=2)
            continue
        fast = CompactConv2d.from_conv(conv, example_input=seen[name] if measure else None, align=align)
        if fast.impl == "dense":  # the dense conv is as fast: keep the plain module (no wrapper on the hot path)
            result.kept_dense.append(name)
            continue
        new.set_submodule(name, fast.eval())
        result.replaced[name] = fast.impl
    for name, linear in linears.items():  # input features no upstream layer could drop (e.g. ignored pixels)
        if name in seen:
            small = CompactLinear.from_linear(linear, seen[name] if measure else None)
            if small is not linear:
                new.set_submodule(name, small)
                result.replaced[name] = "gather"
    if verify:
        touched = set(result.replaced) | set(plan.out_keep) | set(plan.in_keep)
        order = [n for n, _ in original.named_modules() if n in touched]
        result.max_abs_error = _verify(original, new, inputs, order, plan.out_keep, rtol, atol)
    new.train(was_training)  # same mode as the model given (a compacted model is trained on like the original)
    return result


def _check_finite(outputs: Sequence[Tensor], what: str) -> None:
    """Equivalence cannot be checked on NaN / inf (every comparison with NaN is false)."""
    for t in outputs:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CompactionError(
                f"compact: {what} has {bad} non-finite values (NaN/inf), so the compacted model cannot be verified; "
                "check the trained weights (torch.isfinite) and the example inputs, or pass verify=False to skip "
                "the check"
            )


def _max_error(want: Tensor, have: Tensor) -> float:
    """Largest |want - have|, inf where either is non-finite and they differ (NaN never compares as equal)."""
    if not want.numel():
        return 0.0
    diff = (want - have).abs()
    same = (want == have) | (want.isnan() & have.isnan())  # equal infinities give NaN differences
    return float(torch.where(same, torch.zeros_like(diff), diff.nan_to_num(nan=float("inf"))).max())


def _verify(
    original: nn.Module,
    new: nn.Module,
    inputs: tuple[Tensor, ...],
    touched: list[str],
    out_keep: dict[str, list[int]],
    rtol: float,
    atol: float,
) -> float:
    worst = 0.0
    for trial in _trials(inputs):
        a, b = _outputs(original, trial), _outputs(new, trial)
        bad = len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=False))
        for x, y in zip(a, b, strict=False):
            if x.shape != y.shape:
                continue
            err = _max_error(x, y)
            worst = max(worst, err)
            scale = float(x.abs().max()) if x.numel() else 0.0
            bad = bad or err > atol + rtol * scale
        if bad:
            ref = _layer_outputs(original, touched, trial)
            got = _layer_outputs(new, touched, trial)
            for name in touched:  # in module registration order
                want, have = ref.get(name), got.get(name)
                if want is not None and name in out_keep:  # compare the channels that were kept
                    want = want[:, out_keep[name]]
                if want is not None and have is not None and want.shape == have.shape:
                    err = _max_error(want, have)
                    if err > atol + rtol * float(want.abs().max()):
                        raise CompactionError(f"compacted layer {name} differs from the original by {err:.3g}")
            raise CompactionError(
                f"compacted model output differs from the original by {worst:.3g}, but every replaced layer "
                "matches on its own; a module depends on something the compaction changed"
            )
    return worst


def compaction_plan(model: nn.Module) -> dict[str, Any]:
    """A JSON-serializable description of how ``model`` was compacted: the channels each module keeps and every
    :class:`CompactConv2d` (kept rows / columns, implementation). Enough to rebuild the module structure from a
    freshly built model before loading the compacted weights (see :func:`apply_compaction_plan`)."""
    convs: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, CompactConv2d):
            convs[name] = {
                "impl": mod.impl,
                "compact_output": mod.compact_output,
                "align": mod.align,
                "row_idx": mod.row_idx.tolist(),
                "col_idx": mod.col_idx.tolist(),
                "col_ptr": mod.col_ptr.tolist(),
            }
    linears = {n: {"in_idx": m.in_idx.tolist()} for n, m in model.named_modules() if isinstance(m, CompactLinear)}
    stored = getattr(model, _PLAN_ATTR, None) or {}
    return {
        "version": PLAN_VERSION,
        "depth": copy.deepcopy(stored.get("depth", [])),
        "channels": copy.deepcopy(stored.get("channels", ChannelPlan().to_dict())),
        "convs": convs,
        "linears": linears,
    }


def apply_compaction_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Give ``model`` (freshly built, same class and arguments as the one compacted) the structure in ``plan``, in
    place, so that the compacted ``state_dict`` loads (``torch.load(..., weights_only=True)`` then
    ``load_state_dict``): zero residual branches are cut out, channels are sliced, then the named ``nn.Conv2d``
    layers become :class:`CompactConv2d`.

    Also accepts the version-1 plan (a mapping of conv name -> spec, convs only).
    Raises ``ValueError`` naming the layer when the model does not match the plan.
    """
    if "version" not in plan:  # version 1: {conv name: spec}
        plan = {"version": 1, "channels": ChannelPlan().to_dict(), "convs": plan}
    if plan["version"] not in (1, PLAN_VERSION):
        raise ValueError(
            f"compaction plan version {plan['version']!r} is not supported (this is version {PLAN_VERSION})"
        )
    depth = list(plan.get("depth", []))
    apply_depth_plan(model, depth)
    channel_plan = ChannelPlan.from_dict(plan.get("channels", {}))
    apply_channel_plan(model, channel_plan)
    setattr(model, _PLAN_ATTR, {"depth": depth, "channels": channel_plan.to_dict()})
    for name, spec in plan.get("convs", {}).items():
        try:
            conv = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"compaction plan names {name!r}, which this model does not have") from err
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"compaction plan names {name!r}, which is a {type(conv).__name__}, not an nn.Conv2d")
        groups = conv.groups
        k_total = conv.in_channels // groups * conv.kernel_size[0] * conv.kernel_size[1]
        rows = torch.zeros(conv.out_channels, dtype=torch.bool)
        rows[torch.tensor(spec["row_idx"], dtype=torch.long)] = True
        cols = torch.zeros(groups, k_total, dtype=torch.bool)
        col_idx, col_ptr = spec["col_idx"], spec["col_ptr"]
        if len(col_ptr) != groups + 1 or (col_idx and max(col_idx) >= k_total):
            raise ValueError(f"compaction plan for {name!r} does not fit its conv ({conv})")
        for g in range(groups):
            cols[g, torch.tensor(col_idx[col_ptr[g] : col_ptr[g + 1]], dtype=torch.long)] = True
        fast = CompactConv2d(conv, rows, cols, spec["impl"], spec["compact_output"], spec.get("align", 8))
        model.set_submodule(name, fast)
    for name, spec in plan.get("linears", {}).items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"compaction plan names {name!r}, which this model does not have") from err
        if not isinstance(linear, nn.Linear) or (spec["in_idx"] and max(spec["in_idx"]) >= linear.in_features):
            raise ValueError(f"compaction plan for {name!r} does not fit it ({linear})")
        model.set_submodule(name, CompactLinear(linear, torch.tensor(spec["in_idx"], dtype=torch.long)))
    return model


CHECKPOINT_KEY = "ssl_lightning_compaction"  # Lightning checkpoint entry: {submodule path: plan}


def compaction_plans(root: nn.Module) -> dict[str, dict[str, Any]]:
    """The plan of every compacted submodule of ``root`` (outermost ones; ``""`` is ``root`` itself), e.g.
    ``{"model": plan}`` for a LightningModule whose ``model`` was compacted. Plain data: store it anywhere."""
    plans: dict[str, dict[str, Any]] = {}
    for name, mod in root.named_modules():
        if hasattr(mod, _PLAN_ATTR) and not any(name.startswith(f"{p}.") or p == "" for p in plans):
            plans[name] = compaction_plan(mod)
    return plans


def restore_compaction(root: nn.Module, plans: dict[str, dict[str, Any]]) -> nn.Module:
    """Give the submodules of a freshly built ``root`` the compacted structure in ``plans`` (from
    :func:`compaction_plans`), in place, so that the compacted state_dict loads strictly."""
    for name, plan in plans.items():
        try:
            sub = root.get_submodule(name) if name else root
        except AttributeError as err:
            raise ValueError(
                f"stored compaction plan names submodule {name!r}, which this model does not have"
            ) from err
        if hasattr(sub, _PLAN_ATTR):
            continue  # already compacted (e.g. the checkpoint is loaded into the compacted module itself)
        apply_compaction_plan(sub, plan)
    return root


STATE_DICT_KEY = "_ssl_lightning_compaction"  # state_dict entry of a compacted CompactionCheckpointing module


class CompactionCheckpointing:
    """LightningModule mixin: checkpoints carry the compaction plan and loading rebuilds the compacted structure
    first, so ``load_from_checkpoint`` and ``Trainer.fit(ckpt_path=...)`` work after ``compact``.

    Its ``state_dict()`` also carries the plans (entry ``_ssl_lightning_compaction``, plain data, only once
    something was compacted), and ``load_state_dict`` rebuilds the structure from it before loading: a
    compacted state_dict loads into a freshly built, dense module. That is how the main process of
    ``ddp_spawn`` receives a model compacted in its workers (Lightning sends back only a state_dict).

    Use as ``class MyModule(CompactionCheckpointing, LightningModule)``; or call :func:`compaction_plans` /
    :func:`restore_compaction` from your own ``on_save_checkpoint`` / ``on_load_checkpoint``.
    """

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        assert isinstance(self, nn.Module)
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        plans = compaction_plans(self)
        if plans:
            destination[prefix + STATE_DICT_KEY] = plans

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        assert isinstance(self, nn.Module)
        plans = state_dict.pop(prefix + STATE_DICT_KEY, None)
        if plans is not None:  # before the children load: they must have the compacted shapes
            restore_compaction(self, plans)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert isinstance(self, nn.Module)
        plans = compaction_plans(self)
        if plans:
            checkpoint[CHECKPOINT_KEY] = plans
        parent = super()
        if hasattr(parent, "on_save_checkpoint"):
            parent.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert isinstance(self, nn.Module)
        if CHECKPOINT_KEY in checkpoint:
            restore_compaction(self, checkpoint[CHECKPOINT_KEY])
        parent = super()
        if hasattr(parent, "on_load_checkpoint"):
            parent.on_load_checkpoint(checkpoint)


def transfer_optimizer_state(
    optimizers: Sequence[torch.optim.Optimizer], root: nn.Module, name: str, dense: nn.Module, compacted: nn.Module
) -> None:
    """After ``root.<name>`` was replaced by ``compacted`` (made from ``dense`` by :func:`compact`), point every
    optimizer at the compacted parameters and carry their per-parameter state (SGD momentum, Adam moments)
    through the same compaction plan: the state tensors are sliced, packed and folded exactly like the weights,
    so fine-tuning continues where it was. A parameter the compaction created (a folded bias) starts with
    zero state in the param group of its layer's weight."""
    plan = compaction_plan(compacted)
    prefix = f"{name}." if name else ""
    old_named = {prefix + n: p for n, p in dense.named_parameters()}
    new_named = {prefix + n: p for n, p in compacted.named_parameters()}
    old_ids = {id(p): n for n, p in old_named.items()}

    def counterpart(n: str) -> str | None:  # the old parameter a new one continues (wrappers add ".conv.")
        for cand in (n, n.replace(".conv.", ".")):
            if cand in old_named:
                return cand
        return None

    for opt in optimizers:
        group_of = {
            old_ids[id(p)]: gi for gi, g in enumerate(opt.param_groups) for p in g["params"] if id(p) in old_ids
        }
        if not group_of:
            continue
        keys = {
            k
            for n in group_of
            for k, v in opt.state.get(old_named[n], {}).items()
            if isinstance(v, Tensor) and v.shape == old_named[n].shape
        }
        shadows: dict[str, dict[str, Tensor]] = {}
        for k in sorted(keys):  # one shadow model per state tensor kind, compacted by the same plan
            shadow = copy.deepcopy(dense)
            with torch.no_grad():
                for n, p in shadow.named_parameters():
                    st = opt.state.get(old_named[prefix + n], {}).get(k)
                    p.copy_(st if isinstance(st, Tensor) and st.shape == p.shape else torch.zeros_like(p))
            apply_compaction_plan(shadow, plan)
            shadows[k] = {prefix + n: p.detach() for n, p in shadow.named_parameters()}
        default = min(group_of.values())
        added: dict[int, list[Tensor]] = {}
        new_state: dict[Tensor, dict[str, Any]] = {}
        for n, p in new_named.items():
            old = counterpart(n)
            if old is None:  # a folded bias: the group of its layer's weight
                sibling = counterpart(n.rsplit(".", 1)[0] + ".weight")
                if sibling is not None and sibling not in group_of:
                    continue  # its layer is not optimized (frozen): neither is the new bias
                gi = group_of[sibling] if sibling is not None else default
            elif old in group_of:
                gi = group_of[old]
            else:
                continue  # not optimized before: stays that way
            added.setdefault(gi, []).append(p)
            state: dict[str, Any] = {}
            for k, v in (opt.state.get(old_named[old], {}) if old else {}).items():
                if k in shadows:
                    state[k] = shadows[k][n].clone().to(p)
                elif isinstance(v, Tensor):
                    state[k] = v.clone()  # scalars such as Adam's step
                else:
                    state[k] = v
            if state:
                new_state[p] = state
        for p in old_named.values():
            opt.state.pop(p, None)
        opt.state.update(new_state)
        for gi, group in enumerate(opt.param_groups):
            group["params"] = [p for p in group["params"] if id(p) not in old_ids] + added.get(gi, [])

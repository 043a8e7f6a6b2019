"""Compaction plans: the plain-data description of how a model was compacted, applied again to a freshly built
model so that a compacted ``state_dict`` loads; and the LightningModule mixin that keeps checkpoints and
state_dicts of compacted models loadable."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from ssl_lightning.compaction.channels import ChannelPlan, apply_channel_plan
from ssl_lightning.compaction.depth import apply_depth_plan
from ssl_lightning.compaction.layers import Choice, CompactConv2d, CompactLinear

__all__ = [
    "CHECKPOINT_KEY",
    "PLAN_VERSION",
    "STATE_DICT_KEY",
    "CompactionCheckpointing",
    "apply_compaction_plan",
    "compaction_plan",
    "compaction_plans",
    "restore_compaction",
]

PLAN_VERSION = 3  # 3: a conv's "impl" is its pin ("auto": chosen where it runs); 1-2 stored the choice made
PLAN_ATTR = "_ssl_lightning_plan"  # depth + channel plan ride on the compacted model (kept by deepcopy)


def compaction_plan(model: nn.Module) -> dict[str, Any]:
    """A JSON-serializable description of how ``model`` was compacted: the channels each module keeps and every
    :class:`CompactConv2d` (kept rows / columns, and its pinned implementation or ``"auto"``: a choice made by
    measurement is not part of the plan, the machine that runs the model makes its own). Enough to rebuild the
    module structure from a freshly built model before loading the compacted weights
    (see :func:`apply_compaction_plan`)."""
    convs: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, CompactConv2d):
            convs[name] = {
                "impl": mod.pinned or "auto",
                "compact_output": mod.compact_output,
                "align": mod.align,
                "row_idx": mod.row_idx.tolist(),
                "col_idx": mod.col_idx.tolist(),
                "col_ptr": mod.col_ptr.tolist(),
            }
    linears = {n: {"in_idx": m.in_idx.tolist()} for n, m in model.named_modules() if isinstance(m, CompactLinear)}
    stored = getattr(model, PLAN_ATTR, None) or {}
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

    Also accepts version-1 plans (a mapping of conv name -> spec, convs only) and version-2 plans; their
    "impl" was the choice made where the model was compacted: it is not kept (the layers choose again here),
    and their state dicts, which hold each weight in that implementation's layout, load all the same.
    Raises ``ValueError`` naming the layer when the model does not match the plan.
    """
    if "version" not in plan:  # version 1: {conv name: spec}
        plan = {"version": 1, "channels": ChannelPlan().to_dict(), "convs": plan}
    if plan["version"] not in (1, 2, PLAN_VERSION):
        raise ValueError(
            f"compaction plan version {plan['version']!r} is not supported (this is version {PLAN_VERSION})"
        )
    depth = list(plan.get("depth", []))
    apply_depth_plan(model, depth)
    channel_plan = ChannelPlan.from_dict(plan.get("channels", {}))
    apply_channel_plan(model, channel_plan)
    setattr(model, PLAN_ATTR, {"depth": depth, "channels": channel_plan.to_dict()})
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
        impl = spec.get("impl", "auto") if plan["version"] >= 3 else "auto"
        if impl not in ("auto", "fused", "rows", "dense"):
            raise ValueError(f"compaction plan for {name!r}: impl must be auto, fused, rows or dense, got {impl!r}")
        fast = CompactConv2d(conv, rows, cols, cast(Choice, impl), spec["compact_output"], spec.get("align", 8))
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
        if hasattr(mod, PLAN_ATTR) and not any(name.startswith(f"{p}.") or p == "" for p in plans):
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
        if hasattr(sub, PLAN_ATTR):
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

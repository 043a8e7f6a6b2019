"""Compaction: turn learned zero groups into faster modules, equivalence-checked.

This first stage replaces, layer by layer, every ``nn.Conv2d`` whose lowered weight has all-zero rows
(filters) or columns (filter-shape fibers) with a drop-in :class:`~ssl_lightning.CompactConv2d`
(full-width output, so nothing around it changes), keeping the original conv wherever the fused or
row-only implementation does not measure faster on the layer's real input. Removing channels across
layers (BN, consumers, residual adds, concat, flatten→Linear, whole branches) builds on the channel
analysis in :mod:`ssl_lightning.graph` and is the next stage.
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

from ssl_lightning.compact_conv import CompactConv2d
from ssl_lightning.ops import lowered_nonzero

__all__ = [
    "CompactionError",
    "CompactionResult",
    "apply_compaction_plan",
    "compact",
    "compact_with_info",
    "compaction_plan",
]


class CompactionError(RuntimeError):
    """The compacted model does not reproduce the original; names the first layer that differs."""


@dataclass
class CompactionResult:
    model: nn.Module
    replaced: dict[str, str] = field(default_factory=dict)  # layer name -> implementation chosen
    kept_dense: list[str] = field(default_factory=list)  # sparse layers where the dense conv was fastest
    max_abs_error: float = 0.0


def _as_tuple(x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    with torch.no_grad():
        leaves, _ = tree_flatten(model(*inputs))
    return [t for t in leaves if isinstance(t, Tensor)]


def _layer_outputs(model: nn.Module, names: Sequence[str], inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_hook(lambda _m, _i, y, n=n: out.__setitem__(n, y.detach().clone())) for n in names
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
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> nn.Module:
    """A compacted, equivalence-checked copy of ``model`` (see :func:`compact_with_info`)."""
    return compact_with_info(
        model, example_inputs, measure=measure, align=align, verify=verify, rtol=rtol, atol=atol
    ).model


def compact_with_info(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    measure: bool = True,
    align: int = 8,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> CompactionResult:
    """Return a compacted copy of ``model`` (the original is untouched), evaluated in eval mode.

    measure: pick each layer's implementation by timing it on the input it sees for ``example_inputs``
    (else from the kept fractions). verify: check the compacted model against the original on the
    example and two random inputs of the same shapes; raise :class:`CompactionError` naming the first
    layer whose output differs beyond ``rtol``/``atol`` (relative to the layer's output scale).
    """
    inputs = _as_tuple(example_inputs)
    original = model
    was_training = original.training
    original.eval()
    new = copy.deepcopy(original).eval()
    convs = {n: m for n, m in new.named_modules() if isinstance(m, nn.Conv2d)}
    for name, conv in convs.items():
        if type(conv) is not nn.Conv2d:
            warnings.warn(
                f"compact: {name} is a {type(conv).__name__} (a Conv2d subclass with its own forward); left dense",
                stacklevel=2,
            )
    convs = {n: m for n, m in convs.items() if type(m) is nn.Conv2d}
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, args[0].detach()))
        for n, m in convs.items()
    ]
    try:
        _outputs(new, inputs)
    finally:
        for h in hooks:
            h.remove()
    result = CompactionResult(new)
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
    if verify:
        result.max_abs_error = _verify(original, new, inputs, list(result.replaced), rtol, atol)
    original.train(was_training)
    return result


def _verify(
    original: nn.Module, new: nn.Module, inputs: tuple[Tensor, ...], replaced: list[str], rtol: float, atol: float
) -> float:
    g = torch.Generator().manual_seed(0)
    trials = [inputs] + [
        tuple(torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) * t.std() + t.mean() for t in inputs)
        if all(t.is_floating_point() for t in inputs)
        else inputs
        for _ in range(2)
    ]
    worst = 0.0
    for trial in trials:
        a, b = _outputs(original, trial), _outputs(new, trial)
        bad = len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=False))
        for x, y in zip(a, b, strict=False):
            if x.shape != y.shape:
                continue
            err = float((x - y).abs().max()) if x.numel() else 0.0
            worst = max(worst, err)
            scale = float(x.abs().max()) if x.numel() else 0.0
            bad = bad or err > atol + rtol * scale
        if bad:
            ref = _layer_outputs(original, replaced, trial)
            got = _layer_outputs(new, replaced, trial)
            for name in replaced:  # in module registration order
                want, have = ref.get(name), got.get(name)
                if want is not None and have is not None:
                    err = float((want - have).abs().max())
                    if err > atol + rtol * float(want.abs().max()):
                        raise CompactionError(f"compacted layer {name} differs from the original by {err:.3g}")
            raise CompactionError(
                f"compacted model output differs from the original by {worst:.3g}, but every replaced layer "
                "matches on its own; a module depends on something the compaction changed"
            )
    return worst


def compaction_plan(model: nn.Module) -> dict[str, dict[str, Any]]:
    """A JSON-serializable description of every :class:`CompactConv2d` in ``model`` (layer name -> kept
    rows / columns and implementation), enough to rebuild the module structure before loading weights."""
    plan: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, CompactConv2d):
            plan[name] = {
                "impl": mod.impl,
                "compact_output": mod.compact_output,
                "align": mod.align,
                "row_idx": mod.row_idx.tolist(),
                "col_idx": mod.col_idx.tolist(),
                "col_ptr": mod.col_ptr.tolist(),
            }
    return plan


def apply_compaction_plan(model: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace, in place, the ``nn.Conv2d`` layers named in ``plan`` by their :class:`CompactConv2d` form so that
    a compacted ``state_dict`` loads (``torch.load(..., weights_only=True)`` then ``load_state_dict``).

    Raises ``ValueError`` naming the layer when the model does not match the plan.
    """
    for name, spec in plan.items():
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
    return model

"""The compaction stages (depth, channels, compacted layers) on a copy of the model, and the check that the
result computes what the original does (see the package docstring)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized
from torch.utils._pytree import tree_flatten

from ssl_lightning.compaction.channels import ChannelPlan, apply_channel_plan, plan_channel_removal
from ssl_lightning.compaction.depth import plan_and_remove_depth
from ssl_lightning.compaction.layers import (
    COMPACT_MAX_KEPT_WORK,
    CompactConv2d,
    CompactLinear,
    _numeric_zero_padding,
)
from ssl_lightning.compaction.plans import PLAN_ATTR
from ssl_lightning.graph import capture_inputs, own_forward
from ssl_lightning.ops import lowered_nonzero

__all__ = ["CompactionError", "CompactionResult", "compact", "compact_with_info"]


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
    align: int | Literal["auto"] = "auto",
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
    align: int | Literal["auto"] = "auto",
    channels: bool = True,
    shapes: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> CompactionResult:
    """Return a compacted copy of ``model`` (the original is untouched), built and checked in eval mode
    (BN running statistics; constants are folded for them) and returned in the mode ``model`` was in.

    measure: time each layer's implementations on the input it sees for ``example_inputs`` now (else from
    the kept fractions); a conv that runs dense here but has more than 20 % of its MACs removed is compacted
    all the same, since the machine that runs the model chooses again (:class:`CompactConv2d`).
    align: kept channel counts (and the row-only conv's filter counts) are rounded up to a multiple of this,
    since oneDNN/cuDNN are slower on odd counts; 1 keeps exactly the needed channels. "auto" (default): per
    channel space, the exact count or the one rounded up to 8, whichever runs the space's producer and
    consumer layers faster on their inputs here (``measure=True``), else by the cost model
    (``channels.modeled_count``: rounded when that adds at most 25 % of the kept channels).
    channels: cut zero residual branches and remove channels across layers (stages 0-1).
    shapes: swap layers with remaining zero rows / columns for ``CompactConv2d`` / ``CompactLinear``
    (stage 2); ``shapes=False`` leaves only plain PyTorch modules (e.g. for ONNX export).
    verify: check the compacted model against the original on the example and two random inputs of the
    same shapes; raise :class:`CompactionError` naming the first layer whose output differs beyond
    ``rtol``/``atol`` (relative to the layer's output scale).
    """
    if align != "auto" and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be 'auto' or an integer >= 1, got {align!r}")
    step = 8 if align == "auto" else align
    counts: Literal["fixed", "modeled", "measured"] = (
        ("measured" if measure else "modeled") if align == "auto" else "fixed"
    )
    inputs = _as_tuple(example_inputs)
    was_training = model.training
    original = model
    try:
        original.eval()
        if verify:
            _check_finite(_outputs(original, inputs), "the model's output on the example inputs")
        new = copy.deepcopy(original).eval()
        _numeric_padding(new)
        plan = ChannelPlan()
        depth: list[dict[str, Any]] = []
        notes: list[str] = []
        if channels:
            trials = _trials(inputs)
            depth, notes = plan_and_remove_depth(new, trials, _run)
            try:
                plan, corrections = plan_channel_removal(new, trials, _run, align=step, counts=counts)
            except RuntimeError as err:  # the model fails while channels are measured: convs are still swapped
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
        setattr(new, PLAN_ATTR, {"depth": depth, "channels": plan.to_dict()})
        convs = {n: m for n, m in new.named_modules() if isinstance(m, nn.Conv2d)}
        for name, conv in convs.items():
            if own_forward(conv) or is_parametrized(conv):
                warnings.warn(
                    f"compact: {name} is a {type(conv).__name__} (a Conv2d subclass with its own forward or "
                    "weight parametrization); left dense",
                    stacklevel=2,
                )
        convs = {n: m for n, m in convs.items() if _plain(m) and shapes}
        linears = {n: m for n, m in new.named_modules() if isinstance(m, nn.Linear) and _plain(m) and shapes}
        try:
            captured = capture_inputs(new, [*convs, *linears], [inputs], _run)  # the input each layer sees
        except Exception as err:
            raise _misread(err) from err
        seen = {n: xs[0] for n, xs in captured.items() if xs}
        result = CompactionResult(new, channels=plan, depth=depth, notes=notes)
        for name, conv in convs.items():
            rows, cols = lowered_nonzero(conv.weight.detach(), conv.groups)
            removed = not (bool(rows.all()) and bool(cols.all()))
            if not removed and not (measure and name in seen):
                continue  # nothing learned to remove (and no measurement that the fused op runs it faster)
            if name not in seen:
                warnings.warn(f"compact: {name} is not reached by the example inputs; left dense", stacklevel=2)
                continue
            if not removed and not _numeric_zero_padding(conv):
                continue
            x = seen[name]
            fast = CompactConv2d.from_conv(conv, example_input=x if measure else None, align=step)
            chosen = fast.impl
            # The wrapper also stays where the fused op wins on a single sample (deployments often run batch 1;
            # oneDNN is weakest there on few channels), since it chooses per input shape where it runs.
            keep_plain = chosen == "dense" and fast.kept_work > COMPACT_MAX_KEPT_WORK
            if keep_plain and measure and x.dim() > 0 and x.shape[0] > 1:
                keep_plain = fast.tune(x[:1]) == "dense"
            if keep_plain:
                # the dense conv is as fast here and little is removed: keep the plain module (no wrapper on the
                # hot path). A layer with more to gain is compacted even when this machine (busy, or another
                # ISA) runs it dense: the machine that runs the model chooses again.
                if removed:
                    result.kept_dense.append(name)
                continue
            new.set_submodule(name, fast.eval())
            result.replaced[name] = chosen
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
        new.train(was_training)  # the mode of the model given (a compacted model is trained on like the original)
        return result
    finally:
        original.train(was_training)  # also when compaction fails: the caller's model keeps its mode


def _misread(err: Exception) -> CompactionError:
    """A compacted model that does not run: a graph the analysis misread; say so instead of a bare shape error."""
    return CompactionError(
        f"the compacted model fails on an input of the example's shape ({type(err).__name__}: {err}); the "
        "channel analysis misread this model: compact with channels=False, and please report it"
    )


def _plain(layer: nn.Module) -> bool:
    return not own_forward(layer) and not is_parametrized(layer)


def _numeric_padding(model: nn.Module) -> None:
    """``padding='valid'`` / ``'same'`` (odd effective kernels) as the numbers they mean, so those convs can be
    compacted like any other; an even kernel's asymmetric 'same' padding stays a string (dense)."""
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and isinstance(conv.padding, str) and not own_forward(conv):
            if conv.padding == "valid":
                conv.padding = (0, 0)
            else:
                total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
                if all(t % 2 == 0 for t in total):
                    conv.padding = (total[0] // 2, total[1] // 2)


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
        a = _outputs(original, trial)
        try:
            b = _outputs(new, trial)
        except Exception as run_err:
            raise _misread(run_err) from run_err
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

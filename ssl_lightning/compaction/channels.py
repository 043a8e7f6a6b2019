"""Channel removal: physically drop channels that no longer carry information, across coupled layers.

A *channel space* (from :mod:`ssl_lightning.graph`) is a set of channels that live together: the output
rows of its producers (conv filters / Linear neurons + bias), one slice of each passthrough module
(BatchNorm, depthwise conv, per-channel PReLU) and an input slice of each consumer (next conv, Linear
after flatten, every branch joined by a residual add or laid side by side by a concat). Channel ``c``
of a space is removed when every consumer can do without it:

* the consumer's weight slice for ``c`` is all zero (channel-wise sparsity: the channel is ignored), or
* the channel is *structurally constant* (every producer's row is zero, so only biases and shifts flow
  on; a constant measured without that could be a ReLU that merely never fired on the examples) and the
  value measured at the consumer's input is constant over the example inputs. The constant is then
  folded: into the bias of a Linear (one value per flattened position is allowed) or of a conv without
  zero padding; behind zero padding it reaches border outputs only through the in-bounds taps, so the
  conv is wrapped in :class:`PaddedFoldConv2d`, which adds that per-position map.

Through an ``nn.LocalResponseNorm`` only channels that are exactly zero at its input can go (they add
nothing to their neighbours' windows); it becomes :class:`SparseChannelLRN`. Spaces that reach the model
output or input, pass an op the analysis does not follow, pass a functional LRN or one over joined layers,
or touch a module called twice are left alone. The plan is plain data
(:class:`ChannelPlan`), so the same slicing rebuilds a compacted model's structure before loading its
weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning.graph import ChannelSpace, analyze, capture_inputs, own_forward
from ssl_lightning.timing import NOISE_LIMIT, choose, interleaved_times

__all__ = ["ChannelPlan", "PaddedFoldConv2d", "SparseChannelLRN", "apply_channel_plan", "plan_channel_removal"]


class PaddedFoldConv2d(nn.Module):
    """``conv(x)`` plus what removed constant input channels contributed behind zero padding.

    A constant channel value v_r reaches output (y, x) only through the kernel taps (i, j) that fall inside the
    input, so its contribution is a map, not a bias: ``Σ_ij taps[o, i, j]·inside_row(y, i)·inside_col(x, j)``
    with ``taps[o] = Σ_r v_r·W[o, r]``. Only ``fold_taps`` [out, kh, kw] is stored (the removed channels'
    kernels weighted by their constants: the size of one input channel's weights). The [out, Ho, Wo] map for
    the input size seen at compaction (``size``) is kept as a non-persistent buffer, so the forward adds it
    like a bias and the saved model holds only the taps; another input size rebuilds the map from two 0/1
    matrices. State dicts of the earlier format (``fold_weight``, ``fold_value``, ``border``) still load.
    """

    fold_taps: Tensor
    cached_map: Tensor

    def __init__(self, conv: nn.Module, fold_taps: Tensor, size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)  # type: ignore[arg-type]
        self.dilation = tuple(conv.dilation)  # type: ignore[arg-type]
        self.kernel_size = tuple(conv.kernel_size)  # type: ignore[arg-type]
        self.register_buffer("fold_taps", fold_taps.detach().clone())
        self.size = (int(size[0]), int(size[1])) if size is not None else None  # input [H, W] of the cached map
        self.register_buffer("cached_map", self._map_for_size(), persistent=False)

    def _map_for_size(self) -> Tensor:
        """The map for ``self.size`` (empty without one): rebuilt whenever the taps change."""
        if self.size is None:
            return self.fold_taps.new_zeros(0)
        h, w = self.size
        ho, wo = (
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride, strict=True)
        )
        return self.border(h, w, ho, wo)

    @staticmethod
    def _inside(size: int, out: int, k: int, s: int, p: int, d: int, like: Tensor) -> Tensor:
        """[out, k] 1.0 where tap i of output position y reads inside the input (y·s − p + i·d in [0, size))."""
        pos = torch.arange(out, device=like.device)[:, None] * s - p + torch.arange(k, device=like.device) * d
        return ((pos >= 0) & (pos < size)).to(like.dtype)

    def border(self, h: int, w: int, ho: int, wo: int) -> Tensor:
        """The removed constants' contribution [out, ho, wo] for an [h, w] input."""
        taps = self.fold_taps
        rows = self._inside(h, ho, taps.shape[1], self.stride[0], self.padding[0], self.dilation[0], taps)
        cols = self._inside(w, wo, taps.shape[2], self.stride[1], self.padding[1], self.dilation[1], taps)
        return torch.einsum("yi,oij,xj->oyx", rows, taps, cols)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.size is not None and tuple(x.shape[-2:]) == self.size:  # the compaction's input size: no rebuild
            return y + self.cached_map.to(y.dtype)
        return y + self.border(x.shape[-2], x.shape[-1], y.shape[-2], y.shape[-1]).to(y.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        fw, fv = state_dict.pop(prefix + "fold_weight", None), state_dict.pop(prefix + "fold_value", None)
        state_dict.pop(prefix + "border", None)  # the earlier format's saved map: rebuilt from the taps
        if fw is not None and fv is not None and prefix + "fold_taps" not in state_dict:
            state_dict[prefix + "fold_taps"] = torch.einsum("orij,r->oij", fw, fv.to(fw.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.cached_map = self._map_for_size()  # the loaded taps


@dataclass
class ChannelPlan:
    """Which channels each module keeps, as index lists into its original channels.

    out_keep: producer / passthrough modules -> kept output channels (conv filters, Linear neurons, BN channels).
    in_keep: consumers -> kept input channels (conv) or input features (Linear).
    folds: consumers whose bias receives folded constants (a bias is created when the module had none).
    padded: zero-padded conv consumers that lost nonzero constant channels -> {"removed": R, "size": [H, W]};
        they become :class:`PaddedFoldConv2d` (the constants' per-position contribution, border taps included).
    kept_constant: notes on channels that could not be folded, for the report.
    """

    out_keep: dict[str, list[int]] = field(default_factory=dict)
    in_keep: dict[str, list[int]] = field(default_factory=dict)
    folds: list[str] = field(default_factory=list)
    padded: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_constant: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # spaces left whole, with the reason
    unsupported: list[str] = field(default_factory=list)  # modules / ops the graph analysis cannot follow
    # LRN modules that lose channels -> the channel count they saw; they become SparseChannelLRN
    sparse_lrn: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "out_keep": self.out_keep, "in_keep": self.in_keep, "folds": self.folds, "padded": self.padded,
            "sparse_lrn": self.sparse_lrn,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ChannelPlan:
        out_keep = d.get("out_keep", {})
        in_keep = d.get("in_keep", {})
        folds = d.get("folds", [])
        if not (isinstance(out_keep, dict) and isinstance(in_keep, dict) and isinstance(folds, list)):
            raise ValueError("channel plan needs 'out_keep' and 'in_keep' mappings and a 'folds' list")
        padded = d.get("padded", {})
        sparse_lrn = d.get("sparse_lrn", {})  # absent from plans written before LRN support
        if not isinstance(padded, dict) or not isinstance(sparse_lrn, dict):
            raise ValueError("channel plan 'padded' and 'sparse_lrn' must be mappings")
        return cls({str(k): list(v) for k, v in out_keep.items()}, {str(k): list(v) for k, v in in_keep.items()},
                   [str(f) for f in folds], {str(k): dict(v) for k, v in padded.items()},
                   sparse_lrn={str(k): int(v) for k, v in sparse_lrn.items()})  # fmt: skip


class SparseChannelLRN(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` over the kept channels of a compacted layer, each normalised over the window of
    its original neighbours: the input is placed back at its original channel positions (the removed ones are
    exactly zero there, which is why they could be removed) and the LRN runs on that, so outputs are exact."""

    channels: Tensor

    def __init__(self, size: int, alpha: float, beta: float, k: float, total: int, channels: Tensor) -> None:
        super().__init__(size, alpha, beta, k)
        self.total = total  # channel count of the original layer
        self.register_buffer("channels", channels.to(torch.long).clone())  # kept positions, ascending

    @classmethod
    def from_lrn(cls, lrn: nn.LocalResponseNorm, n: int, keep: Tensor) -> SparseChannelLRN:
        """``lrn`` saw ``n`` channels and keeps ``keep`` of them (indices into those ``n``)."""
        if isinstance(lrn, SparseChannelLRN):  # compacted again: compose with the positions it already has
            _check_index("LRN", keep, lrn.channels.numel())
            return cls(lrn.size, lrn.alpha, lrn.beta, lrn.k, lrn.total, lrn.channels[keep])
        _check_index("LRN", keep, n)
        return cls(lrn.size, lrn.alpha, lrn.beta, lrn.k, n, keep)

    def forward(self, x: Tensor) -> Tensor:
        full = x.new_zeros((x.shape[0], self.total, *x.shape[2:]))
        full = full.index_copy(1, self.channels, x)
        return F.local_response_norm(full, self.size, self.alpha, self.beta, self.k).index_select(1, self.channels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels={self.channels.numel()}/{self.total}"


def _weight(mod: nn.Module) -> Tensor:
    """A CPU copy of the module's weight: planning is bookkeeping, done on CPU whatever the model's device."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(mod).__name__} has no weight tensor")
    return w.detach().cpu()


def _rows_zero(mod: nn.Module) -> Tensor | None:
    """[out] bool: producer rows whose weights are all zero (bias may be anything)."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor):
        return None
    if isinstance(mod, nn.ConvTranspose2d):  # [in, out, kh, kw]: output channel j is w[:, j]
        w = w.transpose(0, 1)
    return (w.detach().reshape(w.shape[0], -1) == 0).all(1).cpu()


def _dense_taps(conv: nn.Conv2d, channels: Tensor) -> Tensor:
    """[out, len(channels), kh, kw]: each listed input channel's kernel taps for every output row (zeros for
    rows of other groups in a grouped conv)."""
    w = _weight(conv)
    g = conv.groups
    og, ig = w.shape[0] // g, w.shape[1]
    out = w.new_zeros(w.shape[0], channels.numel(), w.shape[2], w.shape[3])
    for r, c in enumerate(channels.tolist()):
        j, local = divmod(c, ig)
        out[j * og : (j + 1) * og, r] = w[j * og : (j + 1) * og, local]
    return out


def _consumer_slice_zero(mod: nn.Module, off: int, size: int, hw: int) -> Tensor:
    """[size] bool: consumer ignores the channel (its input-weight slice is all zero)."""
    w = _weight(mod)
    if isinstance(mod, nn.ConvTranspose2d):  # [in, out, kh, kw]: input channel c is w[c]
        return (w[off : off + size].flatten(1) == 0).all(1)
    if isinstance(mod, nn.Conv2d) and mod.groups > 1:  # channel c lives in the rows of group c // (in/g)
        g = mod.groups
        zero = (w.reshape(g, w.shape[0] // g, w.shape[1], -1) == 0).all(3).all(1)  # [g, in/g]
        return zero.flatten()[off : off + size]
    if isinstance(mod, nn.Conv2d):
        return (w[:, off : off + size] == 0).flatten(2).all(2).all(0)
    return (w[:, off * hw : (off + size) * hw].reshape(w.shape[0], size, hw) == 0).all(2).all(0)


def _equal_blocks(removable: Tensor, sp: ChannelSpace, modules: dict[str, nn.Module], align: int = 1) -> Tensor:
    """Grouped convs need the same number of channels in each of their groups (rounded up to ``align`` per
    group): bring back removable channels (largest producer weights first) in blocks that keep fewer, until
    every grouped producer / consumer agrees."""
    blocks = {
        m.groups
        for name in sp.producers + [c for c, _, _ in sp.consumers]
        if isinstance(m := modules[name], nn.Conv2d) and 1 < m.groups < m.in_channels
    }
    if not blocks:
        return removable
    n = removable.numel()
    score = _producer_norms(sp, modules, n)
    out = removable.clone()
    changed = True
    while changed:
        changed = False
        for g in sorted(blocks):
            kept = (~out).view(g, n // g).sum(1)
            target = min(n // g, -(-int(kept.max()) // align) * align)
            for j in range(g):
                need = target - int(kept[j])
                if need > 0:
                    idx = torch.arange(j * (n // g), (j + 1) * (n // g))
                    cand = idx[out[idx]]
                    back = cand[score[cand].argsort(descending=True, stable=True)[:need]]
                    out[back] = False
                    changed = True
    return out


def _channel_width(mod: nn.Module) -> int:
    """Channels of a channel-wise layer (BN / InstanceNorm, PReLU, depthwise conv)."""
    for attr in ("num_features", "num_parameters", "out_channels"):
        if isinstance(n := getattr(mod, attr, None), int):
            return n
    raise ValueError(f"{type(mod).__name__} is not a channel-wise layer")


def _whole_norm_groups(removable: Tensor, sp: ChannelSpace, modules: dict[str, nn.Module]) -> Tensor:
    """A GroupNorm normalises each group of channels with the group's statistics, which every channel of the
    group enters: a channel may go only with its whole group (then the other groups are unchanged)."""
    out = removable
    for name in sp.passthrough:
        mod = modules.get(name)
        if isinstance(mod, nn.GroupNorm):
            whole = out.view(mod.num_groups, -1).all(1, keepdim=True)
            out = whole.expand(mod.num_groups, out.numel() // mod.num_groups).flatten()
    return out


def plan_channel_removal(
    model: nn.Module,
    trials: Sequence[tuple[Tensor, ...]],
    run: Callable[..., object],
    *,
    align: int = 1,
    rtol: float = 1e-6,
    counts: Literal["fixed", "modeled", "measured"] = "fixed",
) -> tuple[ChannelPlan, dict[str, Tensor]]:
    """Decide which channels ``model`` (in eval mode) can lose, and the bias corrections that keep outputs equal.

    trials: input tuples for measuring constant channels (``run(model, trial)`` runs the model on one).
    align: round every space's kept channel count up to a multiple of this (keeping the removable
    channels with the largest weights), since oneDNN/cuDNN run slower on odd channel counts.
    counts: "fixed" rounds every space up to ``align``; "measured" keeps a space's exact count unless the
    rounded one runs its producer and consumer layers measurably faster on their inputs here
    (:func:`aligned_count`); "modeled" decides per space by :func:`modeled_count`.
    Returns the plan and the values to fold: per consumer, the bias correction [out] to add, and for a
    zero-padded consumer ``"<name>#fold_weight"`` / ``"<name>#fold_value"`` (see :class:`PaddedFoldConv2d`).
    """
    if align < 1:
        raise ValueError(f"align must be an integer >= 1, got {align!r}")
    analysis = analyze(model, trials[0])
    modules = dict(model.named_modules())
    plan = ChannelPlan(unsupported=list(dict.fromkeys(analysis.unsupported)))
    consumers = sorted({c for sp in analysis.spaces for c, _, _ in sp.consumers})
    if counts not in ("fixed", "modeled", "measured"):
        raise ValueError(f"counts must be 'fixed', 'modeled' or 'measured', got {counts!r}")
    measure = counts == "measured"
    producers = sorted({p for sp in analysis.spaces for p in sp.producers} - set(consumers)) if measure else []
    measured = capture_inputs(model, consumers + producers, trials, run)
    corrections: dict[str, Tensor] = {}
    padded: dict[str, tuple[Tensor, Tensor]] = {}  # consumer -> (dense taps [out, R, kh, kw], values [R])
    in_masks: dict[str, Tensor] = {}
    pass_masks: dict[str, Tensor] = {}  # channel-wise layers over a concatenation -> kept channels
    for sp in analysis.spaces:
        reason = _skip_reason(sp, analysis.multi_called, modules)
        if reason:
            plan.skipped.append(f"{'/'.join(sp.producers)}: {reason}")
            continue
        assert sp.size is not None
        n = sp.size
        constant = torch.ones(n, dtype=torch.bool)  # structurally constant (input-independent)
        for name in sp.producers:
            zero = _rows_zero(modules[name])
            constant &= zero if zero is not None else torch.zeros(n, dtype=torch.bool)
        removable = torch.ones(n, dtype=torch.bool)
        zero = constant.clone()  # structurally constant and measured exactly 0 at every consumer
        folds: list[tuple[str, int, int, Tensor]] = []  # consumer, off, hw, values [n, hw] (nan: not constant)
        for name, off, hw in sp.consumers:
            mod = modules[name]
            ignored = _consumer_slice_zero(mod, off, n, hw)
            values = _constant_values(measured[name], mod, off, n, hw, rtol)  # [n, hw], nan where not constant
            zero &= (values == 0).all(1)
            ok = torch.isfinite(values).all(1) & constant
            if isinstance(mod, nn.ConvTranspose2d):  # a constant's share varies with overlaps and borders
                ok &= (values == 0).all(1)
            if isinstance(mod, nn.Conv2d) and _has_padding(mod) and mod.padding_mode != "zeros":
                pass  # reflect / replicate / circular padding repeats the constant: a plain bias fold is exact
            elif isinstance(mod, nn.Conv2d) and _has_padding(mod) and isinstance(mod.padding, str):
                nonzero = ok & (values != 0).any(1) & ~ignored
                for c in nonzero.nonzero().flatten().tolist():
                    plan.kept_constant.append(f"{name} input channel {off + c}: constant {float(values[c, 0]):.3g} "
                                              f"behind padding={mod.padding!r}")  # fmt: skip
                ok &= ~nonzero
            removable &= ignored | ok
            folds.append((name, off, hw, torch.where(ignored[:, None], torch.zeros_like(values), values)))
        if sp.zero_only:  # LRN: a removed channel must add nothing to its neighbours' windows
            removable &= zero
        count: Callable[[int, int], int] | None = None
        if counts == "measured":
            count = partial(aligned_count, sp, modules, measured)
        elif counts == "modeled":
            count = modeled_count
        removable = _equal_blocks(_align(removable, sp, modules, align, count), sp, modules, align)
        removable = _whole_norm_groups(removable, sp, modules)
        if removable.all():  # keep one channel: a zero-width layer is a depth removal, done elsewhere
            removable[0] = False
        if not removable.any():
            continue
        keep = (~removable).nonzero().flatten()
        for name in sp.producers + sp.passthrough:
            if name in sp.offsets:  # over a concatenation: this space's part of the layer's channels
                mask = pass_masks.setdefault(name, torch.ones(_channel_width(modules[name]), dtype=torch.bool))
                mask[sp.offsets[name] + removable.nonzero().flatten()] = False
            else:
                plan.out_keep[name] = keep.tolist()
        for name in sp.zero_only:
            plan.sparse_lrn[name] = n
        for name, off, hw, values in folds:
            mod = modules[name]
            width = mod.in_channels if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d) else _weight(mod).shape[1]
            mask = in_masks.setdefault(name, torch.ones(width, dtype=torch.bool))
            gone = removable.nonzero().flatten()
            if isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and _has_padding(mod):
                mask[off + gone] = False
                live = gone[values[gone, 0] != 0]
                if live.numel():  # nonzero constants behind zero padding: per-position map
                    prev = padded.get(name)
                    fw, fv = _dense_taps(mod, off + live), values[live, 0]
                    padded[name] = (fw, fv) if prev is None else (torch.cat([prev[0], fw], 1), torch.cat([prev[1], fv]))
                    size = list(measured[name][0].shape[-2:])
                    plan.padded[name] = {"removed": int(padded[name][1].numel()), "size": size}
                continue
            if isinstance(mod, nn.ConvTranspose2d):  # only channels that are zero or ignored: nothing to fold
                mask[off + gone] = False
                continue
            if isinstance(mod, nn.Conv2d):
                mask[off + gone] = False
                # an unpadded conv adds v_c * (taps of c summed over the kernel) at every output position
                taps = _dense_taps(mod, off + gone).sum((2, 3))  # [out, removed]
                corr = taps @ values[gone, 0].to(taps.dtype)
            else:
                feats = ((off + gone)[:, None] * hw + torch.arange(hw)).flatten()
                mask[feats] = False
                w = _weight(mod)[:, feats]
                corr = w @ values[gone].flatten().to(w.dtype)
            if bool((corr != 0).any()):
                corrections[name] = corrections.get(name, torch.zeros_like(corr)) + corr
    for name, mask in in_masks.items():
        plan.in_keep[name] = mask.nonzero().flatten().tolist()
    for name, mask in pass_masks.items():
        plan.out_keep[name] = mask.nonzero().flatten().tolist()
    plan.folds = sorted(corrections)
    for name, (fw, fv) in padded.items():
        corrections[f"{name}#fold_weight"], corrections[f"{name}#fold_value"] = fw, fv
    return plan, corrections


def _skip_reason(sp: ChannelSpace, multi: set[str], modules: dict[str, nn.Module]) -> str:
    if sp.blocked:
        return f"blocked by {sp.blocked[0]}"
    if sp.mixing:
        return f"channel-mixing op {sp.mixing[0]}"
    names = sp.producers + sp.passthrough + [c for c, _, _ in sp.consumers]
    shared = sorted(set(names) & multi)
    if shared:
        return f"{shared[0]} is called more than once"
    for name in names:
        mod = modules.get(name)
        if mod is None:  # a per-channel constant buffer (depth removal), sliced along dim 1
            continue
        if (isinstance(mod, nn.Conv2d | nn.Linear) and own_forward(mod)) or (
            type(mod) not in (nn.PReLU, nn.GroupNorm, nn.ConvTranspose2d)
            and not isinstance(
                mod,
                nn.Conv2d
                | nn.Linear
                | nn.modules.batchnorm._BatchNorm
                | nn.modules.instancenorm._InstanceNorm
                | nn.LocalResponseNorm,
            )
        ):
            return f"{name} is a {type(mod).__name__}"
    return ""


def _has_padding(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _constant_values(seen: list[Tensor], mod: nn.Module, off: int, n: int, hw: int, rtol: float) -> Tensor:
    """[n, hw] per-channel (per flattened position for a Linear) value, nan where it varies over the inputs."""
    parts = []
    for x in seen:
        if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d):  # [N, C, H, W] -> [n, N*H*W]: one value per channel
            parts.append(x[:, off : off + n].transpose(0, 1).reshape(n, 1, -1))
        else:  # [N, F] -> [n, hw, N]
            parts.append(x[:, off * hw : (off + n) * hw].reshape(-1, n, hw).permute(1, 2, 0))
    if not parts:  # never reached by the inputs: nothing can be measured
        return torch.full((n, hw), float("nan"))
    v = torch.cat(parts, -1).float().cpu()
    lo, hi = v.amin(-1), v.amax(-1)
    tol = rtol * torch.maximum(lo.abs(), hi.abs()) + 1e-30
    mean = v.mean(-1)
    return torch.where(hi - lo <= tol, mean, torch.full_like(mean, float("nan")))


def _producer_norms(sp: ChannelSpace, modules: dict[str, nn.Module], n: int) -> Tensor:
    """[n] summed weight norm of each channel's producer rows: which removable channels to bring back first."""
    score = torch.zeros(n)
    for name in sp.producers:
        w = _weight(modules[name])
        w = w.transpose(0, 1) if isinstance(modules[name], nn.ConvTranspose2d) else w
        score += w.reshape(n, -1).float().norm(dim=1)
    return score


# Cost model of the kept channel count: rounding up to the alignment pays when the added channels are a small
# share of the kept ones; a handful of channels (LeNet's 2-3 conv1 filters) runs faster exact than padded to 8.
ALIGN_MAX_EXTRA = 0.25


def modeled_count(kept: int, target: int) -> int:
    """The kept channel count the cost model runs: ``target`` (rounded up) when it adds at most
    ``ALIGN_MAX_EXTRA`` of ``kept``, else ``kept``."""
    return target if target - kept <= ALIGN_MAX_EXTRA * kept else kept


def aligned_count(
    sp: ChannelSpace, modules: dict[str, nn.Module], measured: dict[str, list[Tensor]], kept: int, target: int
) -> int:
    """``kept`` or ``target`` channels for space ``sp``, whichever runs its producer and consumer layers faster
    on their captured inputs (stand-in layers of the two widths, timed side by side; the exact count is the
    baseline and the rounded one must win by ``FASTEST_MARGIN``). Spaces whose layers cannot be rebuilt at
    another width (grouped convs, concatenations, other modules), and timings whose exact-count control spread
    more than ``NOISE_LIMIT`` (other load on the machine), get :func:`modeled_count`."""
    layers: list[tuple[nn.Module, Tensor, str]] = []  # module, captured input, role
    for name in sp.producers:
        mod, xs = modules[name], measured.get(name)
        if not xs or not isinstance(mod, (nn.Conv2d, nn.Linear)) or getattr(mod, "groups", 1) != 1:
            return modeled_count(kept, target)
        layers.append((mod, xs[0], "producer"))
    n = sp.size or 0  # set for every space the plan sizes
    for name, off, hw in sp.consumers:
        mod, xs = modules[name], measured.get(name)
        fits = (isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.in_channels == n) or (
            isinstance(mod, nn.Linear) and mod.in_features == n * hw
        )
        if not xs or off != 0 or not fits:
            return modeled_count(kept, target)
        layers.append((mod, xs[0], "consumer"))
    if not layers:
        return modeled_count(kept, target)

    def stand_ins(c: int) -> Callable[[], object]:
        runs: list[tuple[nn.Module, Tensor]] = []
        for mod, x, role in layers:
            if isinstance(mod, nn.Conv2d):
                cin, cout = (mod.in_channels, c) if role == "producer" else (c, mod.out_channels)
                geometry: dict[str, Any] = {
                    k: getattr(mod, k) for k in ("kernel_size", "stride", "padding", "dilation")
                }
                new: nn.Module = nn.Conv2d(
                    cin, cout, **geometry, bias=mod.bias is not None, padding_mode=mod.padding_mode
                )
                if role == "consumer":
                    x = torch.randn(x.shape[0], c, *x.shape[2:], dtype=x.dtype, device=x.device)
            else:
                assert isinstance(mod, nn.Linear)
                hw = mod.in_features // max(n, 1)
                fin, fout = (mod.in_features, c) if role == "producer" else (c * hw, mod.out_features)
                new = nn.Linear(fin, fout, bias=mod.bias is not None)
                if role == "consumer":
                    x = torch.randn(*x.shape[:-1], c * hw, dtype=x.dtype, device=x.device)
            runs.append((new.to(dtype=x.dtype, device=x.device).eval(), x))
        return lambda: [m(x) for m, x in runs]

    spreads: dict[int, float] = {}
    with torch.inference_mode():
        times = interleaved_times({kept: stand_ins(kept), target: stand_ins(target)}, 5, block_seconds=0.01,
                                  stat="min", spreads=spreads)  # fmt: skip
    if spreads.get(kept, 0.0) > NOISE_LIMIT:  # other load disturbed the exact-count control: not a measurement
        return modeled_count(kept, target)
    return choose(times)


def _align(
    removable: Tensor,
    sp: ChannelSpace,
    modules: dict[str, nn.Module],
    align: int,
    count: Callable[[int, int], int] | None = None,
) -> Tensor:
    """``removable`` with enough channels brought back to keep a multiple of ``align`` (or, with ``count``,
    as many as ``count(kept, rounded)`` says)."""
    n = removable.numel()
    kept = int((~removable).sum())
    target = min(n, -(-max(kept, 1) // align) * align)
    if target > kept and count is not None:
        target = count(kept, target)
    if target <= kept:
        return removable
    score = _producer_norms(sp, modules, n)  # bring back the removable channels with the largest weights
    score[~removable] = -1
    back = score.argsort(descending=True, stable=True)[: target - kept]
    out = removable.clone()
    out[back] = False
    return out


def _param(t: Tensor, like: nn.Parameter | Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=like.requires_grad)


def apply_channel_plan(model: nn.Module, plan: ChannelPlan, corrections: dict[str, Tensor] | None = None) -> None:
    """Slice, in place, every module named in ``plan``; add ``corrections`` to the consumers' biases.

    Without ``corrections`` the folded biases are created with zeros (their values come from a state_dict).
    Raises ``ValueError`` naming the module when the model does not fit the plan.
    """
    modules = dict(model.named_modules())
    for name in set(plan.out_keep) | set(plan.in_keep) | set(plan.folds) | set(plan.padded):
        if name not in modules and not (name in plan.out_keep and isinstance(_buffer(model, name), Tensor)):
            raise ValueError(f"channel plan names {name!r}, which this model does not have")
    with torch.no_grad():
        for name in plan.folds:  # before slicing: corrections are indexed by the original output channels
            mod = modules[name]
            if not isinstance(mod, nn.Conv2d | nn.Linear):
                raise ValueError(f"channel plan folds a constant into {name!r}, a {type(mod).__name__}")
            if mod.bias is None:
                w = mod.weight
                mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            if corrections is not None and name in corrections:
                mod.bias += corrections[name].to(mod.bias)
        for name, keep_list in plan.out_keep.items():
            keep = torch.tensor(keep_list, dtype=torch.long)
            if name in plan.sparse_lrn:
                mod = modules.get(name)
                if not isinstance(mod, nn.LocalResponseNorm):
                    raise ValueError(f"channel plan makes {name!r} a SparseChannelLRN, but it is {type(mod).__name__}")
                model.set_submodule(name, SparseChannelLRN.from_lrn(mod, plan.sparse_lrn[name], keep))
            elif name in modules:
                _slice_out(name, modules[name], keep)
            else:  # constant buffer [1, C, 1, ...] of a rewritten block
                parent, _, attr = name.rpartition(".")
                owner = model.get_submodule(parent)
                buf = getattr(owner, attr)
                _check_index(name, keep, buf.shape[1])
                sliced = buf[:, keep].clone()
                setattr(owner, attr, _param(sliced, buf) if isinstance(buf, nn.Parameter) else sliced)
        for name, keep_list in plan.in_keep.items():
            _slice_in(name, modules[name], torch.tensor(keep_list, dtype=torch.long))
        for name in plan.padded:
            conv = modules[name]
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"channel plan folds padded constants into {name!r}, a {type(conv).__name__}")
            fw = (corrections or {}).get(f"{name}#fold_weight")
            fv = (corrections or {}).get(f"{name}#fold_value")
            if fw is None or fv is None:  # rebuilding the structure: values come from the state_dict
                taps = conv.weight.new_zeros(conv.out_channels, *conv.kernel_size)
            else:
                if name in plan.out_keep:  # the consumer lost output rows too
                    fw = fw[torch.tensor(plan.out_keep[name], dtype=torch.long)]
                taps = torch.einsum("orij,r->oij", fw.double(), fv.double()).to(conv.weight)
            model.set_submodule(name, PaddedFoldConv2d(conv, taps, plan.padded[name]["size"]))


def _buffer(model: nn.Module, name: str) -> object:
    parent, _, attr = name.rpartition(".")
    try:
        return getattr(model.get_submodule(parent), attr, None)
    except AttributeError:
        return None


def _check_index(name: str, keep: Tensor, size: int) -> None:
    if keep.numel() and (int(keep.max()) >= size or int(keep.min()) < 0):
        raise ValueError(f"channel plan for {name!r} keeps index {int(keep.max())}, but it has only {size}")


def _check_blocks(name: str, keep: Tensor, size: int, groups: int) -> None:
    counts = torch.bincount(keep // (size // groups), minlength=groups)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"channel plan for {name!r} keeps {counts.tolist()} channels in its {groups} groups; "
                         "a grouped conv needs the same number in each")  # fmt: skip


def _slice_out(name: str, mod: nn.Module, keep: Tensor) -> None:
    if isinstance(mod, nn.Conv2d):
        _check_index(name, keep, mod.out_channels)
        if 1 < mod.groups < mod.in_channels:
            _check_blocks(name, keep, mod.out_channels, mod.groups)
        depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
        mod.weight = _param(mod.weight[keep], mod.weight)
        if mod.bias is not None:
            mod.bias = _param(mod.bias[keep], mod.bias)
        mod.out_channels = keep.numel()
        if depthwise:
            mod.in_channels = mod.groups = keep.numel()
    elif isinstance(mod, nn.ConvTranspose2d):
        _check_index(name, keep, mod.out_channels)
        mod.weight = _param(mod.weight[:, keep], mod.weight)
        if mod.bias is not None:
            mod.bias = _param(mod.bias[keep], mod.bias)
        mod.out_channels = keep.numel()
    elif isinstance(mod, nn.Linear):
        _check_index(name, keep, mod.out_features)
        mod.weight = _param(mod.weight[keep], mod.weight)
        if mod.bias is not None:
            mod.bias = _param(mod.bias[keep], mod.bias)
        mod.out_features = keep.numel()
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        _check_index(name, keep, mod.num_features)
        if mod.weight is not None:
            mod.weight = _param(mod.weight[keep], mod.weight)
        if mod.bias is not None:
            mod.bias = _param(mod.bias[keep], mod.bias)
        if mod.running_mean is not None and mod.running_var is not None:
            mod.running_mean = mod.running_mean[keep].clone()
            mod.running_var = mod.running_var[keep].clone()
        mod.num_features = keep.numel()
    elif isinstance(mod, nn.GroupNorm):
        _check_index(name, keep, mod.num_channels)
        per = mod.num_channels // mod.num_groups
        counts = torch.bincount(keep // per, minlength=mod.num_groups)
        if bool(((counts != 0) & (counts != per)).any()):
            raise ValueError(f"channel plan for {name!r} keeps part of a GroupNorm group ({counts.tolist()} of "
                             f"{per} per group); a GroupNorm loses channels only in whole groups")  # fmt: skip
        if mod.weight is not None:
            mod.weight = _param(mod.weight[keep], mod.weight)
            mod.bias = _param(mod.bias[keep], mod.bias)
        mod.num_channels, mod.num_groups = keep.numel(), keep.numel() // per
    elif isinstance(mod, nn.PReLU):
        _check_index(name, keep, mod.num_parameters)
        mod.weight = _param(mod.weight[keep], mod.weight)
        mod.num_parameters = keep.numel()
    else:
        raise ValueError(
            f"channel plan slices {name!r}, a {type(mod).__name__}; only Conv2d, Linear, BatchNorm, InstanceNorm, "
            "GroupNorm and PReLU"
        )


def _slice_in(name: str, mod: nn.Module, keep: Tensor) -> None:
    if isinstance(mod, nn.Conv2d) and mod.groups == 1:
        _check_index(name, keep, mod.in_channels)
        mod.weight = _param(mod.weight[:, keep], mod.weight)
        mod.in_channels = keep.numel()
    elif isinstance(mod, nn.Conv2d) and mod.groups < mod.in_channels:  # grouped: per-group local indices
        g, ig = mod.groups, mod.in_channels // mod.groups
        _check_index(name, keep, mod.in_channels)
        _check_blocks(name, keep, mod.in_channels, g)
        og = mod.weight.shape[0] // g
        local = (keep % ig).view(g, -1)  # [g, kept per group]
        parts = [mod.weight[j * og : (j + 1) * og][:, local[j]] for j in range(g)]
        mod.weight = _param(torch.cat(parts), mod.weight)
        mod.in_channels = keep.numel()
    elif isinstance(mod, nn.ConvTranspose2d):
        _check_index(name, keep, mod.in_channels)
        mod.weight = _param(mod.weight[keep], mod.weight)
        mod.in_channels = keep.numel()
    elif isinstance(mod, nn.Linear):
        _check_index(name, keep, mod.in_features)
        mod.weight = _param(mod.weight[:, keep], mod.weight)
        mod.in_features = keep.numel()
    else:
        raise ValueError(
            f"channel plan slices the input of {name!r}, a {type(mod).__name__}; only Conv2d, ConvTranspose2d, Linear"
        )

"""Which slices of which tensors form a group.

A :class:`Group` is one *family* of groups of one type (e.g. all filters of ``conv1``): a list of
:class:`Member` slices whose squared sums add up to one norm per group, so norms need one reduction per
tensor and no Python loop over groups. Coupled groups (a filter + its bias + its BN channel + the
consumer's input channel) are simply families with several members.

Group types (W is a Conv2d weight N x C/g x KH x KW, g conv groups; L a Linear weight out x in):
    filter     W[n]                         (a GEMM row)
    channel    W[bank, c]  per input channel (all filters of c's conv-group bank)
    shape      W[bank, c, kh, kw]           (a GEMM column, per conv-group bank)
    kernel2d   W[n, c]                      (one 2-D kernel)
    vector     W[n, c, kh]                  (one kernel row, Mao et al.'s 1-D granularity)
    element    one weight (Conv2d or Linear; group lasso over singletons is ℓ1, Mao et al.'s 0-D granularity)
    neuron_out L[j, :]   all input connections of output neuron j (zero -> neuron j removable)
    neuron_in  L[:, i]   all connections of input feature i (zero -> input i removable)
    depth      every weight of a residual branch (zero -> the block is removable)
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from torch import Tensor, nn

from ssl_lightning.graph import GraphAnalysis, analyze, own_forward

__all__ = [
    "CONV_TYPES",
    "GRANULARITIES",
    "GROUP_TYPES",
    "LINEAR_TYPES",
    "Group",
    "GroupType",
    "Member",
    "build_groups",
    "family_sq_sums",
    "validate_lambdas",
]

GroupType: TypeAlias = Literal[
    "filter", "channel", "shape", "kernel2d", "neuron_in", "neuron_out", "depth", "vector", "element"
]
GROUP_TYPES: tuple[str, ...] = (
    "filter",
    "channel",
    "shape",
    "kernel2d",
    "neuron_in",
    "neuron_out",
    "depth",
    "vector",
    "element",
)
# Mao et al.'s pruning granularities (and SSL's channel / shape) -> the group type that forms their groups
GRANULARITIES: dict[str, str] = {
    "element": "element",
    "vector": "vector",
    "kernel": "kernel2d",
    "filter": "filter",
    "channel": "channel",
    "shape": "shape",
}
CONV_TYPES = ("filter", "channel", "shape", "kernel2d", "vector", "element")
LINEAR_TYPES = ("neuron_in", "neuron_out", "element")
Selector: TypeAlias = str | type[nn.Module]


@dataclass(frozen=True, eq=False)
class Member:
    """A tensor viewed as ``view_shape`` (then optionally ``narrow``-ed); ``reduce_dims`` are summed
    within a group and the remaining dims, flattened in order, enumerate the groups."""

    name: str
    param: Tensor
    view_shape: tuple[int, ...]
    reduce_dims: tuple[int, ...]
    narrow: tuple[int, int, int] | None = None  # (dim, start, length) of the viewed tensor

    def view(self, t: Tensor) -> Tensor:
        v = t.reshape(self.view_shape)
        return v.narrow(*self.narrow) if self.narrow else v

    @functools.cached_property
    def keep_shape(self) -> tuple[int, ...]:
        shape = list(self.view_shape)
        if self.narrow:
            shape[self.narrow[0]] = self.narrow[2]
        return tuple(1 if d in self.reduce_dims else s for d, s in enumerate(shape))

    @property
    def num_groups(self) -> int:
        return math.prod(self.keep_shape)

    @property
    def group_size(self) -> int:
        shape = list(self.view_shape)
        if self.narrow:
            shape[self.narrow[0]] = self.narrow[2]
        return math.prod(shape[d] for d in self.reduce_dims)

    def reduce_sq(self, sq: Tensor) -> Tensor:
        """Per-group sums of an already squared fp32 copy of the parameter, shape [num_groups]."""
        return self.view(sq).sum(self.reduce_dims).reshape(-1)

    def per_group(self, values: Tensor) -> Tensor:
        """Reshape a [num_groups] tensor so it broadcasts against :meth:`view`."""
        return values.reshape(self.keep_shape)

    def update_(self, t: Tensor, fn: Callable[[Tensor], None]) -> None:
        """Apply the in-place ``fn`` to this member's view of ``t`` (``t`` may be non-contiguous)."""
        if t.is_contiguous():
            fn(self.view(t))
        else:  # e.g. channels_last weights: edit a contiguous copy, then write it back
            tmp = t.contiguous()
            fn(self.view(tmp))
            t.copy_(tmp)


@dataclass(eq=False)
class Group:
    """A family of groups of one type. ``lam`` is the full-strength λ (per-layer and size scaling applied)."""

    name: str
    kind: str
    modules: tuple[str, ...]
    members: tuple[Member, ...]
    lam: float
    num_groups: int = field(init=False)
    group_size: int = field(init=False)

    def __post_init__(self) -> None:
        counts = {m.num_groups for m in self.members}
        if len(counts) != 1:
            raise ValueError(f"group {self.name}: members disagree on the number of groups {sorted(counts)}")
        self.num_groups = counts.pop()
        self.group_size = sum(m.group_size for m in self.members)

    def norms(self) -> Tensor:
        """fp32 L2 norm of every group, shape [num_groups]."""
        return family_sq_sums([self])[0].sqrt()


def weight_of(module: nn.Module) -> Tensor:
    """The ``weight`` tensor of a Conv2d / Linear (typed)."""
    w = module.weight
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return w


def family_sq_sums(groups: Sequence[Group]) -> list[Tensor]:
    """Per-group sums of squares (fp32) of every family, squaring each distinct tensor once (families on
    the same weight — filter, channel, shape, kernel2d — share the squares)."""
    squares: dict[int, Tensor] = {}
    out = []
    for g in groups:
        total: Tensor | None = None
        for m in g.members:
            sq = squares.get(id(m.param))
            if sq is None:
                p = m.param.detach().float()
                sq = squares[id(m.param)] = p * p
            part = m.reduce_sq(sq)
            total = part if total is None else total + part.to(total.device)
        assert total is not None
        out.append(total)
    return out


def conv_member(name: str, w: Tensor, kind: str, groups: int) -> Member:
    """The single-tensor member of a Conv2d weight ``w`` (N x C/g x KH x KW) for ``kind``."""
    n, cg, kh, kw = w.shape
    if kind == "filter":
        return Member(name, w, (n, cg * kh * kw), (1,))
    if kind == "channel":
        return Member(name, w, (groups, n // groups, cg, kh * kw), (1, 3))
    if kind == "shape":
        return Member(name, w, (groups, n // groups, cg * kh * kw), (1,))
    if kind == "kernel2d":
        return Member(name, w, (n * cg, kh * kw), (1,))
    if kind == "vector":
        return Member(name, w, (n * cg * kh, kw), (1,))
    if kind == "element":
        return Member(name, w, (w.numel(), 1), (1,))
    raise ValueError(f"group type {kind!r} does not apply to Conv2d; use one of {CONV_TYPES}")


def linear_member(name: str, w: Tensor, kind: str) -> Member:
    out, inp = w.shape
    if kind == "neuron_out":
        return Member(name, w, (out, inp), (1,))
    if kind == "neuron_in":
        return Member(name, w, (out, inp), (0,))
    if kind == "element":
        return Member(name, w, (out * inp, 1), (1,))
    raise ValueError(f"group type {kind!r} does not apply to Linear; use one of {LINEAR_TYPES}")


def _supports(module: nn.Module, kind: str) -> bool:
    if kind == "depth":
        return isinstance(module, nn.Conv2d | nn.Linear)
    if isinstance(module, nn.Conv2d):
        return kind in CONV_TYPES
    if isinstance(module, nn.Linear):
        return kind in LINEAR_TYPES
    return False


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    cls = selector.removeprefix("nn.").removeprefix("torch.nn.")
    if cls in {c.__name__ for c in type(module).__mro__}:
        return True
    return re.fullmatch(selector, name) is not None


def _select(model: nn.Module, include: Sequence[Selector] | None, exclude: Sequence[Selector]) -> dict[str, nn.Module]:
    named = [(n, m) for n, m in model.named_modules() if n]
    weighted = {n: m for n, m in named if isinstance(m, nn.Conv2d | nn.Linear)}
    for sel_list, arg in ((include or [], "include"), (exclude, "exclude")):
        for sel in sel_list:
            hits = [n for n, m in named if _matches(sel, n, m)]
            if not hits:
                raise ValueError(
                    f"{arg}: selector {sel!r} matches no module; module names look like "
                    f"{[n for n, _ in named][:6]} (regex, full match) or give a class such as 'Conv2d'"
                )
            if not any(n in weighted for n in hits):
                bad = type(dict(named)[hits[0]]).__name__
                raise ValueError(
                    f"{arg}: selector {sel!r} matches only unsupported module types (e.g. {hits[0]}: {bad}); "
                    "SSL groups apply to nn.Conv2d and nn.Linear"
                )
    chosen = (
        weighted if include is None else {n: m for n, m in weighted.items() if any(_matches(s, n, m) for s in include)}
    )
    chosen = {n: m for n, m in chosen.items() if not any(_matches(s, n, m) for s in exclude)}
    own = [f"{n} ({type(m).__name__})" for n, m in chosen.items() if own_forward(m)]
    if own:
        warnings.warn(
            f"{len(own)} layer(s) compute their output from a transformed weight (their own forward), so zeros in "
            f".weight are not zero effective weights: no groups for {', '.join(own[:5])}"
            + (" ..." if len(own) > 5 else ""),
            stacklevel=3,
        )
    return {n: m for n, m in chosen.items() if not own_forward(m)}


def _layer_lambda(
    name: str,
    module: nn.Module,
    kind: str,
    base: float,
    layer_lambdas: Mapping[str, float | Mapping[str, float]],
) -> float:
    lam = base
    for pattern, spec in layer_lambdas.items():
        if re.fullmatch(pattern, name) is None:
            continue
        if isinstance(spec, Mapping):
            if kind in spec:
                lam = float(spec[kind])
        else:
            lam = base * float(spec)
    return lam


def validate_lambdas(lambdas: Mapping[str, float]) -> None:
    """Raise ValueError unless ``lambdas`` maps known group types to finite λ >= 0."""
    if not isinstance(lambdas, Mapping) or not lambdas:
        raise ValueError(
            f"lambdas must be a non-empty mapping of group type -> λ, e.g. {{'filter': 5e-3}}, got {lambdas!r}"
        )
    for kind, lam in lambdas.items():
        if kind not in GROUP_TYPES:
            raise ValueError(f"lambdas: unknown group type {kind!r}; allowed: {', '.join(GROUP_TYPES)}")
        if isinstance(lam, bool) or not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lambdas[{kind!r}] must be a finite number >= 0, got {lam!r}")


def _validate(
    lambdas: Mapping[str, float], layer_lambdas: Mapping[str, float | Mapping[str, float]], model: nn.Module
) -> None:
    validate_lambdas(lambdas)
    names = {n: m for n, m in model.named_modules() if n}
    for pattern, spec in layer_lambdas.items():
        hits = {n: m for n, m in names.items() if re.fullmatch(pattern, n)}
        if not hits:
            raise ValueError(f"layer_lambdas: pattern {pattern!r} matches no module name")
        items = spec.items() if isinstance(spec, Mapping) else [("*", spec)]
        for kind, value in items:
            if kind != "*" and kind not in GROUP_TYPES:
                raise ValueError(
                    f"layer_lambdas[{pattern!r}]: unknown group type {kind!r}; allowed: {', '.join(GROUP_TYPES)}"
                )
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"layer_lambdas[{pattern!r}] values must be finite numbers >= 0, got {value!r}")
            if kind not in ("*", "depth"):
                bad = [f"{n} ({type(m).__name__})" for n, m in hits.items() if not _supports(m, kind)]
                if len(bad) == len(hits):
                    raise ValueError(
                        f"layer_lambdas[{pattern!r}]: group type {kind!r} is unsupported for {bad[0]}; "
                        f"conv types {CONV_TYPES} need nn.Conv2d, {LINEAR_TYPES} need nn.Linear"
                    )


def _coupled_group(
    space_idx: int, analysis: GraphAnalysis, modules: Mapping[str, nn.Module]
) -> tuple[list[Member], int]:
    sp = analysis.spaces[space_idx]
    assert sp.size is not None
    size = sp.size
    members: list[Member] = []
    for name in sp.producers + sp.passthrough:
        mod = modules.get(name)
        if mod is None:  # a folded constant buffer (after depth removal), not a parameter
            continue
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if not isinstance(p, Tensor):
                continue
            if name in sp.offsets:  # a BN / depthwise conv over a concatenation: this space's slice of it
                whole = (p.shape[0], p.numel() // p.shape[0])
                members.append(Member(f"{name}.{pname}", p, whole, (1,), narrow=(0, sp.offsets[name], size)))
            else:
                members.append(Member(f"{name}.{pname}", p, (size, p.numel() // size), (1,)))
    for name, off, hw in sp.consumers:
        mod = modules[name]
        w = weight_of(mod)
        if isinstance(mod, nn.ConvTranspose2d):  # [in, out, kh, kw]: input channel c is w[c]
            members.append(Member(f"{name}.weight", w, (w.shape[0], w[0].numel()), (1,), narrow=(0, off, size)))
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            # Grouped conv reading the whole space: input channel c = j * (C/g) + local sits in the rows
            # of group j only; view [g, out/g, C/g, k] and reduce rows and taps -> one norm per channel.
            g = mod.groups
            view4 = (g, w.shape[0] // g, w.shape[1], w.shape[2] * w.shape[3])
            members.append(Member(f"{name}.weight", w, view4, (1, 3)))
            continue
        if isinstance(mod, nn.Conv2d):
            view: tuple[int, ...] = (w.shape[0], w.shape[1], w.shape[2] * w.shape[3])
        else:
            view = (w.shape[0], w.shape[1] // hw, hw)
        members.append(Member(f"{name}.weight", w, view, (0, 2), narrow=(1, off, size)))
    return members, size


def build_groups(
    model: nn.Module,
    lambdas: Mapping[str, float],
    *,
    include: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] = (),
    layer_lambdas: Mapping[str, float | Mapping[str, float]] | None = None,
    couple: bool = False,
    depth_blocks: Sequence[str] | None = None,
    scale_by_group_size: bool = False,
    example_inputs: Sequence[Tensor] | None = None,
    analysis: GraphAnalysis | None = None,
) -> list[Group]:
    """Build the group families of ``model`` for every group type in ``lambdas`` (type -> λ).

    include/exclude: module selectors — a regex fully matching a qualified module name, or a class
    (``nn.Conv2d`` or ``"Conv2d"``). Default: every Conv2d and Linear.
    layer_lambdas: regex -> multiplier of every type's λ, or regex -> {type: λ} overrides.
    couple: filter / neuron_out groups also cover the bias, the BN channel and the consumers' input
    channels found by ``torch.fx`` analysis (residual adds merge channels across branches).
    depth_blocks: module names whose Conv2d/Linear weights form one depth group each; by default
    residual branches are found with ``torch.fx``.
    scale_by_group_size: multiply each family's λ by sqrt(its group size), so larger groups are
    penalized in proportion (the original SSL code scaled column λ this way across AlexNet layers).
    The layers whose outputs are the model's outputs get no filter / neuron_out groups.
    example_inputs: inputs of ``model`` (a tuple of positional arguments); when given, each traced graph the
    coupling and depth groups come from is checked against a real run (see :func:`ssl_lightning.graph.analyze`).
    analysis: ``analyze(model, example_inputs)`` when the caller already has it (it is not computed again).
    """
    layer_lambdas = dict(layer_lambdas or {})
    _validate(lambdas, layer_lambdas, model)
    selected = _select(model, include, exclude)
    all_modules = dict(model.named_modules())
    if analysis is None:  # piecewise where torch.fx cannot trace the whole model
        analysis = analyze(model, example_inputs)
    terminal = analysis.terminal_modules
    if couple and analysis.untraced:
        warnings.warn(
            "couple=True: filters whose channels cross code torch.fx cannot trace stay uncoupled (their own "
            "filter groups): " + "; ".join(f"{n or type(model).__name__}: {r}" for n, r in analysis.untraced.items()),
            stacklevel=2,
        )

    groups: list[Group] = []
    coupled_done: set[str] = set()
    if couple:
        for i, sp in enumerate(analysis.spaces):
            if sp.blocked or not all(p in selected for p in sp.producers):
                continue
            kind = "filter" if isinstance(selected[sp.producers[0]], nn.Conv2d) else "neuron_out"
            if kind not in lambdas:
                continue
            lam = max(_layer_lambda(p, selected[p], kind, lambdas[kind], layer_lambdas) for p in sp.producers)
            members, _ = _coupled_group(i, analysis, all_modules)
            groups.append(Group(f"{'+'.join(sp.producers)}:{kind}", kind, tuple(sp.producers), tuple(members), lam))
            coupled_done.update(sp.producers)

    for kind in [k for k in GROUP_TYPES if k in lambdas and k != "depth"]:
        found = False
        for name, mod in selected.items():
            if not _supports(mod, kind):
                continue
            found = True
            if kind in ("filter", "neuron_out") and (name in terminal or name in coupled_done):
                continue
            lam = _layer_lambda(name, mod, kind, lambdas[kind], layer_lambdas)
            w = weight_of(mod)
            if isinstance(mod, nn.Conv2d):
                member = conv_member(f"{name}.weight", w, kind, mod.groups)
            else:
                member = linear_member(f"{name}.weight", w, kind)
            groups.append(Group(f"{name}:{kind}", kind, (name,), (member,), lam))
        if not found:
            need = "nn.Conv2d" if kind in CONV_TYPES else "nn.Linear"
            raise ValueError(
                f"lambdas: group type {kind!r} needs {need} layers, but none of the selected modules "
                f"({', '.join(selected) or 'none'}) is one; remove {kind!r} or select such layers"
            )

    if "depth" in lambdas:
        groups += _depth_groups(model, selected, lambdas["depth"], layer_lambdas, depth_blocks, analysis)

    built = {g.kind for g in groups}
    for kind, lam in lambdas.items():
        if kind not in built and lam > 0:
            raise ValueError(
                f"lambdas: group type {kind!r} produced no groups: its only candidate layers "
                f"({', '.join(sorted(terminal & set(selected)))}) produce the model's outputs, whose filters / "
                "neurons cannot be removed; select other layers or drop the type"
            )
    if scale_by_group_size:  # the standard group-lasso weighting λ·sqrt(|g|)·‖w_g‖
        for g in groups:
            g.lam *= math.sqrt(g.group_size)
    return groups


def _depth_groups(
    model: nn.Module,
    selected: Mapping[str, nn.Module],
    lam: float,
    layer_lambdas: Mapping[str, float | Mapping[str, float]],
    depth_blocks: Sequence[str] | None,
    analysis: GraphAnalysis,
) -> list[Group]:
    modules = dict(model.named_modules())
    branches = analysis.depth_branches
    if depth_blocks is not None:
        branches = []
        for block in depth_blocks:
            if block not in modules:
                raise ValueError(f"depth_blocks: no module named {block!r}")
            inner = [f"{block}.{n}" for n, m in modules[block].named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
            if not inner:
                raise ValueError(f"depth_blocks: {block!r} holds no Conv2d/Linear weights")
            branches.append(inner)
    branches = [[n for n in b if n in selected] for b in branches]
    branches = [b for b in branches if b]
    if not branches:
        raise ValueError(
            "lambdas: group type 'depth' needs residual branches, but none was found among the selected "
            "layers; pass depth_blocks=[...] naming the branch modules, or remove 'depth'"
        )
    out = []
    for branch in branches:
        members = tuple(Member(f"{n}.weight", modules[n].weight, (1, modules[n].weight.numel()), (1,)) for n in branch)
        blam = max(_layer_lambda(n, modules[n], "depth", lam, layer_lambdas) for n in branch)
        out.append(Group(f"{branch[0]}..{branch[-1]}:depth", "depth", tuple(branch), members, blam))
    return out


def group_parameters(groups: Iterable[Group]) -> dict[str, Tensor]:
    """Every distinct tensor touched by ``groups``, by qualified name."""
    return {m.name: m.param for g in groups for m in g.members}

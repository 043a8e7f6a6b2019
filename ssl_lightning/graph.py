"""Channel-dependency analysis of a model with ``torch.fx``.

Every tensor flowing through the traced graph is described by the *channel spaces* that make up its
dim 1: a conv/linear creates a fresh space (its output channels), BN / activations / pooling pass it
through, a residual add (or any channel-aligned binary op) merges the spaces of its operands, a
concat along dim 1 lays spaces side by side, and a flatten keeps the spaces with a spatial factor that
a following Linear recovers as ``in_features // channels``. A space that reaches the model output, a
model input, or an op the analysis does not know is *blocked*: its channels cannot be removed.

The result tells :mod:`ssl_lightning.groups` which slices of which tensors form one coupled channel
group, and which residual branches form one depth group.

Models that ``torch.fx`` cannot trace as a whole (data-dependent control flow, ``int(proxy)``, input checks —
e.g. every transformers vision model):

* with example inputs, the module's graph is *recorded from a real run* instead (every torch function,
  Tensor method and leaf module call on the way, through ``TorchFunctionMode`` and module hooks; Python
  control flow is the path the run took), and every fx graph is checked against that run, since a trace
  can be silently wrong (MONAI's ``UpCat`` drops its skip input under fx). :attr:`GraphAnalysis.recorded`
  names the modules analysed from a run, with fx's reason;
* without inputs (or where a run cannot be recorded) the model is analysed piecewise: a submodule whose
  own ``forward`` does not trace becomes an opaque call in its parent's graph (the channels crossing it
  stay whole) and its children are analysed on their own, recursively. Each such module is reported by
  name with the tracer's reason (:attr:`GraphAnalysis.untraced`).

Optional arguments of a piece traced on its own keep their default values (``return_dict=True`` etc.).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CallArgs",
    "ChannelSpace",
    "GraphAnalysis",
    "analyze",
    "capture_calls",
    "capture_inputs",
    "own_forward",
    "trace_module",
]

# Modules and functions that keep dim 1 channel-for-channel.
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LocalResponseNorm,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)  # fmt: skip
# Normalisations with one parameter slice per channel (statistics per channel, or per group for GroupNorm).
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, F.sigmoid, F.tanh, F.dropout,
    F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    torch.relu, torch.sigmoid, torch.tanh,
    F.interpolate, F.hardtanh, F.hardsigmoid, F.softplus, F.mish,
}  # fmt: skip
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}  # over spatial dims: channels stay
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "mul"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}  # residual joins (depth groups)
_FLATTEN_FUNCTIONS = {torch.flatten}
_IGNORED_METHODS = {"size", "dim"}
# attribute reads, and the guards fx adds for arguments traced as constants (``_assert(flag == True)``)
_IGNORED_FUNCTIONS = {getattr, torch._assert, operator.eq, operator.ne, operator.is_, operator.is_not}


@dataclass
class ChannelSpace:
    """A set of channels that must be kept or removed together.

    producers: modules whose output rows are these channels (conv filters / linear neurons + bias).
    passthrough: modules with one parameter slice per channel (BatchNorm affine, depthwise conv rows); over a
    concatenation their slice for this space starts at ``offsets[name]`` (0 when absent).
    consumers: (module, offset, hw) — the module reads these channels at input index offset..offset+size,
    each repeated ``hw`` times contiguously after a flatten (hw == 1 otherwise).
    """

    size: int | None
    producers: list[str] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int, int]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    mixing: list[str] = field(default_factory=list)  # ops that mix neighbouring channels (LRN): no removal
    # LRN modules on this space alone: a channel may go only if it is exactly zero at their input (it then adds
    # nothing to its neighbours' windows), and they become SparseChannelLRN (kept channels at their positions)
    zero_only: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)


@dataclass
class _Value:
    segments: list[tuple[int, int | None]]  # (space id, channels) along dim 1, in order
    flat: bool = False  # after a flatten: dim 1 is channels x spatial positions
    opaque: bool = False  # the output of an untraceable submodule (may be a tuple / ModelOutput, all blocked)


@dataclass
class _Attr:
    target: str  # a tensor attribute (get_attr), e.g. a folded constant of shape [1, C, 1, 1]
    shape: tuple[int, ...]


@dataclass
class GraphAnalysis:
    spaces: list[ChannelSpace]  # one per union-find root that holds at least one parameter slice
    depth_branches: list[list[str]]  # per residual add: weight modules of the branch side
    terminal_modules: set[str]  # weight modules whose output reaches the model output as channels
    unsupported: list[str]  # human-readable notes on what blocked analysis
    multi_called: set[str] = field(default_factory=set)  # modules called more than once (shared weights)
    untraced: dict[str, str] = field(default_factory=dict)  # module name ("" = the model) -> why fx failed
    recorded: dict[str, str] = field(default_factory=dict)  # analysed from a recorded run instead -> why


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, scope: str = "", opaque: frozenset[str] = frozenset()) -> None:
        self.gm = gm
        self.scope = scope  # the analysed submodule's name ("" for the whole model): boundary notes name it
        self.opaque = opaque  # untraceable submodules (analysed on their own): channels crossing them stay
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.spaces: list[ChannelSpace] = []
        self.notes: list[str] = []
        self.env: dict[fx.Node, object] = {}

    # union-find over spaces
    def new_space(self, size: int | None, blocked: str | None = None) -> int:
        self.parent.append(len(self.spaces))
        self.spaces.append(ChannelSpace(size=size, blocked=[blocked] if blocked else []))
        return len(self.spaces) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        if sa.size is None:
            sa.size = sb.size
        self.parent[rb] = ra
        for name in set(sa.passthrough) & set(sb.passthrough):  # one layer, the merged channels at two offsets
            if sa.offsets.get(name, 0) != sb.offsets.get(name, 0):
                sa.blocked.append(f"{name} reads these channels at two offsets")
        sa.producers += sb.producers
        sa.passthrough += sb.passthrough
        sa.consumers += sb.consumers
        sa.blocked += sb.blocked
        sa.mixing += sb.mixing
        sa.zero_only += sb.zero_only
        sa.offsets.update(sb.offsets)

    def space(self, i: int) -> ChannelSpace:
        return self.spaces[self.find(i)]

    def block(self, value: object, reason: str) -> None:
        if isinstance(value, _Value):
            for sid, _ in value.segments:
                self.space(sid).blocked.append(reason)

    def _channelwise(self, x: _Value, name: str, mod: nn.Module) -> None:
        """A layer with one parameter slice per channel (BN affine, depthwise conv, PReLU) passes its input's
        channel spaces through; over a concatenation (DenseNet) its slice for each joined space starts at that
        space's offset. A space joined twice, or unknown sizes, or a GroupNorm (groups may straddle the joined
        spaces) over a concatenation: blocked."""
        if len(x.segments) == 1:
            self.space(x.segments[0][0]).passthrough.append(name)
            return
        roots = [self.find(sid) for sid, _ in x.segments]
        sizes = [n for _, n in x.segments]
        if len(set(roots)) < len(roots) or None in sizes or isinstance(mod, nn.GroupNorm):
            self.block(x, f"{name} ({type(mod).__name__}) is channel-wise over a concatenation it cannot split")
            return
        off = 0
        for (_, n), root in zip(x.segments, roots, strict=True):
            sp = self.spaces[root]
            if name in sp.passthrough:
                sp.blocked.append(f"{name} reads these channels at two offsets")
            sp.passthrough.append(name)
            sp.offsets[name] = off
            off += n or 0

    def consume(self, value: _Value, module: str, channels: int, features: int | None = None) -> None:
        """Register ``module`` as reading ``value`` (channels = total channels of value's segments)."""
        known = [n for _, n in value.segments]
        total = sum(n for n in known if n is not None) if None not in known else None
        if total is None and len(value.segments) == 1:
            total = channels if features is None else None
        if total is None:
            self.block(value, f"{module}: channel count unknown")
            return
        hw = 1
        if features is not None:
            if total == 0 or features % total:
                self.block(value, f"{module}: {features} input features not a multiple of {total} channels")
                return
            hw = features // total
        off = 0
        for sid, n in value.segments:
            size = n if n is not None else total
            sp = self.space(sid)
            if sp.size is None:
                sp.size = size
            sp.consumers.append((module, off, hw))
            off += size

    def run(self) -> GraphAnalysis:
        env = self.env
        weight_ancestors: dict[fx.Node, frozenset[str]] = {}
        depth: list[list[str]] = []
        terminal: set[str] = set()

        def val(a: object) -> object:
            return env.get(a) if isinstance(a, fx.Node) else None

        for node in self.gm.graph.nodes:
            anc: set[str] = set()
            for inp in node.all_input_nodes:
                anc |= weight_ancestors.get(inp, frozenset())
            out: object = None
            args = [val(a) for a in node.args]
            x = args[0] if args else None
            if node.op == "placeholder":
                out = _Value([(self.new_space(None, f"input of {self.scope}" if self.scope else "model input"), None)])
            elif node.op == "get_attr":
                attr = _get_attr(self.gm, str(node.target))
                out = _Attr(str(node.target), tuple(attr.shape)) if isinstance(attr, torch.Tensor) else None
            elif node.op == "call_module":
                mod = self.modules[node.target]
                name = str(node.target)
                if isinstance(mod, nn.Conv2d) and isinstance(x, _Value) and not x.flat:
                    anc.add(name)
                    if mod.groups == 1:
                        self.consume(x, name, mod.in_channels)
                        sid = self.new_space(mod.out_channels)
                        self.spaces[sid].producers.append(name)
                        out = _Value([(sid, mod.out_channels)])
                    elif mod.groups == mod.in_channels == mod.out_channels:
                        self._channelwise(x, name, mod)
                        out = x  # depthwise: channel c in -> channel c out
                    elif mod.groups < mod.in_channels:  # grouped: whole input in equal blocks, fresh output
                        if len(x.segments) > 1:
                            self.block(x, f"grouped conv {name} reads a concatenation")
                        else:
                            self.consume(x, name, mod.in_channels)
                        sid = self.new_space(mod.out_channels)
                        self.spaces[sid].producers.append(name)
                        out = _Value([(sid, mod.out_channels)])
                    else:  # depthwise with a channel multiplier: not followed
                        self.block(x, f"depthwise conv {name} with channel multiplier")
                        sid = self.new_space(mod.out_channels, f"depthwise conv {name} with channel multiplier")
                        out = _Value([(sid, mod.out_channels)])
                elif isinstance(mod, nn.ConvTranspose2d) and mod.groups == 1 and isinstance(x, _Value) and not x.flat:
                    anc.add(name)  # weight [in, out, kh, kw]: reads input channels, produces output channels
                    self.consume(x, name, mod.in_channels)
                    sid = self.new_space(mod.out_channels)
                    self.spaces[sid].producers.append(name)
                    out = _Value([(sid, mod.out_channels)])
                elif isinstance(mod, nn.Linear) and isinstance(x, _Value):
                    anc.add(name)
                    channels = sum(n or 0 for _, n in x.segments)
                    self.consume(x, name, channels, features=mod.in_features)
                    sid = self.new_space(mod.out_features)
                    self.spaces[sid].producers.append(name)
                    out = _Value([(sid, mod.out_features)])
                elif isinstance(mod, _NORMS) and isinstance(x, _Value) and not x.flat:
                    # per-channel affine (and statistics); GroupNorm: channel removal in whole groups
                    anc.add(name)
                    self._channelwise(x, name, mod)
                    out = x
                elif isinstance(mod, _PASS_MODULES) and isinstance(x, _Value):
                    for sid, _ in x.segments:
                        if isinstance(mod, nn.LocalResponseNorm) and len(x.segments) == 1 and not x.flat:
                            self.space(sid).passthrough.append(name)
                            self.space(sid).zero_only.append(name)
                        elif isinstance(mod, nn.LocalResponseNorm):  # windows across joined spaces
                            self.space(sid).mixing.append(name)
                    if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
                        self._channelwise(x, name, mod)
                    out = x
                elif isinstance(mod, nn.Flatten) and isinstance(x, _Value) and mod.start_dim == 1:
                    out = _Value(x.segments, flat=True)
                else:
                    untraced = name in self.opaque
                    what = "is not traceable" if untraced else "unsupported module"
                    reason = f"{what} {name} ({type(mod).__name__})" if not untraced else f"{name} {what}"
                    for a in [*args, *(val(a) for a in node.kwargs.values())]:
                        self.block(a, reason)
                    if not untraced:  # untraceable pieces are reported once, by analyze
                        self.notes.append(reason)
                    out = _Value([(self.new_space(None, reason), None)], opaque=untraced)
            elif node.op in ("call_function", "call_method"):
                out = self._function(node, args, x)
                if node.target in _ADDS:
                    branch = self._depth_branch(node, weight_ancestors)
                    if branch:
                        depth.append(branch)
            elif node.op == "output":
                for a in node.args:
                    for leaf in _leaves(a):
                        v = env.get(leaf)
                        if isinstance(v, _Value):
                            for sid, _ in v.segments:
                                terminal.update(self.space(sid).producers)
                        self.block(v, f"output of {self.scope}" if self.scope else "model output")
            env[node] = out
            weight_ancestors[node] = frozenset(anc)

        # A long skip addition (U-Net decoder + encoder feature) has whole residual blocks on its "branch"
        # side: only innermost branches (holding no other branch) are depth groups.
        sets = [frozenset(b) for b in depth]
        for b in depth:
            if any(o < frozenset(b) for o in sets):
                self.notes.append(f"skip addition over {b[0]}..{b[-1]} holds residual blocks: not a depth branch")
        depth = [b for b in depth if not any(o < frozenset(b) for o in sets)]
        roots = {self.find(i) for i in range(len(self.spaces))}
        spaces = [self.spaces[r] for r in sorted(roots) if self.spaces[r].producers]
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        return GraphAnalysis(spaces, depth, terminal, self.notes, {n for n, c in calls.items() if c > 1})

    def _function(self, node: fx.Node, args: list[object], x: object) -> object:
        target = node.target
        is_fn = node.op == "call_function"
        if isinstance(x, _Value) and x.opaque and (target in (getattr, operator.getitem) or not is_fn):
            reason = f"{node.name}: part of an untraceable module's output"
            return _Value([(self.new_space(None, reason), None)], opaque=True)  # outputs[0], .pooler_output
        if (is_fn and target in _IGNORED_FUNCTIONS) or (not is_fn and target in _IGNORED_METHODS):
            return None
        if (is_fn and target in _PASS_FUNCTIONS) or (not is_fn and target in _PASS_METHODS):
            return x if isinstance(x, _Value) else None
        if is_fn and target is F.local_response_norm:  # mixes neighbouring channels; no module to replace
            if isinstance(x, _Value):
                for sid, _ in x.segments:
                    self.space(sid).mixing.append(node.name)
            return x if isinstance(x, _Value) else None
        if (is_fn and target in _BINARY) or (not is_fn and target in _BINARY_METHODS):
            tensors = [a for a in args[:2] if isinstance(a, _Value)]
            attrs = [a for a in args[:2] if isinstance(a, _Attr)]
            if len(tensors) == 1 and attrs:  # a per-channel constant [1, C, 1, ...] is sliced with its channels
                v, attr = tensors[0], attrs[0]
                per_channel = len(attr.shape) >= 2 and attr.shape[0] == 1 and all(d == 1 for d in attr.shape[2:])
                if per_channel and len(v.segments) == 1 and v.segments[0][1] == attr.shape[1] and not v.flat:
                    self.space(v.segments[0][0]).passthrough.append(attr.target)
                elif any(d != 1 for d in attr.shape):
                    self.block(v, f"{node.name}: operand {attr.target} with shape {list(attr.shape)}")
                return v
            if len(tensors) == 1:
                return tensors[0]
            if len(tensors) == 2:
                a, b = tensors
                if a.flat == b.flat and [n for _, n in a.segments] == [n for _, n in b.segments]:
                    for (sa, _), (sb, _) in zip(a.segments, b.segments, strict=True):
                        self.union(sa, sb)
                    return a
                reason = f"{node.name}: operands with different channel layouts"
                self.block(a, reason)
                self.block(b, reason)
                return _Value([(self.new_space(None, reason), None)])
            return None
        if is_fn and target is torch.cat:
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            vals = [self._env_value(p) for p in parts] if isinstance(parts, list | tuple) else []
            tensors = [v for v in vals if isinstance(v, _Value) and not v.flat]
            if dim == 1 and tensors and len(tensors) == len(vals):
                return _Value([seg for v in tensors for seg in v.segments])
            for val in vals:
                self.block(val, f"{node.name}: concat along dim {dim}")
            return _Value([(self.new_space(None, f"{node.name}: concat"), None)])
        if is_fn and target is F.pad and isinstance(x, _Value) and not x.flat:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            if isinstance(pad, list | tuple) and len(pad) <= 4:  # pads W (and H) only
                return x
        if target in _REDUCTIONS and isinstance(x, _Value) and not x.flat:
            reduced = self._spatial_reduction(node)
            if reduced is not None:
                return _Value(x.segments, flat=not reduced)  # keepdim: still [N, C, 1, 1]; else [N, C]
        flat_call = (is_fn and target in _FLATTEN_FUNCTIONS) or (not is_fn and target == "flatten")
        if flat_call and isinstance(x, _Value):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start == 1:
                return _Value(x.segments, flat=True)
        is_view = not is_fn and target in ("view", "reshape") and len(node.args) == 3
        if is_view and isinstance(x, _Value) and node.args[2] == -1:  # x.view(x.size(0), -1)
            return _Value(x.segments, flat=True)
        reason = f"unsupported op {node.name} ({getattr(target, '__name__', target)})"
        found = False
        for arg in args:
            if isinstance(arg, _Value):
                found = True
                self.block(arg, reason)
        if found:
            self.notes.append(reason)
            return _Value([(self.new_space(None, reason), None)])
        return None

    @staticmethod
    def _spatial_reduction(node: fx.Node) -> bool | None:
        """For mean/sum/amax over the spatial dims of an image tensor: keepdim; None for anything else."""
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = {dim} if isinstance(dim, int) else set(dim) if isinstance(dim, list | tuple) else None
        if dims is None or not isinstance(keepdim, bool):
            return None
        if keepdim and dims <= {2, 3, -1, -2}:
            return True
        if dims in ({2, 3}, {-1, -2}):  # [N, C, H, W] -> [N, C]
            return False
        return None

    def _env_value(self, n: object) -> object:
        return self.env.get(n) if isinstance(n, fx.Node) else None

    def _depth_branch(self, node: fx.Node, anc: dict[fx.Node, frozenset[str]]) -> list[str]:
        ins = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(ins) != 2 or not all(isinstance(self.env.get(a), _Value) for a in ins):
            return []  # adding a parameter / constant (a bias, GRN's beta) joins no branches
        a, b = anc.get(ins[0], frozenset()), anc.get(ins[1], frozenset())

        def weights(names: frozenset[str]) -> list[str]:
            return sorted(n for n in names if isinstance(self.modules[n], nn.Conv2d | nn.Linear))

        wa, wb = weights(a - b), weights(b - a)
        # The residual branch is the side with more weight layers; the other is the shortcut
        # (identity, or a 1x1 projection that the paper excludes from depth groups).
        return wa if len(wa) > len(wb) else wb if len(wb) > len(wa) else []


def _get_attr(gm: nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _leaves(a: object) -> list[fx.Node]:
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, list | tuple):
        return [n for x in a for n in _leaves(x)]
    if isinstance(a, dict):
        return [n for x in a.values() for n in _leaves(x)]
    return []


# Compacted layers (their forwards branch on device / shape) are traced as opaque calls; the analysis then
# treats them like any module it does not know: their channels stay.
_COMPACTED_LAYERS = {"CompactConv2d", "CompactLinear", "PaddedFoldConv2d", "SparseChannelLRN"}


def own_forward(module: nn.Module) -> bool:
    """A Conv2d / Linear subclass that computes its output its own way (e.g. weight standardisation): zeros in
    its ``.weight`` are not zero effective weights, so it gets no groups and stays dense. Subclasses that only
    add an ``__init__`` (transformers' ``EfficientNetDepthwiseConv2d``) are plain, and so are parametrized
    layers (``.weight`` is then the effective weight)."""
    if isinstance(module, nn.Conv2d):
        cls = type(module)
        return cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
    if isinstance(module, nn.Linear):
        return type(module).forward is not nn.Linear.forward
    return False


class _Tracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves  # qualified names (relative to the traced root) kept as opaque calls

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        if isinstance(m, nn.Conv2d | nn.Linear) and not own_forward(m):  # a plain layer under another name
            return True
        if type(m).__name__ in _COMPACTED_LAYERS and type(m).__module__.startswith("ssl_lightning."):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _defaults(module: nn.Module) -> dict[str, object]:
    """Optional non-tensor arguments after the first (flags such as ``return_dict``): traced as constants."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    plain = (type(None), bool, int, float, str)
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and isinstance(p.default, plain)
    }


def trace_module(module: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace with the analysis' leaves (plain Conv2d / Linear subclasses and compacted layers stay
    calls, so module names in the graph match the analysis); children whose own code does not trace become
    calls too (deterministic: the same module gives the same graph). Raises ``RuntimeError`` when the module's
    own forward does not trace."""
    piece = _piece(module, {}, {})
    if piece.gm is None or piece.recorded:
        raise RuntimeError(piece.reason)
    return piece.gm


def _trace(module: nn.Module, leaves: frozenset[str]) -> fx.GraphModule:
    return fx.GraphModule(module, _Tracer(leaves).trace(module, concrete_args=_defaults(module) or None))


@dataclass
class _Piece:
    """How one submodule is analysed: its graph with some descendants opaque, or (gm None) not at all."""

    gm: fx.GraphModule | None
    leaves: frozenset[str]  # relative names of opaque descendants
    reason: str  # why this module's own forward could not be traced ("" when it could)
    recorded: bool = False  # the graph was recorded from a real run (torch.fx failed)


Call = tuple[tuple[Any, ...], dict[str, Any], Any]  # (args, kwargs, output) of a module's first call


def _checked_trace(module: nn.Module, leaves: frozenset[str], call: Call | None) -> fx.GraphModule:
    """Trace, and when the module's real call is known, check that the graph reproduces it: a trace can be
    silently wrong (``torch.jit.isinstance(proxy, Tensor)`` is False, so a branch on it drops a skip input)."""
    gm = _trace(module, leaves)
    if call is not None:
        args, kwargs, want = call
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            return gm  # a signature the check cannot map; the trace stands unchecked
        for name, value in _defaults(module).items():  # traced as constants: the call must use the same value
            given = bound.pop(name, value)
            if given is not value and (isinstance(given, Tensor) or given != value):
                raise RuntimeError(f"it is called with {name}={given!r}, traced with {value!r}")
        try:
            with torch.no_grad():
                have = gm(*bound.values())
        except Exception as err:
            raise RuntimeError(f"its traced graph fails where the module runs ({type(err).__name__}: {err})") from err
        a, b = tree_flatten(want)[0], tree_flatten(have)[0]
        same = len(a) == len(b) and all(
            not isinstance(x, Tensor) or (isinstance(y, Tensor) and x.shape == y.shape and torch.allclose(x, y))
            for x, y in zip(a, b, strict=False)
        )
        if not same:
            raise RuntimeError("its traced graph computes something else than the module (Python control flow "
                               "the tracer resolved differently)")  # fmt: skip
    return gm


def _piece(module: nn.Module, memo: dict[int, _Piece], calls: dict[int, Call]) -> _Piece:
    """Trace ``module``; when that fails, make the children that do not trace (deepest first) opaque calls
    and try again. A module whose own forward fails even then is not traceable. ``memo``: by module id;
    ``calls``: recorded real calls by module id, to check each trace against."""
    if id(module) in memo:
        return memo[id(module)]
    call = calls.get(id(module))
    try:
        piece = _Piece(_checked_trace(module, frozenset(), call), frozenset(), "")
    except Exception as err:  # any tracer failure: a recorded run, else fall back to the children
        reason = f"{type(err).__name__}: {err}".split("\n")[0]
        if call is not None:
            try:
                piece = _Piece(_recorded_graph(module, call), frozenset(), reason, recorded=True)
            except Exception as rec_err:  # anything the run cannot record: fall back to the children
                reason += f"; recording a run failed too ({type(rec_err).__name__}: {rec_err})".split("\n")[0]
            else:
                memo[id(module)] = piece
                return piece
        leaves: set[str] = set()
        for name, child in module.named_children():
            sub = _piece(child, memo, calls)
            if sub.gm is None:
                leaves.add(name)
            else:
                leaves |= {f"{name}.{leaf}" for leaf in sub.leaves}
        piece = _Piece(None, frozenset(), reason)
        if leaves:
            with contextlib.suppress(Exception):  # else the module's own code does not trace either
                piece = _Piece(_checked_trace(module, frozenset(leaves), call), frozenset(leaves), "")
    memo[id(module)] = piece
    return piece


class _Recorder(TorchFunctionMode):
    """Builds an fx graph from one real run of a module: every torch function / Tensor method whose result
    holds tensors becomes a node (``call_function`` / ``call_method``, as torch.fx would write it), every leaf
    submodule (what :class:`_Tracer` keeps whole) a ``call_module`` node, parameters ``get_attr`` nodes.
    Python control flow is simply the path this run took."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}  # id(tensor) -> the node that produced it
        self.alive: list[Tensor] = []  # keeps recorded tensors alive, so their ids are not reused
        self.attrs = {id(t): n for n, t in [*root.named_parameters(), *root.named_buffers()]}
        self.inside = 0  # > 0 while a leaf module runs: its own ops are not recorded

    def arg(self, a: Any) -> Any:
        if isinstance(a, Tensor):
            if id(a) in self.nodes:
                return self.nodes[id(a)]
            if id(a) in self.attrs:
                node = self.nodes[id(a)] = self.graph.get_attr(self.attrs[id(a)])
                self.alive.append(a)
                return node
            return None  # a tensor from outside the run (a constant): no channels to follow
        if isinstance(a, list | tuple):
            return type(a)(self.arg(x) for x in a) if not hasattr(a, "_fields") else None
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        return a if isinstance(a, int | float | bool | str | type(None) | slice | torch.dtype) else None

    def bind(self, out: Any, node: fx.Node) -> None:
        leaves = tree_flatten(out)[0]
        tensors = [(i, t) for i, t in enumerate(leaves) if isinstance(t, Tensor)]
        if isinstance(out, Tensor):
            self.nodes[id(out)] = node
            self.alive.append(out)
            return
        for i, t in tensors:
            self.nodes[id(t)] = self.graph.call_function(operator.getitem, (node, i))
            self.alive.append(t)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside or not any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
            return out
        objclass = getattr(func, "__objclass__", None)
        if objclass is not None and issubclass(torch.Tensor, objclass):  # a Tensor method: x.add(y), x.view(...)
            node = self.graph.call_method(func.__name__, self.arg(tuple(args)), self.arg(kwargs))
        else:
            node = self.graph.call_function(func, self.arg(tuple(args)), self.arg(kwargs))
        self.bind(out, node)
        return out


def _recorded_graph(module: nn.Module, call: Call) -> fx.GraphModule:
    args, kwargs, _ = call
    rec = _Recorder(module)
    tracer = _Tracer()
    for i, a in enumerate(tree_flatten((args, kwargs))[0]):
        if isinstance(a, Tensor):
            rec.nodes[id(a)] = rec.graph.placeholder(f"input_{i}")
            rec.alive.append(a)
    pending: dict[int, tuple[Any, Any]] = {}

    def pre(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> None:
        if not rec.inside:
            pending[id(m)] = (rec.arg(a), rec.arg(k))
        rec.inside += 1

    def post(m: nn.Module, _a: Any, _k: Any, out: Any, name: str = "") -> None:
        rec.inside -= 1
        if not rec.inside:
            margs, mkwargs = pending.pop(id(m))
            rec.bind(out, rec.graph.call_module(name, margs, mkwargs))

    hooks = []
    for name, m in module.named_modules():
        if name and tracer.is_leaf_module(m, name):
            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(m.register_forward_hook(functools.partial(post, name=name), with_kwargs=True))
    try:
        with torch.no_grad(), rec:
            out = module(*args, **kwargs)
        rec.graph.output(rec.arg(out if isinstance(out, Tensor) else tuple(tree_flatten(out)[0])))
    finally:
        for h in hooks:
            h.remove()
    return fx.GraphModule(module, rec.graph)


def _record_calls(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> dict[int, Call]:
    """The first call (args, kwargs, output) of the model and every submodule that holds others."""
    calls: dict[int, Call] = {}
    pending: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pending.setdefault(id(m), (args, kwargs))

    def post(m: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], out: Any) -> None:
        if id(m) not in calls and id(m) in pending:
            calls[id(m)] = (*pending[id(m)], out)

    mods = [m for m in model.modules() if m is model or not _opaque_layer(m)]
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception:  # e.g. a LightningModule without forward: the submodules that ran are recorded
        pass
    finally:
        for h in hooks:
            h.remove()
    return calls


def _opaque_layer(module: nn.Module) -> bool:
    """A module with nothing inside to analyse: a torch.nn layer (conv, BN, ...) is a boundary on its own."""
    return not any(True for _ in module.children()) or (
        type(module).__module__.startswith("torch.nn") and not isinstance(module, nn.Sequential | nn.ModuleList)
    )


def _prefixed(a: GraphAnalysis, prefix: str) -> GraphAnalysis:
    def q(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    spaces = [
        ChannelSpace(
            sp.size, [q(n) for n in sp.producers], [q(n) for n in sp.passthrough],
            [(q(n), off, hw) for n, off, hw in sp.consumers], list(sp.blocked), [q(n) for n in sp.mixing],
            [q(n) for n in sp.zero_only], {q(n): off for n, off in sp.offsets.items()},
        )
        for sp in a.spaces
    ]  # fmt: skip
    return GraphAnalysis(
        spaces, [[q(n) for n in b] for b in a.depth_branches], {q(n) for n in a.terminal_modules},
        list(a.unsupported), {q(n) for n in a.multi_called}, {q(n): r for n, r in a.untraced.items()},
        {q(n): r for n, r in a.recorded.items()},
    )  # fmt: skip


def _analyze_tree(
    module: nn.Module, prefix: str, out: list[GraphAnalysis], memo: dict[int, _Piece], calls: dict[int, Call]
) -> None:
    if prefix and _opaque_layer(module):
        return
    piece = _piece(module, memo, calls)
    if piece.gm is not None:
        part = _prefixed(_Analyzer(piece.gm, prefix, piece.leaves).run(), prefix)
        if piece.recorded:
            part.recorded[prefix] = piece.reason
        out.append(part)
        inner = sorted(piece.leaves)
    else:
        out.append(GraphAnalysis([], [], set(), [], untraced={prefix: piece.reason}))
        inner = [name for name, _ in module.named_children()]
    for name in inner:
        _analyze_tree(module.get_submodule(name), f"{prefix}.{name}" if prefix else name, out, memo, calls)


def analyze(model: nn.Module, example_inputs: Sequence[Tensor] | None = None) -> GraphAnalysis:
    """Trace ``model`` with ``torch.fx`` and return its channel spaces and residual branches.

    A model that does not trace as a whole is analysed piecewise (see the module docstring); channels that
    cross an untraceable module's code stay whole, and :attr:`GraphAnalysis.untraced` names each such module
    with the reason; it never raises for a model it cannot trace.
    example_inputs: when given, the model runs once on them and every traced graph must reproduce its
    module's output; a graph that does not (Python control flow the tracer resolved differently from the
    real run) counts as untraceable, so the analysis never follows a wrong graph.
    """
    parts: list[GraphAnalysis] = []
    training = model.training
    try:
        model.eval()  # dropout would make a correct graph disagree with the recorded call
        calls = _record_calls(model, tuple(example_inputs)) if example_inputs is not None else {}
        _analyze_tree(model, "", parts, {}, calls)
    finally:
        model.train(training)
    root_traced = "" not in parts[0].untraced
    merged = GraphAnalysis([], [], set(), [])
    for part in parts:
        merged.spaces += part.spaces
        merged.depth_branches += part.depth_branches
        merged.unsupported += part.unsupported
        merged.multi_called |= part.multi_called
        merged.untraced.update(part.untraced)
        merged.recorded.update(part.recorded)
    # Only the whole model's graph says which layers produce its outputs; when untraceable code hides them,
    # the last registered weight layer is taken as the output layer (its filters get no groups).
    merged.terminal_modules = set(parts[0].terminal_modules) if root_traced else set()
    if not merged.terminal_modules and merged.untraced:
        weighted = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        merged.terminal_modules = set(weighted[-1:])
    for name, reason in merged.untraced.items():
        merged.unsupported.append(f"{name or type(model).__name__} is not traceable by torch.fx ({reason})")
    return merged


CallArgs = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) of one call


def capture_calls(
    model: nn.Module, names: Sequence[str], trials: Sequence[tuple[Tensor, ...]], run: Callable[..., object]
) -> dict[str, list[CallArgs]]:
    """The (args, kwargs) every named submodule is called with, each call of every trial (``run(model, trial)``)."""
    calls: dict[str, list[CallArgs]] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, k, n=n: calls[n].append((a, k)), with_kwargs=True
        )
        for n in names
    ]
    try:
        if names:
            for trial in trials:
                run(model, trial)
    finally:
        for h in hooks:
            h.remove()
    return calls


def capture_inputs(
    model: nn.Module, names: Sequence[str], trials: Sequence[tuple[Tensor, ...]], run: Callable[..., object]
) -> dict[str, list[Tensor]]:
    """The first positional input each named module receives, once per call of every trial."""
    return {n: [a[0].detach() for a, _ in calls] for n, calls in capture_calls(model, names, trials, run).items()}

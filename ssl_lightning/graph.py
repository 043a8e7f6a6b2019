"""Channel-dependency analysis of a model with ``torch.fx``.

Every tensor flowing through the traced graph is described by the *channel spaces* that make up its
dim 1: a conv/linear creates a fresh space (its output channels), BN / activations / pooling pass it
through, a residual add (or any channel-aligned binary op) merges the spaces of its operands, a
concat along dim 1 lays spaces side by side, and a flatten keeps the spaces with a spatial factor that
a following Linear recovers as ``in_features // channels``. A space that reaches the model output, a
model input, or an op the analysis does not know is *blocked*: its channels cannot be removed.

The result tells :mod:`ssl_lightning.groups` which slices of which tensors form one coupled channel
group, and which residual branches form one depth group.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelSpace", "GraphAnalysis", "analyze", "capture_inputs"]

# Modules and functions that keep dim 1 channel-for-channel.
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LocalResponseNorm,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)  # fmt: skip
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


@dataclass
class ChannelSpace:
    """A set of channels that must be kept or removed together.

    producers: modules whose output rows are these channels (conv filters / linear neurons + bias).
    passthrough: modules with one parameter slice per channel (BatchNorm affine, depthwise conv rows).
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


@dataclass
class _Value:
    segments: list[tuple[int, int | None]]  # (space id, channels) along dim 1, in order
    flat: bool = False  # after a flatten: dim 1 is channels x spatial positions


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


class _Analyzer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
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
        sa.producers += sb.producers
        sa.passthrough += sb.passthrough
        sa.consumers += sb.consumers
        sa.blocked += sb.blocked
        sa.mixing += sb.mixing
        sa.zero_only += sb.zero_only

    def space(self, i: int) -> ChannelSpace:
        return self.spaces[self.find(i)]

    def block(self, value: object, reason: str) -> None:
        if isinstance(value, _Value):
            for sid, _ in value.segments:
                self.space(sid).blocked.append(reason)

    def _channelwise(self, x: _Value, name: str, mod: nn.Module) -> None:
        """A layer with one parameter slice per channel (BN affine, depthwise conv, PReLU) passes its input's
        channel spaces through. Over a concatenation its slices for each joined space start at that space's
        offset, which the plans and coupled groups do not follow yet: those spaces are blocked (kept whole and
        uncoupled) rather than sliced or coupled at the wrong channels."""
        if len(x.segments) > 1:
            self.block(x, f"{name} ({type(mod).__name__}) is channel-wise over a concatenation")
            return
        self.space(x.segments[0][0]).passthrough.append(name)

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
                out = _Value([(self.new_space(None, "model input"), None)])
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
                elif isinstance(mod, nn.Linear) and isinstance(x, _Value):
                    anc.add(name)
                    channels = sum(n or 0 for _, n in x.segments)
                    self.consume(x, name, channels, features=mod.in_features)
                    sid = self.new_space(mod.out_features)
                    self.spaces[sid].producers.append(name)
                    out = _Value([(sid, mod.out_features)])
                elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and isinstance(x, _Value):
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
                    reason = f"unsupported module {name} ({type(mod).__name__})"
                    for a in args:
                        self.block(a, reason)
                    self.notes.append(reason)
                    out = _Value([(self.new_space(None, reason), None)])
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
                        self.block(v, "model output")
            env[node] = out
            weight_ancestors[node] = frozenset(anc)

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
        if (is_fn and target is getattr) or (not is_fn and target in _IGNORED_METHODS):
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
        if len(ins) != 2:
            return []
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


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__name__ in _COMPACTED_LAYERS and type(m).__module__.startswith("ssl_lightning."):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def analyze(model: nn.Module) -> GraphAnalysis:
    """Trace ``model`` with ``torch.fx`` and return its channel spaces and residual branches.

    Raises ``RuntimeError`` (with the tracer's message) when the model is not symbolically traceable.
    """
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:
        raise RuntimeError(
            f"torch.fx could not trace {type(model).__name__}: {err}. Coupled and depth groups need a "
            "traceable model; use uncoupled group types or list depth blocks explicitly (depth_blocks=...)."
        ) from err
    return _Analyzer(gm).run()


def capture_inputs(
    model: nn.Module, names: Sequence[str], trials: Sequence[tuple[Tensor, ...]], run: Callable[..., object]
) -> dict[str, list[Tensor]]:
    """The first positional input each named module receives, once per trial (``run(model, trial)``)."""
    seen: dict[str, list[Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach())) for n in names]
    try:
        for trial in trials:
            run(model, trial)
    finally:
        for h in hooks:
            h.remove()
    return seen

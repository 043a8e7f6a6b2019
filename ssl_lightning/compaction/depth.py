"""Depth removal: a residual branch whose weights are all zero is cut out of the forward pass.

Depth-wise SSL drives every weight of a residual branch to zero; what the branch still adds is a
constant per channel (its last bias / BN shift, through the activations). The smallest module that
holds the branch and its residual add (e.g. ``blocks.3``) is traced with ``torch.fx``; the branch operand
of the add becomes a buffer holding that constant (measured on the example inputs and checked to be
constant), and the branch's now-dead modules are dropped from the graph. The rewritten block is a
``torch.fx.GraphModule`` at the same path, so the rest of the model, its class and its other
parameter names are unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ssl_lightning.graph import CallArgs, analyze, capture_calls, trace_module

__all__ = ["apply_depth_plan", "plan_and_remove_depth"]

_ADD_TARGETS = (operator.add, operator.iadd, torch.add, "add", "add_")


def _branch_is_zero(model: nn.Module, branch: Sequence[str]) -> bool:
    mods = dict(model.named_modules())
    for name in branch:
        w = getattr(mods[name], "weight", None)
        if not isinstance(w, Tensor) or bool((w != 0).any()):
            return False
    return bool(branch)


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]  # parent path of every branch module
    prefix: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _find_add(gm: fx.GraphModule, branch: set[str]) -> tuple[fx.Node, int] | None:
    """The add node in ``gm`` with the branch on exactly one side: (node, index of the branch operand)."""
    anc: dict[fx.Node, frozenset[str]] = {}
    found: tuple[fx.Node, int] | None = None
    for node in gm.graph.nodes:
        s: set[str] = set()
        for inp in node.all_input_nodes:
            s |= anc[inp]
        if node.op == "call_module":  # a leaf holding branch modules (its own code untraceable) counts for them
            s.add(str(node.target))
            s.update(b for b in branch if b.startswith(f"{node.target}."))
        anc[node] = frozenset(s)
        if node.op in ("call_function", "call_method") and node.target in _ADD_TARGETS and len(node.args) >= 2:
            a, b = node.args[0], node.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            sa, sb = anc[a] & branch, anc[b] & branch
            if sa == branch and not sb:
                found = (node, 0)
            elif sb == branch and not sa:
                found = (node, 1)
    return found


def _rewrite(sub: nn.Module, add_name: str, operand: int, const: Tensor, buffer: str) -> fx.GraphModule:
    gm = trace_module(sub)
    nodes = {n.name: n for n in gm.graph.nodes}
    if add_name not in nodes:
        raise ValueError(f"depth plan names node {add_name!r}, which the traced module does not have")
    add = nodes[add_name]
    gm.register_buffer(buffer, const.clone())
    with gm.graph.inserting_before(add):
        attr = gm.graph.get_attr(buffer)
    args = list(add.args)
    args[operand] = attr
    add.args = tuple(args)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def plan_and_remove_depth(
    model: nn.Module, trials: Sequence[tuple[Tensor, ...]], run: Callable[..., object]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Remove, in place, every all-zero residual branch of ``model`` (eval mode) whose output is a measured
    per-channel constant. Returns the plan entries (JSON-able) and notes on zero branches left in place."""
    analysis = analyze(model, trials[0])
    plan: list[dict[str, Any]] = []
    notes: list[str] = []
    found: dict[str, tuple[list[str], nn.Module, fx.GraphModule, fx.Node, int]] = {}  # block -> rewrite target
    for branch in analysis.depth_branches:
        if not _branch_is_zero(model, branch):
            continue
        hit, why = _enclosing_block(model, branch, found)
        if hit is None:
            notes.append(why)
            continue
        found[hit[0]] = (branch, *hit[1:])
    # One pass over the trials records every candidate block's calls (a rewrite keeps outputs equal, so the
    # inputs of the other blocks stay valid).
    calls = capture_calls(model, list(found), trials, run)
    for prefix, (branch, sub, gm, add, operand) in found.items():
        const = _measure(gm, add.args[operand], calls[prefix])  # type: ignore[arg-type]
        if const is None:
            notes.append(f"zero branch in {prefix}: its output is not constant per channel; kept")
            continue
        buffer = "ssl_depth_const_0"
        model.set_submodule(prefix, _rewrite(sub, add.name, operand, const, buffer))
        plan.append({"module": prefix, "add": add.name, "operand": operand, "shape": list(const.shape),
                     "buffer": buffer, "removed": sorted(branch)})  # fmt: skip
    return plan, notes


def _enclosing_block(
    model: nn.Module, branch: Sequence[str], taken: Collection[str]
) -> tuple[tuple[str, nn.Module, fx.GraphModule, fx.Node, int] | None, str]:
    """The smallest traceable submodule holding the branch *and* its residual add: the branch's common parent,
    else its parent and so on (a block whose branch is its own ``Sequential``, e.g. MONAI ``ResidualUnit``).
    Returns (prefix, module, graph, add node, branch operand), or None with the reason it is kept."""
    parts = _common_prefix(branch).split(".")
    last = f"zero branch {list(branch)}: no enclosing submodule holds its residual add; kept"
    while parts and parts[0]:
        prefix = ".".join(parts)
        parts.pop()
        if prefix in taken:
            return None, f"zero branch {list(branch)}: {prefix} already has a branch removed; kept"
        sub = model.get_submodule(prefix)
        try:
            gm = trace_module(sub)
        except Exception as err:  # not traceable at this level: try the parent
            last = f"zero branch in {prefix}: not traceable ({type(err).__name__}: {err}); kept"
            continue
        hit = _find_add(gm, {n[len(prefix) + 1 :] for n in branch})
        if hit is not None:
            return (prefix, sub, gm, *hit), ""
        last = f"zero branch in {prefix}: its residual add is not inside {prefix}; kept"
    return None, last


def _measure(gm: fx.GraphModule, node: fx.Node, calls: Sequence[CallArgs]) -> Tensor | None:
    """The branch operand's value as [1, C, 1...] if it is the same at every batch item and position, else None."""
    values: list[Tensor] = []

    class Grab(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n is node:
                values.append(out.detach())
            return out

    with torch.no_grad():
        for args, kwargs in calls:
            Grab(gm).run(*args, **kwargs)
    if not values or any(v.dim() < 2 for v in values):
        return None
    c = values[0].shape[1]
    flat = torch.cat([v.transpose(0, 1).reshape(c, -1) for v in values], 1).float()
    lo, hi = flat.amin(1), flat.amax(1)
    if bool((hi - lo > 1e-6 * torch.maximum(lo.abs(), hi.abs()) + 1e-30).any()):
        return None
    shape = [1, c] + [1] * (values[0].dim() - 2)
    return flat.mean(1).to(values[0].dtype).reshape(shape)


def apply_depth_plan(model: nn.Module, plan: Sequence[dict[str, Any]]) -> None:
    """Redo, in place, the branch removals in ``plan`` on a freshly built model (constants are zeros until a
    state_dict is loaded). Raises ``ValueError`` naming the module when the model does not fit the plan."""
    for entry in plan:
        prefix = entry["module"]
        try:
            sub = model.get_submodule(prefix)
        except AttributeError as err:
            raise ValueError(f"depth plan names {prefix!r}, which this model does not have") from err
        const = torch.zeros(entry["shape"])
        model.set_submodule(prefix, _rewrite(sub, entry["add"], int(entry["operand"]), const, entry["buffer"]))

"""Walk a captured graph once, applying each node's channel rule.

Placeholders get fresh atoms per dimension (the model's own inputs are frozen); each
call_function node's rule relates its arguments and returns its output layout; the output
node freezes everything the model returns. An op with no rule, or whose rule fails, freezes
every dimension it touches and is reported.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from graphprune.analysis import rules_layers, rules_pointwise, rules_shape  # noqa: F401 (registers)
from graphprune.analysis.atoms import AtomTable
from graphprune.analysis.registry import (
    Facts,
    Layout,
    RuleContext,
    TensorArg,
    Value,
    flatten_args,
    is_layout,
    lookup,
    op_name,
)
from graphprune.capture import Captured, owning_module

aten = torch.ops.aten

# ops that read tensors but produce no tensor and constrain no channel
_HARMLESS = {
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
}


@dataclass
class Walked:
    """The raw result of the walk, before grouping."""

    table: AtomTable
    facts: Facts
    values: dict[str, Value]  # fx node name -> layout (or list of layouts / None)
    display: dict[str, str]  # fx node name -> name shown to users (FQN for parameters)
    modules: dict[str, str]  # fx node name -> owning module FQN


def walk(captured: Captured) -> Walked:
    table, facts = AtomTable(), Facts()
    values: dict[str, Value] = {}
    display: dict[str, str] = {}
    modules: dict[str, str] = {}
    by_fqn: dict[str, Layout] = {}
    for node in captured.graph.nodes:
        modules[node.name] = owning_module(node)
        if node.op == "placeholder":
            display[node.name] = captured.state_fqn.get(node.name, f"input:{node.name}")
            values[node.name] = _placeholder(node, captured, table, facts, by_fqn)
        elif node.op == "call_function":
            display[node.name] = node.name
            values[node.name] = _call(node, modules[node.name], table, values, facts)
        elif node.op == "output":
            for arg in flatten_args(node.args):
                if not isinstance(arg, fx.Node):
                    continue
                layout = values.get(arg.name)
                for d, atoms in enumerate(_layouts(layout)):
                    facts.frozen.append((atoms, f"model output '{arg.name}' dim {d}"))
        else:  # get_attr of a submodule (control flow): nothing we can see through
            display[node.name] = node.name
            values[node.name] = None
    return Walked(table, facts, values, display, modules)


def _placeholder(
    node: fx.Node, captured: Captured, table: AtomTable, facts: Facts, by_fqn: dict[str, Layout]
) -> Value:
    meta = node.meta.get("val")
    if not isinstance(meta, torch.Tensor):
        return None
    fqn = captured.state_fqn.get(node.name)
    if fqn is not None:  # tied weights may be lifted once per name: they are one tensor
        for alias in captured.aliases.get(fqn, [fqn]):
            if alias in by_fqn:
                return by_fqn[alias]
    label = fqn if fqn is not None else f"input:{node.name}"
    layout = [table.new_space(int(s), f"{label}[{d}]") for d, s in enumerate(meta.shape)]
    if fqn is not None:
        by_fqn[fqn] = layout
    else:
        what = (
            f"model input '{node.name}'"
            if node.name in captured.user_inputs
            else f"tensor constant '{node.name}' made by the forward"
        )
        for d, atoms in enumerate(layout):
            facts.frozen.append((atoms, f"{what} dim {d}"))
    return layout


def _call(
    node: fx.Node, module: str, table: AtomTable, values: dict[str, Value], facts: Facts
) -> Value:
    if node.target is operator.getitem:
        source, index = node.args
        value = values.get(source.name) if isinstance(source, fx.Node) else None
        if not isinstance(value, list) or is_layout(value):
            return None
        picked = value[int(index)]  # type: ignore[arg-type]
        if isinstance(source, fx.Node) and is_layout(picked):  # link to split's input
            src_ctx = RuleContext(source, module, table, values, facts)
            _auto_link(RuleContext(node, module, table, values, facts), picked, src_ctx.tensors())
        return picked
    if node.target in _HARMLESS:
        return None
    ctx = RuleContext(node, module, table, values, facts)
    fn = lookup(node.target)
    if fn is None:
        return _unsupported(ctx, f"op {ctx.op} has no channel rule")
    try:
        value = fn(ctx)
    except Exception as exc:  # a rule that cannot handle this call must not guess
        return _unsupported(ctx, f"rule for {ctx.op} failed: {type(exc).__name__}: {exc}")
    problem = _check(value, node.meta.get("val"))
    if problem:
        return _unsupported(ctx, f"rule for {ctx.op} produced {problem}")
    _auto_link(ctx, value, ctx.tensors())
    return value


def _unsupported(ctx: RuleContext, reason: str) -> Value:
    """Freeze every dim of every tensor argument and of the output; report the op."""
    ctx.facts.unsupported.append((ctx.node.name, ctx.op, reason))
    for t in ctx.tensors():
        for atoms in t.layout:
            ctx.freeze(atoms, reason)
    return _fresh_like(ctx, ctx.node.meta.get("val"), reason)


def _fresh_like(ctx: RuleContext, meta: object, reason: str) -> Value:
    if isinstance(meta, torch.Tensor):
        layout = [ctx.fresh(int(s), f"unknown{d}") for d, s in enumerate(meta.shape)]
        for atoms in layout:
            ctx.freeze(atoms, reason)
        return layout
    if isinstance(meta, list | tuple):
        return [_fresh_like(ctx, m, reason) for m in meta]
    return None


def _check(value: Value, meta: object) -> str | None:
    """Layouts must have one atom array per dim, each as long as the dim."""
    if isinstance(meta, torch.Tensor):
        if not is_layout(value):
            return "no layout for a tensor output"
        shape = tuple(int(s) for s in meta.shape)
        sizes = tuple(int(a.shape[0]) for a in value)
        return None if sizes == shape else f"a layout of sizes {sizes} for shape {shape}"
    if isinstance(meta, list | tuple):
        if not isinstance(value, list) or len(value) != len(meta):
            return "the wrong number of outputs"
        for v, m in zip(value, meta, strict=True):
            problem = _check(v, m)
            if problem:
                return problem
    return None


def _auto_link(ctx: RuleContext, value: Value, inputs: list[TensorArg]) -> None:
    """Edges for output dims that hold some of an input dim's atoms (identity, slice, cat)."""
    if not is_layout(value):
        return
    for t in inputs:
        for d, atoms in enumerate(t.layout):
            for k, out in enumerate(value):
                if out is atoms or np.intersect1d(out, atoms).size:
                    ctx.link(t.dim(d), k, "passes through")


def _layouts(value: Value) -> list[np.ndarray]:
    if is_layout(value):
        return list(value)
    if isinstance(value, list):
        return [a for v in value for a in _layouts(v)]
    return []


__all__ = ["Layout", "Walked", "op_name", "walk"]

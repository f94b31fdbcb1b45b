"""drop_layers: replace whole residual blocks ``y = x + f(x) + g(...)`` by identity.

A module is a residual block when, in the captured graph, its single output is reached from its
first tensor input through ``add`` ops only (every other path into those adds is a branch the
block computes), and output and input have the same shape. Dropping it leaves ``y = x``, so the
model stays valid; the block's contribution ``||y - x|| / ||x||`` on calibration inputs says how
much is lost. Only the innermost such modules are candidates (not a Sequential of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from graphprune.capture import Captured, normalize_inputs, own_thread, run_eval
from graphprune.hf import layer_paths, remove_layers
from graphprune.modules import SkipBlock
from graphprune.passes.base import PassContext, PassResult

aten = torch.ops.aten


def _stack(node: fx.Node) -> list[str]:
    return [path for path, _type in (node.meta.get("nn_module_stack") or {}).values()]


def residual_blocks(captured: Captured) -> list[str]:
    """Module paths whose forward is ``x + branches`` (see the module docstring)."""
    nodes = [n for n in captured.graph.nodes if n.op == "call_function"]
    inside: dict[str, set[fx.Node]] = {}
    for n in nodes:
        for path in _stack(n):
            if path:
                inside.setdefault(path, set()).add(n)
    found = []
    for path, members in inside.items():
        outputs = [n for n in members if any(u not in members for u in n.users)]
        inputs = [
            a
            for n in members
            for a in n.all_input_nodes
            if a not in members and a.name not in captured.state_fqn
        ]
        if len(outputs) != 1 or not inputs:
            continue
        y = outputs[0]
        if any(_same_shape(x, y) and _trunk(y, x, members) for x in dict.fromkeys(inputs)):
            found.append(path)
    return [p for p in found if not any(q != p and q.startswith(p + ".") for q in found)]


def droppable_blocks(model: nn.Module, captured: Captured, example_inputs: Any = None) -> list[str]:
    """The candidates of granularity='layers': an HF model's layer list, else residual blocks.
    With ``example_inputs``, only blocks a skip can replace -- whose output is shaped like
    their first input -- and where a layer list holds stages that change shape (HF Swin), the
    residual blocks inside them if more of those qualify."""
    listed = layer_paths(model) or residual_blocks(captured)
    if example_inputs is None:
        return listed
    inner = residual_blocks(captured)
    io = block_io(model, list(dict.fromkeys(listed + inner)), example_inputs)
    found = [b for b in listed if io[b].keeps_shape]
    if len(found) < len(listed):
        inside = [b for b in inner if io[b].keeps_shape]
        found = inside if len(inside) > len(found) else found
    return found


@dataclass
class BlockIO:
    """What one block's forward returned, seen by a hook."""

    keeps_shape: bool = False  # its output (first of a tuple) is shaped like its first input
    arity: int = 0  # the length of the tuple it returns (HF Swin: (hidden, attn)); 0: a tensor


def block_io(model: nn.Module, blocks: list[str], example_inputs: Any) -> dict[str, BlockIO]:
    """:class:`BlockIO` of each block (never called: the default), from one eval forward."""
    found = {b: BlockIO() for b in blocks}

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states")  # HF layers: by name too
            y = out[0] if isinstance(out, tuple) else out
            found[name] = BlockIO(
                isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape,
                len(out) if isinstance(out, tuple) else 0,
            )  # returns None: the output stays

        return record

    handles = [
        model.get_submodule(b).register_forward_hook(own_thread(hook(b)), with_kwargs=True)
        for b in blocks
    ]
    try:
        run_eval(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def _trunk(node: fx.Node, x: fx.Node, members: set[fx.Node]) -> bool:
    """Is ``node`` = x + (anything), through add ops inside the module only?"""
    while node in members and node.target == aten.add.Tensor and len(node.args) == 2:
        if "alpha" in node.kwargs:
            return False
        a, b = node.args
        if x in (a, b):
            return True
        if isinstance(a, fx.Node) and a in members and a.target == aten.add.Tensor:
            node = a
        elif isinstance(b, fx.Node) and b in members and b.target == aten.add.Tensor:
            node = b
        else:
            return False
    return False


def block_contributions(
    model: nn.Module, blocks: list[str], batches: Iterable[Any]
) -> dict[str, float]:
    """Mean ``||block(x) - x|| / ||x||`` per block over the batches (forward hooks, no grad);
    the blocks are droppable ones (:func:`droppable_blocks`), shaped like their input."""
    totals = {b: 0.0 for b in blocks}
    counts = {b: 0 for b in blocks}
    handles = []

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # HF layers may take it by name
            y = out[0] if isinstance(out, tuple) else out
            totals[name] += float((y - x).norm() / x.norm().clamp_min(1e-12))
            counts[name] += 1

        return record

    for b in blocks:
        block = model.get_submodule(b)
        handles.append(block.register_forward_hook(own_thread(hook(b)), with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = normalize_inputs(batch)
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {b: totals[b] / max(counts[b], 1) for b in blocks}


@dataclass
class DropLayers:
    blocks: list[str] = field(default_factory=list)
    name: str = "drop_layers"

    def __call__(self, ctx: PassContext) -> PassResult:
        if remove_layers(ctx.model, self.blocks):  # an HF layer list: delete, renumber
            ctx.dropped.extend(self.blocks)
            ctx.changes.extend(f"{path}: removed from the layer list" for path in self.blocks)
            return PassResult(True)
        io = block_io(ctx.model, self.blocks, ctx.example_inputs)
        for path in self.blocks:
            parent, _, child = path.rpartition(".")
            owner = ctx.model.get_submodule(parent) if parent else ctx.model
            old = owner.get_submodule(child)
            setattr(owner, child, SkipBlock(type(old).__name__, io[path].arity))
            ctx.dropped.append(path)
            ctx.changes.append(f"{path}: {type(old).__name__} -> SkipBlock (identity)")
        return PassResult(bool(self.blocks))

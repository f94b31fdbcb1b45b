"""Verification after a pass: the rewritten model must capture again, every shape constant
must take the value the pruned channels imply, and the outputs keep their shapes.

A constant that kept its old value names the line of the forward that hard-codes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphprune.analysis.graph import ShapeConstantUse
from graphprune.analysis.registry import source_line
from graphprune.capture import capture, normalize_inputs
from graphprune.errors import CaptureError
from graphprune.passes.base import PassContext, PruneError
from graphprune.passes.shape_attributes import matching_uses


def argument_value(node: fx.Node, argument: str) -> int | None:
    """The integer at ``argument`` (as the analyzer named it) in ``node``'s arguments."""
    args: list[Any] = list(node.args)
    name, _, rest = argument.partition("[")
    k = int(rest.rstrip("]")) if rest else 0
    try:
        if name == "size":
            sizes = next(a for a in args if isinstance(a, list | tuple))
            return int(sizes[k])
        if name in ("split_size", "num_groups"):
            return int(args[1])
        if name in ("split_sizes", "normalized_shape"):
            return int(args[1][k])
        if name == "sizes":
            return int(args[2][k])
        if name == "start":
            return int(args[2])
        if name in ("end", "length"):
            return int(args[3])
        if name == "groups":
            index = 8 if "convolution" in str(node.target) else 6
            return int(args[index])
        if name == "arange":
            return int([a for a in args if isinstance(a, int)][k])
    except (IndexError, StopIteration, TypeError, ValueError):
        return None
    return None


def _sites(graph: fx.Graph) -> dict[str, tuple[str, str, int]]:
    """Node name -> (op, source line, occurrence): stable when other modules change shape."""
    seen: dict[tuple[str, str], int] = {}
    out = {}
    for n in graph.nodes:
        key = (str(n.target), source_line(n))
        out[n.name] = (*key, seen.get(key, 0))
        seen[key] = seen.get(key, 0) + 1
    return out


def _by_site(graph: fx.Graph) -> dict[tuple[str, str, int], fx.Node]:
    return {site: n for n, site in zip(graph.nodes, _sites(graph).values(), strict=True)}


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, list | tuple):
        return [_shapes(v) for v in value]
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return None


def output_shapes(model: torch.nn.Module, example_inputs: Any) -> Any:
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        return _shapes(model(*args, **kwargs))


def _suspects(ctx: PassContext) -> list[ShapeConstantUse]:
    """Changed constants that no module attribute produces: likely hard-coded."""
    return [
        c
        for c in ctx.dg.shape_constants
        if c.expected(ctx.kept) != c.value
        and not matching_uses(c, ctx.int_uses)
        and c.op.startswith(("aten.view", "aten.reshape", "aten.split", "aten.expand"))
    ]


def make_verifier(reference_shapes: Any) -> Any:
    def verify(ctx: PassContext) -> None:
        training = {m: m.training for m in ctx.model.modules()}
        try:
            captured = capture(ctx.model, ctx.example_inputs)
        except CaptureError as exc:
            lines = "; ".join(
                f"{c.source or c.node} needs {c.argument}={c.expected(ctx.kept)}"
                for c in _suspects(ctx)[:3]
            )
            hint = (
                (
                    f" — the forward may hard-code a size: {lines}; compute it from a module "
                    "attribute or the input shape"
                )
                if lines
                else ""
            )
            where = f" at {exc.source_line}" if exc.source_line else ""
            raise PruneError(
                f"the rewritten model no longer runs{where}: {exc.reason}{hint}"
            ) from exc
        finally:
            for m, t in training.items():
                m.train(t)
        if not ctx.dropped:
            nodes = _by_site(captured.graph)
            sites = _sites(ctx.captured.graph)
            for c in ctx.dg.shape_constants:
                node = nodes.get(sites[c.node])
                actual = argument_value(node, c.argument) if node is not None else None
                expected = c.expected(ctx.kept)
                if actual is not None and actual != expected:
                    raise PruneError(
                        f"{c.op} at {c.source or c.node}: {c.argument} is {actual} after "
                        f"pruning but the kept channels need {expected}; it is hard-coded or "
                        "derived from something graphprune cannot update — compute it from a "
                        "module attribute (e.g. self.n_head) or the input shape"
                    )
        shapes = output_shapes(ctx.model, ctx.example_inputs)
        if shapes != reference_shapes:
            raise PruneError(f"output shapes changed: {reference_shapes} -> {shapes}")

    return verify

"""Verification after a pass: the rewritten model must capture again, every shape constant
must take the value the pruned channels imply, and the outputs keep their shapes.

A constant that kept its old value names the line of the forward that hard-codes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphprune.analysis.arguments import argument_value
from graphprune.analysis.graph import ShapeConstantUse
from graphprune.analysis.registry import source_line
from graphprune.capture import capture, run_eval
from graphprune.errors import CaptureError
from graphprune.passes.base import PassContext, RewriteFailure


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
    """Shapes of the model's outputs (eval mode, no grad; the model's modes are restored)."""
    return _shapes(run_eval(model, example_inputs))


def _changed(ctx: PassContext) -> list[ShapeConstantUse]:
    """Constants whose value the kept channels change: what a failing forward may hard-code."""
    return [c for c in ctx.dg.shape_constants if c.expected(ctx.kept) != c.value]


def make_verifier(reference_shapes: Any) -> Any:
    def verify(ctx: PassContext) -> None:
        try:  # capture runs in eval mode and restores every module's mode
            captured = capture(ctx.model, ctx.example_inputs)
        except CaptureError as exc:
            line = ":".join((exc.source_line or "").split(":")[:2])
            suspects = [c for c in _changed(ctx) if line and c.source.startswith(line + ":")]
            lines = "; ".join(
                f"{c.source or c.node} needs {c.argument}={c.expected(ctx.kept)}"
                for c in (suspects or _changed(ctx))[:3]
            )
            hint = (
                f" — the forward may compute a size graphprune cannot follow: {lines}; compute "
                "it from a module attribute or the input shape"
                if lines
                else ""
            )
            where = f" at {exc.source_line}" if exc.source_line else ""
            raise RewriteFailure(
                f"the rewritten model no longer runs{where}: {exc.reason}{hint}",
                line=line,
                groups={g for c in suspects for g in c.groups},
            ) from exc
        if not ctx.dropped:
            nodes = _by_site(captured.graph)
            sites = _sites(ctx.captured.graph)
            for c in ctx.dg.shape_constants:
                node = nodes.get(sites[c.node])
                actual = argument_value(node, c.argument) if node is not None else None
                expected = c.expected(ctx.kept)
                if actual is not None and actual != -1 and actual != expected:  # -1: inferred
                    raise RewriteFailure(
                        f"{c.op} at {c.source or c.node}: {c.argument} is {actual} after "
                        f"pruning but the kept channels need {expected}; it is hard-coded or "
                        "derived from something graphprune cannot update — compute it from a "
                        "module attribute (e.g. self.n_head) or the input shape",
                        line=":".join(c.source.split(":")[:2]),
                        groups=set(c.groups),
                    )
        try:
            shapes = output_shapes(ctx.model, ctx.example_inputs)
        except Exception as exc:  # eager forward fails where the export did not
            raise RewriteFailure(
                f"the rewritten model no longer runs eagerly: {type(exc).__name__}: {exc}"
            ) from exc
        if shapes != reference_shapes:
            raise RewriteFailure(f"output shapes changed: {reference_shapes} -> {shapes}")

    return verify

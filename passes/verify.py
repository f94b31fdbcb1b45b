"""Verification after a rewrite: the rewritten model runs eagerly on the example inputs and
its outputs keep their shapes; where the kept channels change a shape constant of the graph,
the model is also captured again and every constant must take the value the pruned channels
imply (a constant that kept its old value names the line of the forward that hard-codes it).

The re-capture is needed only there: when no constant of the captured graph changes value, the
rewritten model computes the same graph with narrower tensors, and its eager forward checks
exactly that. That forward also counts the MACs of the pruned model (``ctx.macs``), so compile
needs no forward of its own for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from graphprune.analysis.arguments import argument_value
from graphprune.analysis.graph import ShapeConstantUse
from graphprune.analysis.observe import Observed, observe
from graphprune.analysis.provenance import CallKey
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


def shapes_of(value: Any) -> Any:
    """The shapes of a tensor, or of each tensor in nested lists, tuples and dicts (None for
    anything else)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, list | tuple):
        return [shapes_of(v) for v in value]
    if isinstance(value, dict):
        return {k: shapes_of(v) for k, v in value.items()}
    return None


def output_shapes(model: torch.nn.Module, example_inputs: Any) -> Any:
    """Shapes of the model's outputs (eval mode, no grad; the model's modes are restored)."""
    return shapes_of(run_eval(model, example_inputs))


def _changed(ctx: PassContext) -> list[ShapeConstantUse]:
    """Constants whose value the kept channels change: what a failing forward may hard-code."""
    return [c for c in ctx.dg.shape_constants if c.expected(ctx.kept) != c.value]


def make_verifier(
    reference_shapes: Any, forward: Callable[[torch.nn.Module, Any], Observed] = observe
) -> Any:
    """The verification of a rewrite (module docstring); ``forward`` runs the model once
    (under fake tensors for a model on the meta device)."""

    def verify(ctx: PassContext) -> None:
        try:
            observed = forward(ctx.model, ctx.example_inputs)
        except Exception as exc:
            if _changed(ctx):  # a stale constant: the re-capture names its line
                _check_constants(ctx)
            raise RewriteFailure(
                f"the rewritten model no longer runs eagerly: {type(exc).__name__}: {exc}"
            ) from exc
        ctx.macs = observed.macs
        shapes = shapes_of(observed.output)
        if shapes != reference_shapes:
            raise RewriteFailure(f"output shapes changed: {reference_shapes} -> {shapes}")
        if not ctx.dropped and _unread(ctx, observed.calls):
            _check_constants(ctx)

    return verify


def _unread(ctx: PassContext, calls: dict[CallKey, tuple[int, ...]]) -> list[ShapeConstantUse]:
    """Compare each shape constant with the value the rewritten forward passed at the same
    call (raising on a mismatch). Returns the changed constants that only a re-capture can
    check: those whose call in the original was not identified, or whose call now gets a
    different number of ints. A call the rewritten forward no longer makes (a module replaced
    by one of graphprune's, a loop that runs fewer times) has no constant left to check."""
    unread = []
    sizes = {g.id: g.size for g in ctx.dg.groups}
    pruned = {g for g, k in ctx.kept.items() if len(k) < sizes.get(g, len(k))}
    for c in ctx.dg.shape_constants:
        expected = c.expected(ctx.kept)
        call = ctx.calls.get((c.node, c.argument))
        if call is None:  # an attribute may change it with the product kept: check it there
            if expected != c.value or pruned.intersection(c.groups):
                unread.append(c)
            continue
        values = calls.get(call.key)
        if values is None:
            continue
        if len(values) != call.count:
            unread.append(c)
            continue
        actual = values[call.position]
        if actual != -1 and actual != expected:  # -1: inferred
            raise _stale(c, actual, expected)
    return unread


def _stale(c: ShapeConstantUse, actual: int, expected: int) -> RewriteFailure:
    return RewriteFailure(
        f"{c.op} at {c.source or c.node}: {c.argument} is {actual} after "
        f"pruning but the kept channels need {expected}; it is hard-coded or "
        "derived from something graphprune cannot update — compute it from a "
        "module attribute (e.g. self.n_head) or the input shape",
        line=":".join(c.source.split(":")[:2]),
        groups=set(c.groups),
    )


def _check_constants(ctx: PassContext) -> None:
    """Capture the rewritten model again; each shape constant must be what the kept channels
    need (a failing capture names the constants that may be hard-coded)."""
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
    if ctx.dropped:
        return
    nodes = _by_site(captured.graph)
    sites = _sites(ctx.captured.graph)
    for c in ctx.dg.shape_constants:
        node = nodes.get(sites[c.node])
        actual = argument_value(node, c.argument) if node is not None else None
        expected = c.expected(ctx.kept)
        if actual is not None and actual != -1 and actual != expected:  # -1: inferred
            raise _stale(c, actual, expected)

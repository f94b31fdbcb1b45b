"""The pass contract: ``Pass.__call__(ctx) -> PassResult``, run in order by a PassManager.

A structured rewrite is a sequence (:func:`graphprune.passes.structured_rewrite`): slice the
tensors, then the module attributes that describe them, then the int attributes behind shape
constants. The model is consistent only after the whole sequence, so the manager verifies it
once at the end (re-capture, shape constants, output shapes) when any pass changed it; a
failure names the pass and the passes that ran before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from graphprune.analysis import DependencyGraph
from graphprune.capture import Captured
from graphprune.errors import GraphPruneError
from graphprune.passes.undo import Undo
from graphprune.planning.relations import ConstantCall


class PruneError(GraphPruneError):
    """A rewrite that cannot be applied safely; says where and what to change."""


class RewriteFailure(PruneError):
    """A rewritten model that does not run or does not match its analysis, with what is known
    about the cause: the source line that failed and/or the groups whose channels reach it."""

    def __init__(self, message: str, *, line: str = "", groups: set[int] | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.groups = set(groups or ())


@dataclass
class PassContext:
    """What passes share: the model being rewritten and the analysis of its original form."""

    model: nn.Module
    example_inputs: Any
    captured: Captured
    dg: DependencyGraph
    kept: dict[int, list[int]] = field(default_factory=dict)  # group id -> kept channels
    attributes: dict[Any, int] = field(default_factory=dict)  # (module, attr, index) -> value
    changes: list[str] = field(default_factory=list)  # human-readable log of rewrites
    dropped: list[str] = field(default_factory=list)  # module paths replaced by a skip
    # (module path, attribute) the forward's torch calls read; None: not traced
    read_attributes: set[tuple[str, str]] | None = None
    # (node, argument) of a shape constant -> the original's eager call that passed it
    calls: dict[tuple[str, str], ConstantCall] = field(default_factory=dict)
    macs: int | None = None  # MACs of the rewritten model, counted by its verification
    undo: Undo | None = None  # in place: what slicing takes away, to put back on failure

    @property
    def prunes(self) -> bool:
        """Some group keeps fewer channels than it has."""
        sizes = {g.id: g.size for g in self.dg.groups}
        return any(len(k) < sizes[g] for g, k in self.kept.items())


@dataclass
class PassResult:
    modified: bool


class Pass(Protocol):
    name: str

    def __call__(self, ctx: PassContext) -> PassResult: ...


Verifier = Callable[[PassContext], None]


@dataclass
class PassManager:
    """Runs ``passes`` in order on one context, then verifies the result once."""

    passes: Sequence[Pass]
    verify: Verifier | None = None

    def __call__(self, ctx: PassContext) -> list[PassResult]:
        results: list[PassResult] = []
        for p in self.passes:
            results.append(self._run(p, ctx, [r.name for r in self.passes[: len(results)]]))
        if self.verify is not None and any(r.modified for r in results):
            self._run(_Verification(self.verify), ctx, [p.name for p in self.passes])
        return results

    @staticmethod
    def _run(p: Pass, ctx: PassContext, done: list[str]) -> PassResult:
        try:
            return p(ctx)
        except PruneError as exc:
            ran = ", ".join(done) or "none"
            message = f"pass '{p.name}' failed (passes that ran before: {ran}): {exc}"
            if isinstance(exc, RewriteFailure):
                raise RewriteFailure(message, line=exc.line, groups=exc.groups) from exc
            raise PruneError(message) from exc


@dataclass
class _Verification:
    """The verifier as the sequence's last step, so its failures name the passes before it."""

    check: Verifier
    name: str = "verify"

    def __call__(self, ctx: PassContext) -> PassResult:
        self.check(ctx)
        return PassResult(False)


@dataclass
class AttributePass:
    """A step after slicing that brings attributes in line with the tensors (``update``);
    nothing to do when no group is pruned."""

    name: str
    update: Callable[[PassContext], None]

    def __call__(self, ctx: PassContext) -> PassResult:
        if not ctx.prunes:
            return PassResult(False)
        self.update(ctx)
        return PassResult(True)

"""The pass contract: ``Pass.__call__(ctx) -> PassResult``, run in order by a PassManager.

Every pass leaves the model consistent (it runs); the manager re-verifies it after each pass
(re-capture, shape constants, output shapes) and, when one fails, says which passes already ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from graphprune.analysis import DependencyGraph
from graphprune.capture import Captured
from graphprune.errors import GraphPruneError


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


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def __call__(self, ctx: PassContext) -> PassResult: ...


Verifier = Callable[[PassContext], None]


@dataclass
class PassManager:
    passes: Sequence[Pass]
    verify: Verifier | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, ctx: PassContext) -> list[PassResult]:
        results: list[PassResult] = []
        done: list[str] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p(ctx)
                if result.modified and self.verify is not None:
                    self.verify(ctx)
            except PruneError as exc:
                ran = ", ".join(done) or "none"
                message = f"pass '{p.name}' failed (passes that ran before: {ran}): {exc}"
                if isinstance(exc, RewriteFailure):
                    raise RewriteFailure(message, line=exc.line, groups=exc.groups) from exc
                raise PruneError(message) from exc
            self.timings[p.name] = time.perf_counter() - start
            results.append(result)
            done.append(p.name)
        return results

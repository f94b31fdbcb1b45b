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


@dataclass
class PassContext:
    """What passes share: the model being rewritten and the analysis of its original form."""

    model: nn.Module
    example_inputs: Any
    captured: Captured
    dg: DependencyGraph
    kept: dict[int, list[int]] = field(default_factory=dict)  # group id -> kept channels
    int_uses: list[Any] = field(default_factory=list)  # provenance of module int attributes
    changes: list[str] = field(default_factory=list)  # human-readable log of rewrites
    dropped: list[str] = field(default_factory=list)  # module paths replaced by a skip


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
                raise PruneError(
                    f"pass '{p.name}' failed (passes that ran before: {ran}): {exc}"
                ) from exc
            self.timings[p.name] = time.perf_counter() - start
            results.append(result)
            done.append(p.name)
        return results

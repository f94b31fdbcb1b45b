"""Sparse-op rewriting: swap mostly-zero Linear / 1x1 conv layers for sparse-kernel modules.

For each candidate layer the pass times dense and each applicable sparse layout (CSR always;
BSR when the zeros form square blocks; 2:4 semi-structured on CUDA when the weight is 2:4) on
the layer's real weight at every requested row count, and converts the layer only when one
layout beats dense by ``min_speedup`` at *all* of them. Every layer gets a reason: converted
(with the measured speed-up) or left dense (with why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.kernels.crossover import KernelTimes, square_block, time_layouts
from graphprune.kernels.sparse_modules import SparseConv1x1, SparseLinear, is_pointwise
from graphprune.modules import weight_of
from graphprune.passes.base import PassContext, PassResult


@dataclass
class LayerDecision:
    module: str
    shape: tuple[int, int]  # (out, in) of the matrix product
    sparsity: float
    layout: str  # the chosen layout, "dense" when left dense
    reason: str
    times: list[KernelTimes] = field(default_factory=list)  # one per row count

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "shape": list(self.shape),
            "sparsity": self.sparsity,
            "layout": self.layout,
            "reason": self.reason,
            "times": [{"rows": t.rows, "micros": t.micros} for t in self.times],
        }


@dataclass
class SparsifyReport:
    decisions: list[LayerDecision] = field(default_factory=list)
    max_abs_error: float = 0.0  # sparse model vs dense model, on the example inputs

    @property
    def converted(self) -> dict[str, str]:
        return {d.module: d.layout for d in self.decisions if d.layout != "dense"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "decisions": [d.to_dict() for d in self.decisions],
            "max_abs_error": self.max_abs_error,
        }

    def table(self) -> str:
        lines = [f"{'layer':<32} {'(out, in)':>12} {'sparsity':>8}  layout  reason"]
        for d in self.decisions:
            lines.append(
                f"{d.module:<32} {d.shape!s:>12} {d.sparsity:>8.1%}  {d.layout:<6}  {d.reason}"
            )
        lines.append(
            f"converted {len(self.converted)} of {len(self.decisions)} layers; "
            f"max |sparse - dense| {self.max_abs_error:.2e}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def matrix_of(module: nn.Module) -> Tensor | None:
    """The (out, in) weight a sparse kernel would multiply by, or None if not applicable."""
    if isinstance(module, nn.Linear):
        return weight_of(module).detach()
    if is_pointwise(module):
        w = weight_of(module).detach()
        return w.reshape(w.shape[0], w.shape[1])
    return None


def is_two_four(weight: Tensor) -> bool:
    """At most 2 nonzeros in every 4 consecutive weights of a row."""
    if weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


class Sparsify:
    """The pass. ``rows``: FQN -> row counts seen by that layer (one per batch size)."""

    name = "sparsify"

    def __init__(
        self,
        rows: dict[str, list[int]],
        *,
        min_speedup: float = 1.1,
        min_sparsity: float = 0.5,
        layers: Sequence[str] | None = None,
        force: dict[str, str] | None = None,
        repeats: int = 25,
    ) -> None:
        self.rows, self.min_speedup, self.min_sparsity = rows, min_speedup, min_sparsity
        self.layers, self.force, self.repeats = layers, dict(force or {}), repeats
        self.report = SparsifyReport()

    def __call__(self, ctx: PassContext) -> PassResult:
        model = ctx.model
        for name, module in list(model.named_modules()):
            if self.layers is not None and not any(fnmatchcase(name, p) for p in self.layers):
                continue
            weight = matrix_of(module)
            if weight is None or name not in self.rows:
                continue
            decision = self._decide(name, weight)
            self.report.decisions.append(decision)
            if decision.layout != "dense":
                blocksize = square_block(weight) if decision.layout == "bsr" else None
                replacement: nn.Module = (
                    SparseLinear(module, decision.layout, blocksize)
                    if isinstance(module, nn.Linear)
                    else SparseConv1x1(module, decision.layout, blocksize)
                )
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, replacement)
                ctx.changes.append(f"{name}: dense -> {decision.layout} ({decision.reason})")
        return PassResult(bool(self.report.converted))

    def _candidates(self, weight: Tensor) -> tuple[list[str], int | None]:
        layouts = ["csr"]
        blocksize = square_block(weight)
        if blocksize is not None and not weight.is_cuda:
            layouts.append("bsr")
        if weight.is_cuda and is_two_four(weight) and _semi_structured_available():
            layouts = ["semi_structured"]  # CUDA: CSR/BSR kernels do not pay off at <= 50 %
        return layouts, blocksize

    def _decide(self, name: str, weight: Tensor) -> LayerDecision:
        sparsity = 1.0 - float((weight != 0).float().mean())
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        if name in self.force:
            return LayerDecision(name, shape, sparsity, self.force[name], "forced by the caller")
        if sparsity < self.min_sparsity:
            return LayerDecision(
                name, shape, sparsity, "dense", f"sparsity below {self.min_sparsity:.0%}"
            )
        layouts, blocksize = self._candidates(weight)
        times = [
            time_layouts(weight, r, layouts, repeats=self.repeats, blocksize=blocksize)
            for r in self.rows[name]
        ]
        # the layout that is fastest in the worst case over the row counts
        worst = {lay: min(t.speedup(lay) for t in times) for lay in layouts}
        best = max(worst, key=lambda lay: worst[lay])
        rows = "/".join(str(t.rows) for t in times)
        if worst[best] >= self.min_speedup:
            reason = f"{best} {worst[best]:.2f}x faster than dense at rows {rows} (measured)"
            return LayerDecision(name, shape, sparsity, best, reason, times)
        reason = (
            f"dense kept: best sparse kernel {best} only {worst[best]:.2f}x at rows {rows} "
            f"(needs {self.min_speedup:.2f}x)"
        )
        return LayerDecision(name, shape, sparsity, "dense", reason, times)


def _semi_structured_available() -> bool:
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()

"""Numerical equivalence of a model and its ONNX export in onnxruntime.

The same inputs go through torch and onnxruntime: the example inputs, random inputs of the same
shapes (token ids drawn from the example's range), and, for a dynamic batch, a different batch
size. Per output: max absolute error, and the max relative to the output's scale
(``max|a - b| / max|b|``). The check is normwise, ``max|a - b| <= atol + rtol * max|b|``: fp32
kernels that sum in another order err relative to the magnitudes they sum, not to an element
that happens to cancel to near zero (a random-init Inception-v3 has logits of 1e12, where
elementwise checks fail its own unpruned export), while a wrong channel is an O(1) error.
Above tolerance raises :class:`VerificationError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.capture import ExampleInputs, normalize_inputs, output_tensors
from graphprune.errors import GraphPruneError
from graphprune.onnx.runtime import denormals_flushed, feeds, session

FP32_TOLERANCE = (1e-4, 1e-3)  # (atol, rtol) suited to fp32 kernels that reorder sums


class VerificationError(GraphPruneError):
    """onnxruntime and torch disagree beyond the tolerance; the message has the numbers."""


@dataclass
class OutputError:
    input_set: str  # "example", "random 1", "batch 3", ...
    output: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class Verification:
    path: str
    atol: float
    rtol: float
    errors: list[OutputError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.errors)

    @property
    def max_abs(self) -> float:
        return max((e.max_abs for e in self.errors), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((e.max_rel for e in self.errors), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "max_abs": self.max_abs, "max_rel": self.max_rel}

    def table(self) -> str:
        lines = [f"{'inputs':<10} {'output':<12} {'max |Δ|':>10} {'max rel':>10}  ok"]
        for e in self.errors:
            lines.append(
                f"{e.input_set:<10} {e.output:<12} {e.max_abs:>10.2e} "
                f"{e.max_rel:>10.2e}  {'yes' if e.ok else 'NO'}"
            )
        return "\n".join(lines)


def input_sets(
    example_inputs: ExampleInputs,
    names: list[str],
    *,
    random: int = 2,
    other_batch: int | None = 3,
    seed: int = 0,
) -> dict[str, list[torch.Tensor]]:
    """Named lists of input tensors (in ``names`` order) to compare on."""
    args, kwargs = normalize_inputs(example_inputs)
    tensors = [
        t for t in (list(kwargs.values()) if kwargs else list(args)) if isinstance(t, torch.Tensor)
    ]
    assert len(tensors) == len(names)
    generator = torch.Generator().manual_seed(seed)

    def like(t: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        shape = (batch, *t.shape[1:]) if batch is not None else tuple(t.shape)
        if t.dtype.is_floating_point:
            return torch.randn(shape, generator=generator, dtype=t.dtype)
        if t.dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool)
        high = int(t.max()) + 1 if t.numel() else 2
        return torch.randint(0, max(high, 1), shape, generator=generator, dtype=t.dtype)

    sets = {"example": tensors}
    for i in range(random):
        sets[f"random {i + 1}"] = [like(t) for t in tensors]
    if other_batch is not None and tensors and other_batch != tensors[0].shape[0]:
        sets[f"batch {other_batch}"] = [like(t, other_batch) for t in tensors]
    return sets


def _torch_outputs(
    model: nn.Module, names: list[str], tensors: list[torch.Tensor], keyword: bool
) -> list[np.ndarray]:
    inputs = dict(zip(names, tensors, strict=True)) if keyword else tuple(tensors)
    return [o.detach().float().cpu().numpy() for o in output_tensors(model, inputs)]


@denormals_flushed
def verify(
    model: nn.Module,
    path: str | Path,
    example_inputs: ExampleInputs,
    input_names: list[str],
    output_names: list[str],
    *,
    dynamic_batch: bool = True,
    atol: float = FP32_TOLERANCE[0],
    rtol: float = FP32_TOLERANCE[1],
    raise_on_error: bool = True,
) -> Verification:
    """Compare torch and onnxruntime on several input sets; raise if they disagree."""
    _, kwargs = normalize_inputs(example_inputs)
    training = {m: m.training for m in model.modules()}
    model.eval()
    sess = session(path)
    report = Verification(str(path), atol, rtol)
    try:
        for label, tensors in input_sets(
            example_inputs, input_names, other_batch=3 if dynamic_batch else None
        ).items():
            expected = _torch_outputs(model, input_names, tensors, bool(kwargs))
            got = sess.run(None, feeds(sess, input_names, tensors))
            for name, ref, out in zip(output_names, expected, got, strict=True):
                out = np.asarray(out, dtype=np.float32)
                if out.shape != ref.shape:
                    report.errors.append(
                        OutputError(label, name, float("inf"), float("inf"), False)
                    )
                    continue
                largest = float(np.abs(out - ref).max(initial=0.0))
                scale = float(np.abs(ref).max(initial=0.0))
                ok = bool(np.isfinite(largest) and largest <= atol + rtol * scale)
                relative = largest / max(scale, 1e-6)
                report.errors.append(OutputError(label, name, largest, relative, ok))
    finally:
        for m, t in training.items():
            m.train(t)
    if raise_on_error and not report.ok:
        bad = [e for e in report.errors if not e.ok]
        worst = max(bad, key=lambda e: e.max_abs)
        raise VerificationError(
            f"{path}: onnxruntime disagrees with torch on {len(bad)} of {len(report.errors)} "
            f"output checks (worst: output '{worst.output}' on {worst.input_set} inputs, "
            f"max |Δ| {worst.max_abs:.3e}, relative to the output's scale {worst.max_rel:.3e}; "
            f"tolerance atol {atol:g} + rtol {rtol:g}·max|ref|)\n{report.table()}"
        )
    return report

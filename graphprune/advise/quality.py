"""Quality of a candidate, measured on the file that would be deployed.

Every candidate is judged through its exported ONNX file run by onnxruntime
(:class:`OnnxModule`: an ``nn.Module`` whose forward runs the file), so an int8 model -- which
exists only as ONNX -- is judged like the others, and what is measured is what ships.

- With the user's ``evaluate(model) -> float`` (accuracy, perplexity; ``higher_is_better``
  says which way is better), that number.
- Otherwise *output fidelity* against the original on held-back calibration batches, named as
  such: the top-1 agreement when the first output is class scores, ``(batch, classes)``; and
  the relative error ``||y - y0|| / ||y0||`` over all outputs (fidelity ``1 - error`` is the
  quality of outputs that are not class scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.capture import ExampleInputs, normalize_inputs
from graphprune.onnx.runtimes import Loaded, get_runtime, load_checked

Evaluate = Callable[[nn.Module], float]


class OnnxModule(nn.Module):
    """An exported ONNX file as a module: positional inputs in the file's input order (or
    keyword inputs by name), outputs as torch tensors (one tensor, or a tuple). No parameters:
    an ``evaluate`` that reads ``model.parameters()`` cannot be used on it."""

    def __init__(self, path: str | Path, threads: int = 2, runtime: str = "onnxruntime") -> None:
        super().__init__()
        self.path = Path(path)
        self.loaded: Loaded = load_checked(get_runtime(runtime), path, threads)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self.loaded.input_names
        given = dict(zip(names, args, strict=False)) | kwargs
        feeds = {n: _array(given[n]) for n in names if n in given}
        outputs = [torch.from_numpy(np.asarray(o)) for o in self.loaded.run(feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


@dataclass
class Quality:
    """One candidate's quality: ``value`` (the number compared; see ``name``), and, for
    fidelity, both of its parts."""

    value: float | None
    name: str  # "accuracy" (the user's), "top-1 agreement", "fidelity (1 - relative error)"
    higher_is_better: bool = True
    relative_error: float | None = None
    top1_agreement: float | None = None
    error: str | None = None  # the user's evaluate raised or returned a non-number

    def no_worse_than(self, reference: Quality, tolerance: float) -> bool:
        """Within ``tolerance`` (relative) of ``reference``, or better."""
        if self.value is None or reference.value is None:
            return False
        slack = tolerance * abs(reference.value)
        if self.higher_is_better:
            return self.value >= reference.value - slack
        return self.value <= reference.value + slack


def outputs_of(module: nn.Module, batches: Sequence[ExampleInputs]) -> list[list[torch.Tensor]]:
    """The output tensors of ``module`` on each batch (no grad)."""
    found = []
    with torch.no_grad():
        for batch in batches:
            args, kwargs = normalize_inputs(batch)
            out = module(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                found.append([out])
            else:
                values = list(out.values()) if isinstance(out, dict) else list(out)
                found.append([t for t in values if isinstance(t, torch.Tensor)])
    return found


def fidelity(
    outputs: list[list[torch.Tensor]], reference: list[list[torch.Tensor]], held_back: bool
) -> Quality:
    """Fidelity of ``outputs`` to the original's ``reference`` outputs (same batches)."""
    diff = sum(
        float((o.float() - r.float()).pow(2).sum())
        for out, ref in zip(outputs, reference, strict=True)
        for o, r in zip(out, ref, strict=True)
    )
    norm = sum(float(r.float().pow(2).sum()) for ref in reference for r in ref)
    error = math.sqrt(diff / max(norm, 1e-30))
    where = "held-back calibration batches" if held_back else "the example inputs"
    first = reference[0][0]
    if first.dim() == 2 and first.shape[1] > 1 and first.dtype.is_floating_point:
        agree = [
            (out[0].argmax(1) == ref[0].argmax(1)).float()
            for out, ref in zip(outputs, reference, strict=True)
        ]
        top1 = float(torch.cat(agree).mean())
        return Quality(top1, f"top-1 agreement ({where})", True, error, top1)
    return Quality(max(0.0, 1.0 - error), f"fidelity, 1 - relative error ({where})", True, error)


def user_quality(evaluate: Evaluate, module: nn.Module, higher_is_better: bool) -> Quality:
    """``evaluate(module)``; an exception or a non-number is the candidate's error, not ours."""
    name = getattr(evaluate, "__name__", "evaluate")
    try:
        value = evaluate(module)
    except Exception as exc:  # the user's code: reported per candidate, the rest continues
        return Quality(None, name, higher_is_better, error=f"{type(exc).__name__}: {exc}")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return Quality(
            None, name, higher_is_better, error=f"evaluate returned {value!r}, not a finite number"
        )
    return Quality(float(value), name, higher_is_better)

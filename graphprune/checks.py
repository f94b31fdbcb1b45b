"""Checks of the user's model and inputs before anything else touches them, so that bad input
gets one clear error (what is wrong, where, what to do) instead of a raw traceback from
whichever step happens to meet it first."""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.capture import ExampleInputs, normalize_inputs, run_eval
from graphprune.errors import InputError

_TORCH_DIR = str(Path(torch.__file__).parent)
_OWN_DIR = str(Path(__file__).parent)


class GraphPruneWarning(UserWarning):
    """Something graphprune went ahead with but the user should know about."""


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def _user_line(exc: BaseException) -> str:
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR, "<")):
            found = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return found


def _not_finite(t: torch.Tensor) -> bool:
    """Holds a NaN or an inf: the largest |value| is then not finite (one reduction, no
    boolean tensor the size of the weight)."""
    return t.is_floating_point() and t.numel() > 0 and not bool(t.detach().abs().amax().isfinite())


def check_model(
    model: nn.Module,
    example_inputs: ExampleInputs,
    forward: Callable[[nn.Module, ExampleInputs], Any] = run_eval,
) -> Any:
    """Raise :class:`InputError` for a model graphprune cannot work on (not a module, meta
    tensors, example inputs it does not run on); warn about NaN/inf weights. Returns what
    ``forward(model, example_inputs)`` (the check's one forward, eval mode, no grad) returns."""
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    normalize_inputs(example_inputs)  # an input of a kind graphprune cannot pass: its error
    state = [*model.named_parameters(), *model.named_buffers()]
    on_meta = [name for name, t in state if t.is_meta]
    if on_meta:
        raise InputError(
            f"{len(on_meta)} parameters/buffers are on the meta device (shapes without data), "
            f"e.g. {on_meta[0]}: graphprune needs real weights to score and slice them; "
            "materialise the model (model.to_empty(device='cpu'), then load its weights) or "
            "build it on cpu/cuda"
        )
    not_finite = [name for name, t in state if _not_finite(t)]
    if not_finite:
        warnings.warn(
            f"{len(not_finite)} parameters/buffers hold NaN or inf (e.g. {not_finite[0]}): "
            "importance scores of their channels are NaN, so which channels are kept there "
            "is arbitrary; fix or re-initialise these weights first",
            GraphPruneWarning,
            stacklevel=3,
        )
    try:
        return forward(model, example_inputs)
    except Exception as exc:
        where = _user_line(exc)
        raise InputError(
            f"the model does not run on the example inputs {_describe(example_inputs)}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            + (f"\n  at {where}" if where else "")
            + "\n  hint: pass inputs of the shape and dtype the model takes (a tensor, a tuple "
            "of positional inputs or a dict of keyword inputs), e.g. with a batch dimension"
        ) from None


def check_calibration(model: nn.Module, batches: list[Any]) -> None:
    """The first calibration batch must run like the example inputs do (one forward); a
    ``(inputs, target)`` pair is named as such, with the wrapper that says so."""
    if not batches:
        raise InputError("calibration= is empty: pass at least one batch (or leave it out)")
    batch = batches[0]
    try:
        normalize_inputs(batch)
        run_eval(model, batch)
    except Exception as exc:
        pair = (
            isinstance(batch, tuple | list)
            and len(batch) == 2
            and all(isinstance(t, torch.Tensor) for t in batch)
        )
        hint = (
            "it looks like an (inputs, target) pair: pass gp.LabelledBatch(inputs, target) "
            "(loss_fn then gets the target), or the inputs alone"
            if pair
            else "calibration batches take the form of the example inputs"
        )
        raise InputError(
            f"the model does not run on calibration batch 0 {_describe(batch)}: "
            f"{type(exc).__name__}: {_first(exc)}\n  hint: {hint}"
        ) from None


def _first(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""

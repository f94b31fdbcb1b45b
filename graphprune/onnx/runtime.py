"""onnxruntime sessions set up for honest numbers on a small CPU.

Idle intra-op threads spin by default, so two live sessions timed A B A B distort each other:
spinning is off unless asked for (``spinning=True``: onnxruntime's default, as a deployed
session runs; time such sessions one at a time, :func:`graphprune.timing.block_samples`).
Random-init networks produce subnormal floats that run 10-100x slower on x86: they are
flushed to zero (in ORT, and in torch while it computes the reference outputs).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import onnxruntime as ort
import torch

from graphprune.errors import InputError

P = ParamSpec("P")
R = TypeVar("R")


def session(
    path: str | Path,
    threads: int = 2,
    optimized_path: str | Path | None = None,
    spinning: bool = False,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.log_severity_level = 3  # not the "hardware-specific graph" warning it then logs
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidProtobuf, NoSuchFile, Fail: one clear error
        reason = " ".join(str(exc).split())[:300]
        raise InputError(
            f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {reason}); it may be "
            "truncated or not an ONNX model: export it again"
        ) from None


def feeds(
    sess: ort.InferenceSession | Any, names: list[str], tensors: list[torch.Tensor]
) -> dict[str, np.ndarray]:
    """Map our input tensors onto the inputs of ``sess`` (an onnxruntime session, or any
    loaded model with ``input_names``), by name, in order."""
    if isinstance(sess, ort.InferenceSession):
        expected = [i.name for i in sess.get_inputs()]
    else:
        expected = list(sess.input_names)
    by_name = dict(zip(names, tensors, strict=True))
    return {n: by_name[n].detach().cpu().numpy() for n in expected}


def _flushing() -> bool:
    """Whether torch flushes subnormal floats now (torch has no getter: a subnormal probe)."""
    return bool((torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0)


@contextlib.contextmanager
def float_state_kept() -> Iterator[None]:
    """Put the thread's subnormal-flushing mode back as it was on leaving: some runtimes
    (OpenVINO's CPU plugin) set FTZ/DAZ on the calling thread and leave it set, which would
    change every later float computation of the user's process."""
    before = _flushing()
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def denormals_flushed(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with torch flushing subnormals (random-init weights make them; they are
    10-100x slower on x86 and onnxruntime's sessions flush them too), then restore the
    process's own setting: graphprune changes no global state a user can see."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with float_state_kept():
            torch.set_flush_denormal(True)
            return fn(*args, **kwargs)

    return wrapper

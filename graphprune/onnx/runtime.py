"""onnxruntime sessions set up for honest numbers on a small CPU.

Idle intra-op threads spin by default, so two live sessions timed A B A B distort each other:
spinning is off unless asked for (``spinning=True``: onnxruntime's default, as a deployed
session runs; time such sessions one at a time, :func:`graphprune.timing.block_samples`).
Random-init networks produce subnormal floats that run 10-100x slower on x86: they are
flushed to zero (in ORT and in torch, for the reference outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch


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
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(
    sess: ort.InferenceSession, names: list[str], tensors: list[torch.Tensor]
) -> dict[str, np.ndarray]:
    """Map our input tensors onto the session's inputs (by name, in order)."""
    expected = [i.name for i in sess.get_inputs()]
    by_name = dict(zip(names, tensors, strict=True))
    return {n: by_name[n].detach().cpu().numpy() for n in expected}


def flush_denormals() -> Any:
    return torch.set_flush_denormal(True)

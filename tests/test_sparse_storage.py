"""Compact sparse-weight storage in ONNX: valid, exact, and much smaller."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from graphprune.models import MODELS
from graphprune.onnx.export import export
from graphprune.onnx.runtime import feeds, session
from graphprune.onnx.sparse_storage import pack_sparse_weights, packed_size


def _magnitude_prune(model: torch.nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                w = module.weight
                k = int(sparsity * w.numel())
                threshold = w.abs().flatten().kthvalue(k).values
                w.mul_((w.abs() > threshold).float())


def test_packed_model_is_valid_exact_and_smaller(tmp_path: Path) -> None:
    spec = MODELS["vgg"]
    model, x = spec.build(), spec.example_inputs()
    _magnitude_prune(model, 0.9)
    dense = export(model, x, tmp_path / "dense.onnx")
    proto = onnx.load(str(dense.path))
    report = pack_sparse_weights(proto, min_sparsity=0.8)
    packed = tmp_path / "packed.onnx"
    onnx.save(proto, str(packed))
    onnx.checker.check_model(str(packed), full_check=True)

    # every conv/linear weight big enough was packed, each ~7x smaller at 90 %
    assert len(report.weights) >= 5
    biggest = max(report.weights, key=lambda w: w.dense_bytes)
    assert biggest.sparsity >= 0.89 and biggest.dense_bytes / biggest.packed_bytes > 7.0
    assert dense.path.stat().st_size / packed.stat().st_size > 5.0

    a, b = session(dense.path), session(packed)
    inputs = [torch.randn(3, 3, 32, 32)]
    out_a = a.run(None, feeds(a, dense.input_names, inputs))[0]
    out_b = b.run(None, feeds(b, dense.input_names, inputs))[0]
    np.testing.assert_array_equal(out_a, out_b)  # the decode is exact


def test_dense_weights_are_left_alone() -> None:
    spec = MODELS["resnet18"]
    model, x = spec.build(), spec.example_inputs()
    proto = onnx.load_from_string(
        export(model, x, Path("/tmp") / "gp_dense.onnx").path.read_bytes()
    )
    before = len(proto.graph.node)
    assert pack_sparse_weights(proto).weights == [] and len(proto.graph.node) == before


def test_packed_size() -> None:
    assert packed_size(1024 * 1024, int(0.1 * 1024 * 1024)) * 7.5 < 4 * 1024 * 1024

"""Sparse rewriting: masks (chosen by :mod:`graphprune.planning.masks`) kept in place by a
training-time parametrization, and sparse kernels chosen by measurement. Storage in ONNX
lives in ``graphprune.onnx.sparse_storage``; :func:`graphprune.finalize` bakes the masks."""

from __future__ import annotations

from graphprune.planning.masks import LayerMask, MaskSet, compute_masks, maskable_layers
from graphprune.sparsity.convert import sparsify, sparsify_report
from graphprune.sparsity.parametrize import (
    WeightMask,
    apply_masks,
    is_masked,
    masked_layers,
)

__all__ = [
    "LayerMask",
    "MaskSet",
    "WeightMask",
    "apply_masks",
    "compute_masks",
    "is_masked",
    "maskable_layers",
    "masked_layers",
    "sparsify",
    "sparsify_report",
]

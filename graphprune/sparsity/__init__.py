"""Sparse masks (unstructured, n:m, block), their training-time parametrization, and sparse
kernels chosen by measurement. Storage in ONNX lives in ``graphprune.onnx.sparse_storage``."""

from __future__ import annotations

from graphprune.sparsity.convert import sparsify, sparsify_report
from graphprune.sparsity.masks import LayerMask, MaskSet, compute_masks, maskable_layers
from graphprune.sparsity.parametrize import (
    WeightMask,
    apply_masks,
    finalize,
    is_masked,
    masked_layers,
)

__all__ = [
    "LayerMask",
    "MaskSet",
    "WeightMask",
    "apply_masks",
    "compute_masks",
    "finalize",
    "is_masked",
    "maskable_layers",
    "masked_layers",
    "sparsify",
    "sparsify_report",
]

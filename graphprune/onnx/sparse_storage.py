"""Store sparse weights compactly in a *valid*, standard-opset ONNX model.

A weight W with many zeros is replaced by its nonzero values and a packed bitmask (one bit per
element, ``np.packbits``), plus a small constant subgraph that rebuilds W:

    bits   = Reshape(BitwiseAnd(BitShift(Unsqueeze(mask_bytes), [7..0], RIGHT), 1), [-1])[:n]
    index  = CumSum(Cast<int32>(bits)) * bits          # k for the k-th nonzero, 0 elsewhere
    W      = Reshape(Gather(Concat([0], values), index), shape)

Every input of that subgraph is an initializer, so onnxruntime folds it when the session starts:
inference runs the dense kernels at dense speed with exact values. This buys file size, not
speed (the README's sparsity section has the measured sizes).

ONNX's own sparse tensor (values + int64 indices, 12 bytes per nonzero; stored as a
``Constant(sparse_value=...)``) is smaller than the bitmask only above ~98.4 % sparsity
(8 bytes/nonzero < 1 bit/element); with ``storage="auto"`` each weight gets whichever of dense,
bitmask or sparse tensor is smallest. onnxruntime densifies it at load: also size only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 18  # BitwiseAnd


STORAGES = ("bitmask", "auto")
PACKED_TYPES = (TensorProto.FLOAT, TensorProto.INT8)  # fp32 weights; int8 quantized weights


@dataclass
class PackedWeight:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    dense_bytes: int
    packed_bytes: int
    storage: str = "bitmask"  # or "sparse_tensor"


@dataclass
class PackingReport:
    weights: list[PackedWeight] = field(default_factory=list)

    @property
    def dense_bytes(self) -> int:
        return sum(w.dense_bytes for w in self.weights)

    @property
    def packed_bytes(self) -> int:
        return sum(w.packed_bytes for w in self.weights)


def packed_size(n: int, nonzeros: int, itemsize: int = 4) -> int:
    """Bytes of values + bitmask for ``n`` elements with ``nonzeros`` nonzeros."""
    return nonzeros * itemsize + (n + 7) // 8


def coo_size(nonzeros: int, itemsize: int = 4) -> int:
    """Bytes of an ONNX sparse tensor: values + one int64 linear index per nonzero."""
    return nonzeros * (itemsize + 8)


def storage_choice(n: int, nonzeros: int, storage: str, itemsize: int = 4) -> tuple[int, str]:
    """Bytes and format of the compact storage of ``n`` elements with ``nonzeros`` nonzeros:
    the bitmask, or with ``storage="auto"`` whichever of it and an ONNX sparse tensor is smaller."""
    bitmask = packed_size(n, nonzeros, itemsize)
    if storage == "auto" and coo_size(nonzeros, itemsize) < bitmask:
        return coo_size(nonzeros, itemsize), "sparse_tensor"
    return bitmask, "bitmask"


def pack_sparse_weights(
    model: onnx.ModelProto,
    *,
    min_sparsity: float = 0.5,
    min_elements: int = 1024,
    storage: str = "auto",
) -> PackingReport:
    """Rewrite ``model`` in place: every float32 (or int8: a quantized model's weights, whose
    zero point is 0) initializer with at least ``min_sparsity``
    zeros and ``min_elements`` elements, where it is smaller, becomes values + bitmask + a
    decode subgraph producing the same tensor name (``storage="bitmask"``), or whichever of
    that and an ONNX sparse tensor is smaller (``"auto"``)."""
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r}; use one of {STORAGES}")
    report = PackingReport()
    graph = model.graph
    decode_nodes: list[onnx.NodeProto] = []
    keep: list[onnx.TensorProto] = []
    for init in graph.initializer:
        if init.data_type not in PACKED_TYPES or np.prod(init.dims) < min_elements:
            keep.append(init)
            continue
        w = numpy_helper.to_array(init)
        mask = w.ravel() != 0
        sparsity = 1.0 - mask.mean()
        nnz = int(mask.sum())
        size, kind = storage_choice(w.size, nnz, storage, w.itemsize)
        if sparsity < min_sparsity or size >= w.nbytes:
            keep.append(init)
            continue
        if kind == "sparse_tensor":
            decode_nodes.append(_sparse_constant(init.name, w, mask))
        else:
            new_inits, nodes = _decoder(init.name, w, mask)
            keep.extend(new_inits)
            decode_nodes.extend(nodes)
        report.weights.append(
            PackedWeight(init.name, tuple(w.shape), float(sparsity), w.nbytes, size, kind)
        )
    if report.weights:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(decode_nodes + nodes)  # decoders first: the graph stays sorted
        _require_opset(model, MIN_OPSET)
    return report


def _decoder(
    name: str, w: np.ndarray, mask: np.ndarray
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    p = f"{name}__packed"
    n = int(mask.size)
    inits = [
        numpy_helper.from_array(np.packbits(mask), f"{p}_mask"),  # (ceil(n/8),) uint8
        numpy_helper.from_array(
            np.concatenate([np.zeros(1, w.dtype), w.ravel()[mask]]), f"{p}_values"
        ),  # (nnz + 1,) in the weight's dtype: slot 0 holds the zero
        numpy_helper.from_array(np.arange(7, -1, -1, dtype=np.uint8), f"{p}_shifts"),
        numpy_helper.from_array(np.array([1], dtype=np.uint8), f"{p}_one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{p}_axis1"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_flat"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), f"{p}_zero"),
        numpy_helper.from_array(np.array([n], dtype=np.int64), f"{p}_n"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), f"{p}_axis0"),
        numpy_helper.from_array(np.array(w.shape, dtype=np.int64), f"{p}_shape"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", [f"{p}_mask", f"{p}_axis1"], [f"{p}_col"]),  # (m, 1)
        helper.make_node(
            "BitShift", [f"{p}_col", f"{p}_shifts"], [f"{p}_shifted"], direction="RIGHT"
        ),  # (m, 8): bit 7 first, as np.packbits
        helper.make_node("BitwiseAnd", [f"{p}_shifted", f"{p}_one"], [f"{p}_bits8"]),
        helper.make_node("Reshape", [f"{p}_bits8", f"{p}_flat"], [f"{p}_bitsall"]),
        helper.make_node("Slice", [f"{p}_bitsall", f"{p}_zero", f"{p}_n"], [f"{p}_bitsu8"]),
        # int32 indices: half the transient memory of int64 while onnxruntime folds this
        helper.make_node("Cast", [f"{p}_bitsu8"], [f"{p}_bits"], to=TensorProto.INT32),
        helper.make_node("CumSum", [f"{p}_bits", f"{p}_axis0"], [f"{p}_rank"]),
        helper.make_node("Mul", [f"{p}_rank", f"{p}_bits"], [f"{p}_index"]),
        helper.make_node("Gather", [f"{p}_values", f"{p}_index"], [f"{p}_dense"], axis=0),
        helper.make_node("Reshape", [f"{p}_dense", f"{p}_shape"], [name]),
    ]
    return inits, nodes


def _sparse_constant(name: str, w: np.ndarray, mask: np.ndarray) -> onnx.NodeProto:
    """``Constant(sparse_value=...)``: ONNX's sparse tensor (values + int64 linear indices),
    output as the dense tensor ``name`` -- the typed, checker-clean form of a sparse
    initializer (a graph.sparse_initializer fed to a dense op fails strict type inference)."""
    indices = np.flatnonzero(mask).astype(np.int64)  # (nnz,) linear indices, ascending
    values = numpy_helper.from_array(w.ravel()[indices], f"{name}__values")
    sparse = helper.make_sparse_tensor(
        values, numpy_helper.from_array(indices, f"{name}__indices"), list(w.shape)
    )
    return helper.make_node("Constant", [], [name], sparse_value=sparse)


def _require_opset(model: onnx.ModelProto, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if opset.version < version:
                raise ValueError(f"packing needs opset >= {version}; export with opset={version}")
            return
    model.opset_import.append(helper.make_opsetid("", version))

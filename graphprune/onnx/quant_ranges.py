"""Which nodes int8 cannot represent: read from the calibration data, before quantizing.

One scale per tensor (8 bits, 255 steps over its calibrated range) fails in two ways the
calibrator does not report: a tensor holding masking sentinels (-inf, or finfo.min added by a
causal or padding mask) gets an infinite or astronomical step, and a tensor whose range is set
by rare outliers gets a step larger than its typical value, so most of it rounds to zero. The
first destroys a GPT (perplexity 14.6 -> 37.6 with the attention mask's Add and Softmax in
int8); both are visible in the fp32 activations. A node that reads or writes such a tensor is
kept in float (the weight ops around it are still quantized) and named with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

LEVELS = 255  # uint8 activations: steps over the calibrated range


@dataclass
class _Range:
    """What the calibration batches showed of one tensor."""

    low: float = math.inf
    high: float = -math.inf
    finite: bool = True
    typical: list[float] = field(default_factory=list)  # per batch: median |x| of nonzeros

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        if not np.isfinite(values).all():
            self.finite = False
            values = values[np.isfinite(values)]
            if values.size == 0:
                return
        self.low, self.high = min(self.low, values.min()), max(self.high, values.max())
        nonzero = np.abs(values[values != 0])
        if nonzero.size:
            self.typical.append(float(np.median(nonzero)))

    def problem(self) -> str | None:
        """Why one int8 scale cannot hold this tensor, or None."""
        if not self.finite:
            return "holds non-finite values (a masking sentinel)"
        if not self.typical:
            return None
        step = (max(self.high, 0.0) - min(self.low, 0.0)) / LEVELS
        typical = float(np.median(self.typical))
        if step > typical:
            return f"int8 step {step:.3g} exceeds its typical magnitude {typical:.3g}"
        return None


def _float_activations(model: onnx.ModelProto) -> set[str]:
    """Float tensors computed by the graph (not weights, not constants), by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    weights = {i.name for i in model.graph.initializer}
    typed = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {
        v.name
        for v in typed
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and v.name not in weights
    }


def unquantizable_nodes(
    path: str,
    feeds: list[dict[str, np.ndarray]],
    op_types: set[str],
) -> dict[str, str]:
    """Node name -> reason, for the nodes of ``op_types`` whose float inputs or outputs one
    int8 scale cannot hold on the calibration ``feeds`` (the fp32 model, run in onnxruntime)."""
    model = onnx.load(path)
    floats = _float_activations(model)
    nodes = [n for n in model.graph.node if n.op_type in op_types]
    watched = sorted({t for n in nodes for t in (*n.input, *n.output) if t in floats})
    graph_outputs = {o.name for o in model.graph.output}
    for name in watched:
        if name not in graph_outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    ranges = {name: _Range() for name in watched}
    for feed in feeds:
        for name, value in zip(watched, session.run(watched, feed), strict=True):
            ranges[name].add(value)
    found: dict[str, str] = {}
    for node in nodes:
        for tensor in (*node.input, *node.output):
            why = ranges[tensor].problem() if tensor in ranges else None
            if why is not None:
                found[node.name] = f"{tensor} {why}"
                break
    return found

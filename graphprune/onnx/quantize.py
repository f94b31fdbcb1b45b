"""int8 quantization through onnxruntime.quantization (dynamic, or static with calibration)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from graphprune.errors import GraphPruneError
from graphprune.onnx.export import quiet
from graphprune.onnx.quant_ranges import unquantizable_nodes

# int8 outputs are compared with fp32 torch at a stated, looser tolerance: every element within
# 10 % of the reference output's largest magnitude (a random-init net has no accuracy to report)
INT8_TOLERANCE = 0.10


# What static mode quantizes by default: every op onnxruntime's static quantizer handles (QDQ
# and QLinear registries), less the nodes whose calibrated ranges one int8 scale cannot hold
# (:mod:`graphprune.onnx.quant_ranges`): keeping a causal mask's Add and Softmax in int8 costs
# a 4-layer GPT its perplexity (14.6 -> 37.6; 14.67 with them kept float), and a ResNet-50
# keeps every node quantized (nothing there is out of range).
STATIC_OP_TYPES: tuple[str, ...] = tuple(sorted(set(QDQRegistry) | set(QLinearOpsRegistry)))


@dataclass
class Quantized:
    """An int8 file, and the nodes kept in float with why."""

    path: Path
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> reason


class QuantizationError(GraphPruneError):
    pass


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(
    fp32: str | Path,
    out: str | Path,
    mode: str,
    calibration: list[dict[str, np.ndarray]] | None = None,
    op_types: Sequence[str] = STATIC_OP_TYPES,
) -> Quantized:
    """Write an int8 model to ``out`` (atomically); static mode needs calibration feeds.

    ``op_types`` (static mode): the ops to quantize; a node among them whose calibrated range
    int8 cannot hold stays float (``Quantized.kept_float`` names it and why).
    """
    if mode not in ("dynamic", "static"):
        raise QuantizationError(f"quantize={mode!r}; use 'dynamic' or 'static'")
    if mode == "static" and not calibration:
        raise QuantizationError("static quantization needs calibration inputs")
    out = Path(out)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # the exporter's value_info annotations can disagree with ONNX shape inference after its
        # own optimisations; drop them and let the quantizer infer shapes afresh
        clean = workdir / "clean.onnx"
        model = onnx.load(str(fp32))
        del model.graph.value_info[:]
        onnx.save(model, str(clean))
        prepared = workdir / "prepared.onnx"
        try:
            with quiet():
                quant_pre_process(str(clean), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantize the original instead
            prepared = clean
        _name_nodes(prepared)
        result = workdir / out.name
        kept_float: dict[str, str] = {}
        if mode == "static":
            assert calibration is not None
            kept_float = unquantizable_nodes(str(prepared), calibration, set(op_types))
        with quiet():
            if mode == "dynamic":
                quantize_dynamic(str(prepared), str(result), weight_type=QuantType.QInt8)
            else:
                assert calibration is not None
                quantize_static(
                    str(prepared),
                    str(result),
                    _Reader(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types),
                    nodes_to_exclude=list(kept_float),
                )
        os.replace(result, out)
    except GraphPruneError:
        raise
    except Exception as exc:
        raise QuantizationError(
            f"{mode} int8 quantization of {fp32} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Quantized(out, kept_float)


def _name_nodes(path: Path) -> None:
    """Give every unnamed node a unique name: nodes are excluded from quantization by name."""
    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    unnamed = [n for n in model.graph.node if not n.name]
    for i, node in enumerate(unnamed):
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    if unnamed:
        onnx.save(model, str(path))

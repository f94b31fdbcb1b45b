"""int8 quantization through onnxruntime.quantization (dynamic, or static with calibration)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
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
from onnxruntime.quantization.shape_inference import quant_pre_process

from graphprune.errors import GraphPruneError
from graphprune.onnx.export import quiet

# int8 outputs are compared with fp32 torch at a stated, looser tolerance: every element within
# 10 % of the reference output's largest magnitude (a random-init net has no accuracy to report)
INT8_TOLERANCE = 0.10


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
) -> Path:
    """Write an int8 model to ``out`` (atomically); static mode needs calibration feeds."""
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
        result = workdir / out.name
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
    return out

"""Latency tables as the planner reads them: a Linear/Conv as an op whose widths are left
open (:class:`OpShape`), the width grids to measure, and :class:`LayerTable`, which interpolates
one layer's measured seconds over (input, output) widths.

Measuring is a backend's job (:mod:`graphprune.onnx.op_latency` times one-op onnxruntime
graphs); the planner receives any :class:`TableSource` and never imports a runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy.interpolate import RegularGridInterpolator
from torch import nn

# (layer name, op, input widths, output widths): one table to measure
TableSpec = tuple[str, "OpShape", list[int], list[int]]


@dataclass(frozen=True)
class OpShape:
    """A Linear or Conv layer as onnxruntime runs it, widths left open."""

    kind: str  # "linear" or "conv"
    rows: tuple[int, ...]  # linear: (M,) flattened rows; conv: (N, *spatial input)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1  # fixed groups of a grouped (not depthwise) conv
    depthwise: bool = False  # groups == in == out: one width


def op_shape(module: nn.Module, input_shape: tuple[int, ...]) -> OpShape | None:
    """The :class:`OpShape` of a Linear/Conv1d/Conv2d called on ``input_shape`` (else None)."""
    if isinstance(module, nn.Linear):
        rows = int(np.prod(input_shape[:-1]))
        return OpShape("linear", (rows,))
    if not isinstance(module, nn.Conv1d | nn.Conv2d) or isinstance(module.padding, str):
        return None
    if module.padding_mode != "zeros":
        return None
    pads = tuple(module.padding) * 2  # ONNX: all begins, then all ends
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    return OpShape(
        "conv", (input_shape[0], *input_shape[2:]), tuple(module.kernel_size),
        tuple(module.stride), pads, tuple(module.dilation),
        1 if depthwise else module.groups, depthwise,
    )  # fmt: skip


def grid(full: int, step: int, floor: int, points: int = 4) -> list[int]:
    """About ``points`` widths from ``floor`` to ``full``, multiples of ``step`` (and ``full``)."""
    if full <= floor:
        return [full]
    values = {full}
    for f in np.linspace(floor / full, 1.0, points):
        values.add(min(full, max(floor, int(np.ceil(f * full / step)) * step)))
    return sorted(values)


@dataclass
class LayerTable:
    """Measured seconds of one layer over a grid of (in, out) widths; interpolated."""

    name: str
    ins: list[int]
    outs: list[int]
    seconds: np.ndarray  # (len(ins), len(outs)); depthwise: the diagonal only, (len(ins), 1)
    depthwise: bool = False

    def __post_init__(self) -> None:
        if self.depthwise or len(self.ins) == 1 or len(self.outs) == 1:
            self._interp: Any = None
        else:
            self._interp = RegularGridInterpolator(
                (np.array(self.ins, float), np.array(self.outs, float)), self.seconds,
                bounds_error=False, fill_value=None,
            )  # fmt: skip

    def __call__(self, cin: float, cout: float) -> float:
        if self.depthwise:
            return float(np.interp(cout, self.outs, self.seconds[:, 0]))
        if self._interp is not None:
            return float(self._interp([[cin, cout]])[0])
        if len(self.ins) > 1:
            return float(np.interp(cin, self.ins, self.seconds[:, 0]))
        if len(self.outs) > 1:
            return float(np.interp(cout, self.outs, self.seconds[0, :]))
        return float(self.seconds[0, 0])


class TableSource(Protocol):
    """Where tables come from (a runtime's measurements, cached): counts what it did."""

    measured: int  # ops timed
    hits: int  # ops read from the cache
    seconds: float  # time spent timing

    def tables(
        self, specs: Sequence[TableSpec], threads: int, progress: bool = True
    ) -> dict[str, LayerTable]: ...

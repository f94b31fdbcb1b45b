"""Latency tables: how long one Linear/Conv takes in onnxruntime at a given input/output width.

Each timed layer is exported on its own as a one-node ONNX graph (``Conv`` or ``Gemm``, random
weights, the layer's real input shape and attributes) and timed in the session configuration of
every graphprune measurement (:mod:`graphprune.onnx.runtime`: ``threads`` intra-op threads,
spinning off, denormals flushed), median of interleaved runs. Per layer the widths form a small
grid (in x out at the widths ``round_to`` allows, about four each; depthwise convs one axis), and
:class:`LayerTable` interpolates between them.

Why single ops rather than the whole model with one unit varied: one whole-model export and
measurement per (unit, width) costs minutes for a ResNet and grows with depth, while the
single-op grid is measured once per distinct layer shape (ResNet's repeated blocks share it)
and is cached on disk. What single ops miss (norms, activations, adds, attention products, fused
kernels) is corrected by measuring the real pruned model (:mod:`graphprune.latency_plan`).

The cache is one JSON file (``$GRAPHPRUNE_CACHE_DIR`` or ``~/.cache/graphprune``,
``latency-tables.json``), keyed by CPU model, onnxruntime version, threads and the op's full
signature and shapes; it is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from scipy.interpolate import RegularGridInterpolator
from torch import nn

from graphprune.io import write_text_atomic
from graphprune.onnx.runtime import session
from graphprune.progress import track
from graphprune.timing import interleaved_samples

REPEATS = 25  # timed runs per op (after WARMUP)
WARMUP = 5


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

    def key(self, cin: int, cout: int, threads: int) -> str:
        return json.dumps(
            {"cpu": cpu_name(), "ort": ort.__version__, "threads": threads, "op": self.kind,
             "rows": self.rows, "kernel": self.kernel, "stride": self.stride, "pads": self.pads,
             "dilation": self.dilation, "groups": self.groups, "depthwise": self.depthwise,
             "in": cin, "out": cout},
            sort_keys=True,
        )  # fmt: skip

    def graph(self, cin: int, cout: int) -> onnx.ModelProto:
        """A one-node model: the op at these widths, random weights."""
        rng = np.random.default_rng(0)
        if self.kind == "linear":
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [self.rows[0], cin])
            w = rng.standard_normal((cout, cin)).astype(np.float32)
            node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        else:
            groups = cin if self.depthwise else self.groups
            shape = [self.rows[0], cin, *self.rows[1:]]
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
            w = rng.standard_normal((cout, cin // groups, *self.kernel)).astype(np.float32)
            node = helper.make_node(
                "Conv", ["x", "w", "b"], ["y"], kernel_shape=list(self.kernel),
                strides=list(self.stride), pads=list(self.pads), dilations=list(self.dilation),
                group=groups,
            )  # fmt: skip
        b = rng.standard_normal(cout).astype(np.float32)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        weights = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        g = helper.make_graph([node], "op", [x], [y], weights)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # what every onnxruntime of opset 17 reads
        return model

    def inputs(self, cin: int) -> np.ndarray:
        shape = (
            (self.rows[0], cin) if self.kind == "linear" else (self.rows[0], cin, *self.rows[1:])
        )
        return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    root = os.environ.get("GRAPHPRUNE_CACHE_DIR") or Path.home() / ".cache" / "graphprune"
    return Path(root) / "latency-tables.json"


class LatencyCache:
    """Seconds per op key, read from and written back to :func:`cache_path`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_path()
        self.entries: dict[str, float] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a corrupt cache is rebuilt, not trusted
        self.measured = 0  # ops timed by this instance
        self.hits = 0
        self.seconds = 0.0  # time spent timing

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.entries, indent=0, sort_keys=True))


def _median_run(model: onnx.ModelProto, x: np.ndarray, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "op.onnx"
        onnx.save(model, path)
        sess = session(path, threads)
    feeds = {"x": x}
    samples = interleaved_samples(
        {"op": lambda: sess.run(None, feeds)}, warmup=WARMUP, repeats=REPEATS
    )
    return float(np.median(samples["op"]))


def call_overhead(threads: int) -> float:
    """Seconds of ``session.run`` on a one-node graph that does no work (Identity of one
    float): what every single-op measurement pays and a node inside a model does not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "noop", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _median_run(model, np.zeros(1, np.float32), threads)


def time_op(op: OpShape, cin: int, cout: int, threads: int, overhead: float = 0.0) -> float:
    """Median seconds of ``op`` at these widths, less the call ``overhead`` (never below a
    tenth of the raw time)."""
    raw = _median_run(op.graph(cin, cout), op.inputs(cin), threads)
    return max(raw - overhead, 0.1 * raw)


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


def measure_tables(
    layers: Iterable[tuple[str, OpShape, list[int], list[int]]],
    threads: int,
    cache: LatencyCache,
    progress: bool = True,
) -> dict[str, LayerTable]:
    """One table per ``(name, op, in widths, out widths)``: cached ops are read, the rest
    timed (with a progress bar) and added to the cache."""
    todo = list(layers)
    points = [
        (op, cin, cout)
        for _, op, ins, outs in todo
        for cin, cout in (zip(outs, outs, strict=True) if op.depthwise else
                          ((i, o) for i in ins for o in outs))
    ]  # fmt: skip
    missing = sorted({(op.key(i, o, threads), op, i, o) for op, i, o in points}, key=lambda t: t[0])
    missing = [m for m in missing if m[0] not in cache.entries]
    cache.hits += len(points) - len(missing)
    if missing:
        import time

        start = time.perf_counter()
        overhead = call_overhead(threads)
        for key, op, cin, cout in track(missing, "measuring latency tables", progress):
            cache.entries[key] = time_op(op, cin, cout, threads, overhead)
            cache.measured += 1
        cache.seconds += time.perf_counter() - start
        cache.save()
    tables = {}
    for name, op, ins, outs in todo:
        if op.depthwise:
            secs = np.array([[cache.entries[op.key(o, o, threads)]] for o in outs])
            tables[name] = LayerTable(name, outs, outs, secs, depthwise=True)
        else:
            secs = np.array([[cache.entries[op.key(i, o, threads)] for o in outs] for i in ins])
            tables[name] = LayerTable(name, ins, outs, secs)
    return tables

"""Latency tables: how long one Linear/Conv takes in a runtime (onnxruntime by default, or any
of :mod:`graphprune.onnx.runtimes`) at a given input/output width.

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
kernels) is corrected by measuring the real pruned model (:mod:`graphprune.stages.latency`).

The cache is one JSON file (``$GRAPHPRUNE_CACHE_DIR`` or ``~/.cache/graphprune``,
``latency-tables.json``), keyed by CPU model, runtime and its version, threads and the op's full
signature and shapes; it is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.io import write_text_atomic
from graphprune.onnx.runtime import denormals_flushed
from graphprune.onnx.runtimes import Runtime, get_runtime, load_checked
from graphprune.planning.latency.tables import LayerTable, OpShape, TableSpec
from graphprune.progress import track
from graphprune.timing import interleaved_samples


def op_key(op: OpShape, cin: int, cout: int, threads: int, runtime: Runtime | None = None) -> str:
    """The cache key of ``op`` at these widths: CPU, runtime and version, threads, signature."""
    runtime = runtime or get_runtime("onnxruntime")
    which = (
        {"ort": runtime.version()} if runtime.name == "onnxruntime"  # the keys before runtimes
        else {"runtime": runtime.name, "version": runtime.version()}
    )  # fmt: skip
    return json.dumps(
        {"cpu": cpu_name(), **which, "threads": threads, "op": op.kind,
         "rows": op.rows, "kernel": op.kernel, "stride": op.stride, "pads": op.pads,
         "dilation": op.dilation, "groups": op.groups, "depthwise": op.depthwise,
         "in": cin, "out": cout},
        sort_keys=True,
    )  # fmt: skip

def op_graph(op: OpShape, cin: int, cout: int) -> onnx.ModelProto:
    """A one-node model: the op at these widths, random weights."""
    rng = np.random.default_rng(0)
    if op.kind == "linear":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [op.rows[0], cin])
        w = rng.standard_normal((cout, cin)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        groups = cin if op.depthwise else op.groups
        shape = [op.rows[0], cin, *op.rows[1:]]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
        w = rng.standard_normal((cout, cin // groups, *op.kernel)).astype(np.float32)
        node = helper.make_node(
            "Conv", ["x", "w", "b"], ["y"], kernel_shape=list(op.kernel),
            strides=list(op.stride), pads=list(op.pads), dilations=list(op.dilation),
            group=groups,
        )  # fmt: skip
    b = rng.standard_normal(cout).astype(np.float32)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weights = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    g = helper.make_graph([node], "op", [x], [y], weights)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime of opset 17 reads
    return model

def op_inputs(op: OpShape, cin: int) -> np.ndarray:
    shape = (
        (op.rows[0], cin) if op.kind == "linear" else (op.rows[0], cin, *op.rows[1:])
    )
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


REPEATS = 25  # timed runs per op (after WARMUP)
WARMUP = 5


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
    """Seconds per op key, read from and written back to :func:`cache_path`; the ops are
    timed in ``runtime`` (a name in :data:`graphprune.onnx.runtimes.RUNTIMES`)."""

    def __init__(self, path: Path | None = None, runtime: str = "onnxruntime") -> None:
        self.runtime = get_runtime(runtime)
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

    def tables(
        self, specs: Sequence[TableSpec], threads: int, progress: bool = True
    ) -> dict[str, LayerTable]:
        """:class:`graphprune.planning.latency.tables.TableSource`: this runtime's tables."""
        return measure_tables(specs, threads, self, progress)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.entries, indent=0, sort_keys=True))


def _median_run(
    model: onnx.ModelProto, x: np.ndarray, threads: int, runtime: Runtime | None = None
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "op.onnx"
        onnx.save(model, path)
        loaded = load_checked(runtime or get_runtime("onnxruntime"), path, threads)
    feeds = {"x": x}
    samples = interleaved_samples(
        {"op": lambda: loaded.run(feeds)}, warmup=WARMUP, repeats=REPEATS
    )
    return float(np.median(samples["op"]))


def call_overhead(threads: int, runtime: Runtime | None = None) -> float:
    """Seconds of ``session.run`` on a one-node graph that does no work (Identity of one
    float): what every single-op measurement pays and a node inside a model does not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "noop", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _median_run(model, np.zeros(1, np.float32), threads, runtime)


def time_op(
    op: OpShape,
    cin: int,
    cout: int,
    threads: int,
    overhead: float = 0.0,
    runtime: Runtime | None = None,
) -> float:
    """Median seconds of ``op`` at these widths, less the call ``overhead`` (never below a
    tenth of the raw time)."""
    raw = _median_run(op_graph(op, cin, cout), op_inputs(op, cin), threads, runtime)
    return max(raw - overhead, 0.1 * raw)


@denormals_flushed
def measure_tables(
    layers: Iterable[TableSpec],
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
    runtime = cache.runtime
    keyed = {(op_key(op, i, o, threads, runtime), op, i, o) for op, i, o in points}
    missing = sorted(keyed, key=lambda t: t[0])
    missing = [m for m in missing if m[0] not in cache.entries]
    cache.hits += len(points) - len(missing)
    if missing:
        start = time.perf_counter()
        overhead = call_overhead(threads, runtime)
        label = f"measuring latency tables ({runtime.name})"
        for key, op, cin, cout in track(missing, label, progress):
            cache.entries[key] = time_op(op, cin, cout, threads, overhead, runtime)
            cache.measured += 1
        cache.seconds += time.perf_counter() - start
        cache.save()
    tables = {}
    for name, op, ins, outs in todo:
        if op.depthwise:
            secs = np.array([[cache.entries[op_key(op, o, o, threads, runtime)]] for o in outs])
            tables[name] = LayerTable(name, outs, outs, secs, depthwise=True)
        else:
            secs = np.array(
                [[cache.entries[op_key(op, i, o, threads, runtime)] for o in outs] for i in ins]
            )
            tables[name] = LayerTable(name, ins, outs, secs)
    return tables

"""The honest sparsity report: storage and speed, measured, labelled, never mixed up.

Per layer: sparsity, dense bytes, bytes on disk in the compact ONNX storage, bytes in memory on
the sparse kernel torch chose (or dense when it kept the layer dense), and the measured kernel
times. Whole model: ONNX file dense vs compact (onnxruntime decodes the compact weights at
session start, so its latency is the *dense* latency -- storage, not speed) and latency of the
dense model vs the sparse-kernel model in torch (the only place sparsity buys speed on CPU).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.capture import ExampleInputs, normalize_inputs, serialized
from graphprune.kernels.sparse_modules import SPARSE_MODULES
from graphprune.onnx import make_feeds
from graphprune.onnx.bench import BatchResult, BenchReport, benchmark, interleaved
from graphprune.onnx.export import export
from graphprune.onnx.runtime import denormals_flushed
from graphprune.onnx.sparse_storage import storage_choice
from graphprune.onnx.verify import verify
from graphprune.passes.sparsify import LayerDecision, matrix_of
from graphprune.sparsity.convert import sparsify, sparsify_report, with_batch
from graphprune.sparsity.parametrize import dense_copy


@dataclass
class LayerStorage:
    module: str
    shape: list[int]
    sparsity: float
    dense_bytes: int
    disk_bytes: int  # compact ONNX storage
    disk_format: str  # "bitmask", "sparse_tensor" or "dense"
    memory_bytes: int  # torch, on the kernel sparsify chose
    layout: str  # that kernel: "dense", "csr", "bsr", ...
    reason: str  # why sparsify chose it (measured times)


@dataclass
class SparsityReport:
    layers: list[LayerStorage] = field(default_factory=list)
    onnx_dense_bytes: int = 0
    onnx_compact_bytes: int = 0
    onnx_max_abs_error: float = 0.0  # compact ONNX vs torch
    torch_max_abs_error: float = 0.0  # sparse kernels vs dense, torch
    torch_latency: BenchReport | None = None  # dense model vs sparse-kernel model
    onnx_latency: BenchReport | None = None  # dense file vs compact file

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def disk_bytes(self) -> int:
        return sum(layer.disk_bytes for layer in self.layers)

    @property
    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes for layer in self.layers)

    @property
    def sparsity(self) -> float:
        total = sum(layer.dense_bytes for layer in self.layers)
        return sum(layer.sparsity * layer.dense_bytes for layer in self.layers) / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["torch_latency"] = self.torch_latency.to_dict() if self.torch_latency else None
        data["onnx_latency"] = self.onnx_latency.to_dict() if self.onnx_latency else None
        return data

    def table(self) -> str:
        mb = 1e6
        lines = [
            f"{'layer':<30} {'shape':>12} {'sparsity':>8} {'dense MB':>9} "
            f"{'disk MB':>8} {'(format)':<14} {'memory MB':>9} kernel",
        ]
        for x in self.layers:
            lines.append(
                f"{x.module:<30} {'x'.join(map(str, x.shape)):>12} {x.sparsity:>8.1%} "
                f"{x.dense_bytes / mb:>9.3f} {x.disk_bytes / mb:>8.3f} {x.disk_format:<14} "
                f"{x.memory_bytes / mb:>9.3f} {x.layout}"
            )
        lines.append(
            f"{'total':<30} {'':>12} {self.sparsity:>8.1%} {self.dense_bytes / mb:>9.3f} "
            f"{self.disk_bytes / mb:>8.3f} {'':<14} {self.memory_bytes / mb:>9.3f}"
        )
        lines.append(
            f"storage: weights {self.dense_bytes / max(self.disk_bytes, 1):.1f}x smaller on disk; "
            f"ONNX file {self.onnx_dense_bytes / mb:.2f} -> {self.onnx_compact_bytes / mb:.2f} MB "
            f"({self.onnx_dense_bytes / max(self.onnx_compact_bytes, 1):.1f}x, valid standard "
            f"ONNX, max |onnxruntime - torch| {self.onnx_max_abs_error:.1e})"
        )
        if self.onnx_latency:
            lines.append(
                "speed, onnxruntime (compact weights are decoded at session start: "
                "this is storage, not speed)"
            )
            lines.append(self.onnx_latency.table())
        if self.torch_latency:
            lines.append(
                "speed, torch: dense model vs the layers on sparse kernels "
                f"(max |Δ| {self.torch_max_abs_error:.1e})"
            )
            lines.append(self.torch_latency.table())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _bytes(t: Tensor) -> int:
    """Bytes a weight takes in memory: values + index arrays for CSR/BSR."""
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [t.values(), t.crow_indices(), t.col_indices()]
    else:
        parts = [t]
    return sum(p.numel() * p.element_size() for p in parts)


def layer_storage(
    dense: nn.Module, fast: nn.Module, decisions: list[LayerDecision]
) -> list[LayerStorage]:
    """Storage of every Linear / 1x1 conv with zeros in ``dense`` and its kernel in ``fast``."""
    chosen = {d.module: d for d in decisions}
    fast_modules = dict(fast.named_modules())
    out = []
    for name, module in dense.named_modules():
        weight = matrix_of(module)
        if weight is None or name not in chosen:
            continue
        n, nnz = weight.numel(), int(torch.count_nonzero(weight))
        dense_bytes = n * weight.element_size()
        disk, fmt = storage_choice(n, nnz, "auto", weight.element_size())
        if disk >= dense_bytes:
            disk, fmt = dense_bytes, "dense"
        replaced = fast_modules[name]
        memory = _bytes(replaced.weight) if isinstance(replaced, SPARSE_MODULES) else dense_bytes
        d = chosen[name]
        out.append(
            LayerStorage(
                name,
                list(weight.shape),
                d.sparsity,
                dense_bytes,
                disk,
                fmt,
                memory,
                d.layout,
                d.reason,
            )
        )
    return out


@serialized
@denormals_flushed
def measure_sparsity(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batch_sizes: Sequence[int] = (1,),
    runs: int = 30,
    threads: int = 2,
    min_speedup: float = 1.1,
    workdir: str | Path | None = None,
) -> SparsityReport:
    """Measure storage and speed of a masked (or finalized) model -- see the module docstring.

    Nothing is changed on ``model``. Kernels are chosen by :func:`graphprune.sparsify` for
    ``batch_sizes``; torch and onnxruntime run with ``threads`` threads, ``runs`` interleaved
    runs per batch size.
    """
    dense = dense_copy(model).eval()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = sparsify(dense, example_inputs, batch_sizes=batch_sizes, min_speedup=min_speedup)
        decisions = sparsify_report(fast)
        report = SparsityReport(
            layers=layer_storage(dense, fast, decisions.decisions),
            torch_max_abs_error=decisions.max_abs_error,
        )
        report.torch_latency = _torch_latency(
            dense, fast, example_inputs, batch_sizes, runs, threads
        )
    finally:
        torch.set_num_threads(previous_threads)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        plain = export(dense, example_inputs, Path(tmp) / "dense.onnx")
        compact = export(dense, example_inputs, Path(tmp) / "compact.onnx", sparse_storage="auto")
        checked = verify(
            dense,
            compact.path,
            example_inputs,
            compact.input_names,
            compact.output_names,
            dynamic_batch=True,
        )
        report.onnx_dense_bytes, report.onnx_compact_bytes = plain.bytes, compact.bytes
        report.onnx_max_abs_error = checked.max_abs
        report.onnx_latency = benchmark(
            plain.path,
            compact.path,
            make_feeds(example_inputs, plain.input_names),
            batch_sizes=tuple(batch_sizes),
            threads=threads,
            runs=runs,
            labels=("dense", "compact"),
        )
    return report


def _torch_latency(
    dense: nn.Module,
    fast: nn.Module,
    example_inputs: ExampleInputs,
    batch_sizes: Sequence[int],
    runs: int,
    threads: int,
) -> BenchReport:
    report = BenchReport(threads, runs, 0, 0, labels=("dense", "sparse"), runtime="torch CPU")
    for b in batch_sizes:
        args, kwargs = normalize_inputs(with_batch(example_inputs, b))
        with torch.no_grad():
            la, lb = interleaved(
                lambda: dense(*args, **kwargs),  # noqa: B023 (called before the loop moves on)
                lambda: fast(*args, **kwargs),  # noqa: B023
                warmup=5,
                runs=runs,
            )
        report.results.append(BatchResult(b, la, lb))
    return report

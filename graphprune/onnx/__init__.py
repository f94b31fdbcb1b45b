"""The ONNX backend: export, verify in onnxruntime, quantize to int8, measure latency."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from graphprune.analysis.macs import count_macs, count_params, si
from graphprune.capture import ExampleInputs, output_tensors, serialized, without_cache
from graphprune.onnx.bench import BenchReport, benchmark
from graphprune.onnx.export import ExportedModel, ExportError, export
from graphprune.onnx.layout import Layout, layout_line, layout_warning, measure_layout
from graphprune.onnx.quantize import INT8_TOLERANCE, QuantizationError
from graphprune.onnx.quantize import quantize as quantize_onnx
from graphprune.onnx.runtime import denormals_flushed, feeds, session
from graphprune.onnx.verify import FP32_TOLERANCE, Verification, VerificationError, input_sets
from graphprune.onnx.verify import verify as verify_onnx


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured."""

    exported: ExportedModel
    verification: Verification | None = None
    baseline_verification: Verification | None = None  # the original model's own export
    quantized: Path | None = None
    quantized_bytes: int = 0
    quantized_float: dict[str, str] = dataclasses.field(default_factory=dict)  # node -> why
    quantized_verification: Verification | None = None
    latency: BenchReport | None = None
    layout: Layout | None = None  # convs in onnxruntime's blocked layout, pruned model
    baseline_layout: Layout | None = None  # the same for the original
    params: int = 0
    macs: int = 0
    baseline_params: int = 0
    baseline_macs: int = 0

    def to_dict(self) -> dict[str, Any]:
        def v(x: Verification | None) -> dict[str, Any] | None:
            return x.to_dict() if x is not None else None

        return {
            "path": str(self.exported.path),
            "bytes": self.exported.bytes,
            "inputs": self.exported.input_names,
            "outputs": self.exported.output_names,
            "opset": self.exported.opset,
            "dynamic_batch": self.exported.dynamic_batch,
            "note": self.exported.note,
            "sparse_storage": (
                [dataclasses.asdict(w) for w in self.exported.packing.weights]
                if self.exported.packing
                else None
            ),
            "verification": v(self.verification),
            "baseline_verification": v(self.baseline_verification),
            "quantized": str(self.quantized) if self.quantized else None,
            "quantized_bytes": self.quantized_bytes,
            "quantized_float": self.quantized_float,
            "quantized_verification": v(self.quantized_verification),
            "latency": self.latency.to_dict() if self.latency else None,
            "layout": self.layout.to_dict() if self.layout else None,
            "baseline_layout": self.baseline_layout.to_dict() if self.baseline_layout else None,
            "params": self.params,
            "macs": self.macs,
            "baseline_params": self.baseline_params,
            "baseline_macs": self.baseline_macs,
        }

    def table(self) -> str:
        e = self.exported
        lines = [
            f"wrote {e.path} ({e.bytes / 1e6:.2f} MB)",
            f"  opset {e.opset}, inputs {', '.join(e.input_names)} -> "
            f"{', '.join(e.output_names)}{', dynamic batch' if e.dynamic_batch else ''}",
        ]
        if e.note:
            lines.append(f"note: {e.note}")
        for label, ver in [
            ("pruned vs torch", self.verification),
            ("original vs torch", self.baseline_verification),
            ("int8 vs torch", self.quantized_verification),
        ]:
            if ver is not None:
                lines.append(
                    f"{label:<18} max |Δ| {ver.max_abs:.2e}  max rel {ver.max_rel:.2e}"
                    f"  ({len(ver.errors)} checks, {'ok' if ver.ok else 'FAILED'})"
                )
        packing = self.exported.packing
        if packing is not None and packing.weights:
            lines.append(
                f"sparse storage: {len(packing.weights)} weights {packing.dense_bytes / 1e6:.2f}"
                f" -> {packing.packed_bytes / 1e6:.2f} MB "
                f"({packing.dense_bytes / max(packing.packed_bytes, 1):.1f}x smaller on disk; "
                "decoded at session start, so dense speed)"
            )
        if self.quantized:
            lines.append(f"int8 model: {self.quantized} ({self.quantized_bytes / 1e6:.2f} MB)")
            if self.quantized_float:
                first = next(iter(self.quantized_float.items()))
                lines.append(
                    f"  kept in float: {len(self.quantized_float)} nodes whose calibrated range "
                    f"int8 cannot hold (e.g. {first[0]}: {first[1]})"
                )
        if self.baseline_params:
            lines.append(
                f"params {si(self.baseline_params)} -> {si(self.params)}, MACs "
                f"{si(self.baseline_macs)} -> {si(self.macs)} "
                f"(ideal speed-up {self.baseline_macs / max(self.macs, 1):.2f}x)"
            )
        if self.latency:
            lines.append(self.latency.table())
        if self.layout and self.baseline_layout:
            lines.append(layout_line(self.baseline_layout, self.layout))
            warning = layout_warning(self.baseline_layout, self.layout)
            if warning:
                lines += textwrap.wrap(
                    f"warning: {warning}",
                    80,
                    subsequent_indent="  ",
                    break_on_hyphens=False,
                    break_long_words=False,
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def make_feeds(example_inputs: ExampleInputs, names: list[str]) -> Any:
    """``(loaded, batch) -> feeds`` built from the example inputs' shapes and dtypes (for an
    onnxruntime session or any :class:`graphprune.onnx.runtimes.Loaded` model)."""

    def build(sess: Any, batch: int) -> dict[str, np.ndarray]:
        sets = input_sets(example_inputs, names, random=1, other_batch=batch)
        tensors = sets.get(f"batch {batch}", sets["random 1"])
        return feeds(sess, names, tensors)

    return build


def calibration_feeds(
    example_inputs: ExampleInputs, names: list[str], calibration: list[Any] | None
) -> list[dict[str, np.ndarray]]:
    batches = calibration or [example_inputs]
    out = []
    for batch in batches:
        sets = input_sets(batch, names, random=0, other_batch=None)
        out.append({n: t.numpy() for n, t in zip(names, sets["example"], strict=True)})
    return out


@serialized
@without_cache  # HF models: exported (and verified) without their KV cache
@denormals_flushed
def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | Path,
    *,
    verify: bool = True,
    baseline: nn.Module | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    quantize: str | None = None,
    calibration: list[Any] | None = None,
    atol: float = FP32_TOLERANCE[0],
    rtol: float = FP32_TOLERANCE[1],
    external_data: bool | None = None,
    optimized_path: str | Path | None = None,
    bench_runs: int = 30,
    batch_sizes: tuple[int, ...] | None = None,
    threads: int = 2,
    sparse_storage: str | None = None,
) -> ExportReport:
    """Export ``model`` to ``path`` and check it.

    ``verify``: compare onnxruntime with torch (raises :class:`VerificationError`).
    ``baseline``: the original model; its own export is verified too (so exporter problems
    show apart from pruning problems) and its latency is measured side by side with ``model``'s
    (``bench_runs`` interleaved runs at ``batch_sizes``, default the example batch), and
    onnxruntime's layout of both is read (:mod:`graphprune.onnx.layout`: convs left outside
    its blocked layout by the pruned widths are reported).
    ``quantize``: "dynamic" or "static" (calibrated on ``calibration`` batches, default the
    example inputs) writes ``<stem>.int8.onnx``, verified against torch at a looser tolerance.
    ``optimized_path``: also save onnxruntime's optimised graph there.
    ``sparse_storage``: "auto" (or "bitmask") stores mostly-zero weights compactly as valid,
    standard ONNX that onnxruntime decodes at session start -- a smaller file, dense speed;
    the packed file is what gets verified and benchmarked.
    """
    final = Path(path)
    with _staged(final) as path:  # written, verified and measured beside ``final``, then moved
        exported = export(
            model, example_inputs, path, dynamic_batch=dynamic_batch, opset=opset,
            external_data=external_data, sparse_storage=sparse_storage,
        )  # fmt: skip
        report = ExportReport(
            exported, params=count_params(model), macs=count_macs(model, example_inputs)
        )
        if optimized_path is not None:  # onnxruntime writes its optimised graph at start
            session(path, threads, optimized_path)
        check = _Checker(example_inputs, exported, atol, rtol)
        if verify:
            report.verification = check(model, path)
        if quantize is not None:
            _quantize(report, model, example_inputs, quantize, calibration)
        if baseline is not None:
            options = _BaselineOptions(dynamic_batch, opset, bench_runs, batch_sizes, threads)
            _beside_baseline(report, baseline, example_inputs, check if verify else None, options)
    exported.path = final
    if report.quantized is not None:
        report.quantized = final.with_name(report.quantized.name)
    return report


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A path named like ``final`` in a fresh folder beside it. When the block succeeds, every
    file in the folder (the model, its external data, the int8 model) replaces its namesake
    beside ``final``; when verification fails, nothing beside ``final`` changes and the failed
    export is kept in ``<stem>.unverified/`` (named in the error); on any other error the
    folder is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield stage / final.name
    except VerificationError as exc:
        kept = final.with_name(f"{final.stem}.unverified")
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(stage, kept)
        raise VerificationError(
            f"{exc}\n{final} was left as it was; the export that failed is in {kept}/"
        ) from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for produced in sorted(stage.iterdir()):
        os.replace(produced, final.parent / produced.name)
    shutil.rmtree(stage, ignore_errors=True)


@dataclass
class _Checker:
    """onnxruntime against torch for one exported signature (inputs, outputs, tolerance)."""

    example_inputs: ExampleInputs
    exported: ExportedModel
    atol: float
    rtol: float

    def __call__(self, model: nn.Module, onnx_path: Path) -> Verification:
        return verify_onnx(
            model, onnx_path, self.example_inputs, self.exported.input_names,
            self.exported.output_names, dynamic_batch=self.exported.dynamic_batch,
            atol=self.atol, rtol=self.rtol,
        )  # fmt: skip


@dataclass
class _BaselineOptions:
    dynamic_batch: bool  # as asked for the pruned model's export
    opset: int | None
    runs: int  # interleaved runs per batch size (0: no measurement)
    batch_sizes: tuple[int, ...] | None  # None: the example batch
    threads: int


def _quantize(
    report: ExportReport,
    model: nn.Module,
    example_inputs: ExampleInputs,
    mode: str,
    calibration: list[Any] | None,
) -> None:
    """``<stem>.int8.onnx`` beside the export, verified against fp32 torch."""
    exported = report.exported
    path, names_in = exported.path, exported.input_names
    int8 = path.with_name(f"{path.stem}.int8.onnx")
    feeds = calibration_feeds(example_inputs, names_in, calibration)
    report.quantized_float = quantize_onnx(path, int8, mode, feeds).kept_float
    report.quantized, report.quantized_bytes = int8, int8.stat().st_size
    report.quantized_verification = verify_int8(
        model, int8, example_inputs, names_in, exported.output_names, exported.dynamic_batch
    )


def _beside_baseline(
    report: ExportReport,
    baseline: nn.Module,
    example_inputs: ExampleInputs,
    check: _Checker | None,
    timing: _BaselineOptions,
) -> None:
    """The original model exported the same way: verified (so exporter problems show apart
    from pruning problems), timed side by side, and onnxruntime's layout of both read."""
    exported = report.exported
    path, names_in = exported.path, exported.input_names
    report.baseline_params = count_params(baseline)
    report.baseline_macs = count_macs(baseline, example_inputs)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        base_path = Path(tmp) / "baseline.onnx"
        base_exported = export(
            baseline, example_inputs, base_path, dynamic_batch=timing.dynamic_batch,
            opset=timing.opset,
        )  # fmt: skip
        if check is not None:
            report.baseline_verification = check(baseline, base_path)
        if timing.runs <= 0:
            return
        sets = input_sets(example_inputs, names_in, random=0, other_batch=None)
        example_batch = next(iter(sets["example"])).shape[0]
        report.latency = benchmark(
            base_path, path, make_feeds(example_inputs, names_in),
            batch_sizes=timing.batch_sizes or (example_batch,), threads=timing.threads,
            runs=timing.runs, ideal_speedup=report.baseline_macs / max(report.macs, 1),
        )  # fmt: skip
        if not (exported.external_data or base_exported.external_data):
            # (an optimised graph over 2 GB cannot be written as one file)
            report.layout = measure_layout(path, timing.threads)
            report.baseline_layout = measure_layout(base_path, timing.threads)


def verify_int8(
    model: nn.Module,
    path: Path,
    example_inputs: ExampleInputs,
    names_in: list[str],
    names_out: list[str],
    dynamic_batch: bool,
) -> Verification:
    """int8 vs fp32 torch: every element within INT8_TOLERANCE x the output's max magnitude."""
    report = verify_onnx(
        model,
        path,
        example_inputs,
        names_in,
        names_out,
        dynamic_batch=dynamic_batch,
        atol=0.0,
        rtol=0.0,
        raise_on_error=False,
    )
    scale = max(float(t.abs().max()) for t in output_tensors(model, example_inputs))
    report.atol, report.rtol = INT8_TOLERANCE * scale, 0.0
    for e in report.errors:
        e.ok = e.max_abs <= report.atol
    if not report.ok:
        raise VerificationError(
            f"{path}: int8 outputs differ from fp32 torch by up to "
            f"{report.max_abs:.3e}, more than {INT8_TOLERANCE:.0%} of the "
            f"output scale {scale:.3e}\n{report.table()}"
        )
    return report


__all__ = [
    "BenchReport",
    "ExportError",
    "ExportReport",
    "QuantizationError",
    "Verification",
    "VerificationError",
    "benchmark",
    "export",
    "export_onnx",
    "make_feeds",
]

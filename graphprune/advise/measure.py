"""One candidate, end to end: build it (one-shot), export and verify it, measure it.

Per candidate: the pruned torch model (or the one of the candidate it builds on), exported to
ONNX and verified against torch (fp32; a wrong pruned model is an error, never a row); int8
candidates quantized from that verified file (static QDQ, calibrated) and, with compact
storage, their int8 weights packed; then on every runtime: latency at each batch size side by
side with the original (interleaved, same process, same threads), memory at session start
(peak RSS of a fresh process, :mod:`graphprune.advise.memory`);
file size; quality through the file itself (:mod:`graphprune.advise.quality`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import torch
from torch import nn

from graphprune.advise.candidates import Candidate, slug
from graphprune.advise.memory import MemoryProbe
from graphprune.advise.quality import (
    Evaluate,
    OnnxModule,
    Quality,
    fidelity,
    outputs_of,
    user_quality,
)
from graphprune.analysis.macs import count_macs, count_params
from graphprune.capture import ExampleInputs
from graphprune.compile import compile
from graphprune.io import write_atomic
from graphprune.onnx import calibration_feeds, export_onnx, make_feeds
from graphprune.onnx.bench import BenchReport, benchmark
from graphprune.onnx.quantize import quantize
from graphprune.onnx.runtimes import Runtime, RuntimeLoadError
from graphprune.onnx.sparse_storage import pack_sparse_weights
from graphprune.report import REPORT_ATTRIBUTE, report
from graphprune.sparsity.parametrize import is_masked
from graphprune.stages.sparse import finalize


@dataclass
class RuntimeResult:
    """A candidate on one runtime, timed side by side with the original."""

    runtime: str
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch -> median ms
    original_ms: dict[int, float] = field(default_factory=dict)  # the original, same run
    memory_mb: float | None = None  # peak RSS to load and run it once (a fresh process)
    error: str | None = None  # the runtime could not load or run this file

    def speedup(self, batch: int) -> float | None:
        if batch not in self.latency_ms:
            return None
        return self.original_ms[batch] / self.latency_ms[batch]


@dataclass
class Row:
    """What was measured of one candidate (or why it was not)."""

    candidate: Candidate
    status: str = "not measured"  # "measured", "failed" or "not measured"
    reason: str | None = None  # why it failed or was not measured
    file: Path | None = None
    file_bytes: int = 0
    params: int = 0
    macs: int = 0
    quality: Quality | None = None
    runtimes: dict[str, RuntimeResult] = field(default_factory=dict)
    fp32_max_abs: float | None = None  # exported file vs torch (verified)
    int8_max_abs: float | None = None  # int8 file vs fp32 torch (reported, not a pass/fail)
    int8_float_nodes: dict[str, str] = field(default_factory=dict)  # kept float, and why
    seconds: float = 0.0
    setup_seconds: float = 0.0  # one-time work later candidates reuse (latency tables)
    pareto: dict[str, bool] = field(default_factory=dict)  # objective -> on the front

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def measured(self) -> bool:
        return self.status == "measured"


@dataclass
class Setting:
    """What every candidate is measured with (the same for all)."""

    example_inputs: ExampleInputs
    calibration: list[Any]  # the batches the one-shot plans calibrate on
    held_out: list[Any]  # the batches quality is measured on
    held_back: bool  # held_out is separate from calibration
    runtimes: list[Runtime]
    threads: int
    batch_sizes: tuple[int, ...]
    runs: int
    evaluate: Evaluate | None
    higher_is_better: bool
    workdir: Path
    probes: dict[str, MemoryProbe] = field(default_factory=dict)  # runtime -> its probe


@dataclass
class Original:
    """The original, once: its torch model, verified export and reference outputs."""

    model: nn.Module
    file: Path
    input_names: list[str]
    reference: list[list[torch.Tensor]]


def build(
    candidate: Candidate, original: nn.Module, setting: Setting, built: dict[str, nn.Module]
) -> nn.Module:
    """The candidate's torch model: the original, the one it builds on, or a one-shot
    compile of the original with its plan (masks baked in)."""
    if candidate.base is not None:
        return built[candidate.base]
    if candidate.plan is None:
        return original
    pruned = compile(
        original, candidate.plan, setting.example_inputs, calibration=setting.calibration
    )
    return finalize(pruned) if is_masked(pruned) else pruned


def write_file(
    candidate: Candidate, model: nn.Module, setting: Setting, original: Original, row: Row
) -> Path:
    """Export (verified fp32), then quantize and pack as the candidate says; the file to
    measure. int8 of the original quantizes the original's verified export (no second one)."""
    path = setting.workdir / f"{slug(candidate.name)}{'.fp32' if candidate.int8 else ''}.onnx"
    if candidate.int8 and candidate.plan is None and candidate.base is None:
        return _int8(candidate, original.file, original.input_names, setting, row, keep=True)
    storage = "auto" if candidate.compact and not candidate.int8 else None
    report = export_onnx(model, setting.example_inputs, path, sparse_storage=storage)
    row.fp32_max_abs = report.verification.max_abs if report.verification else None
    if not candidate.int8:
        return path
    return _int8(candidate, path, report.exported.input_names, setting, row, keep=False)


def _int8(
    candidate: Candidate, fp32: Path, names: list[str], setting: Setting, row: Row, keep: bool
) -> Path:
    """Static int8 of ``fp32`` (calibrated; nodes kept float noted), packed when compact; the
    fp32 file is removed unless ``keep`` (only the int8 file is measured)."""
    int8 = setting.workdir / f"{slug(candidate.name)}.onnx"  # the fp32 step: <slug>.fp32.onnx
    feeds = calibration_feeds(setting.example_inputs, names, setting.calibration)
    row.int8_float_nodes = quantize(fp32, int8, "static", feeds).kept_float
    if not keep:
        for step in (fp32, fp32.with_name(fp32.name + ".data")):
            step.unlink(missing_ok=True)
    if candidate.compact:  # int8 weights with many zeros: values + bitmask
        proto = onnx.load(str(int8))
        if pack_sparse_weights(proto, storage="auto").weights:
            write_atomic(int8, lambda tmp: onnx.save(proto, str(tmp)))
    return int8


def quality_of(file: Path, setting: Setting, original: Original, row: Row) -> Quality:
    module = OnnxModule(file, setting.threads)
    if setting.evaluate is not None:
        return user_quality(setting.evaluate, module, setting.higher_is_better)
    outputs = outputs_of(module, setting.held_out)
    if row.candidate.int8:  # int8 vs fp32 torch, for the record
        row.int8_max_abs = max(
            float((o - r).abs().max())
            for out, ref in zip(outputs, original.reference, strict=True)
            for o, r in zip(out, ref, strict=True)
        )
    return fidelity(outputs, original.reference, setting.held_back)


def time_on(runtime: Runtime, file: Path, original: Original, setting: Setting) -> RuntimeResult:
    """Latency of ``file`` and the original, interleaved, at each batch size on ``runtime``."""
    result = RuntimeResult(runtime.name)
    feeds = make_feeds(setting.example_inputs, original.input_names)
    for i, batch in enumerate(setting.batch_sizes):
        runs = setting.runs if i == 0 else max(5, setting.runs // 4)  # larger batches: fewer
        try:
            report: BenchReport = benchmark(
                original.file, file, feeds, batch_sizes=(batch,), threads=setting.threads,
                warmup=2 if i else 10, runs=runs, runtime=runtime,
            )  # fmt: skip
        except RuntimeLoadError as exc:
            result.error = str(exc)
            return result
        except Exception as exc:  # a runtime that loads the file but fails to run it
            result.error = f"{runtime.name} failed to run {file.name}: {type(exc).__name__}: {exc}"
            return result
        timed = report.results[0]
        result.latency_ms[batch] = timed.pruned.median_ms
        result.original_ms[batch] = timed.baseline.median_ms
    probe = setting.probes.get(runtime.name)
    if probe is not None:
        result.memory_mb = probe.memory_mb(file)
    return result


def file_bytes(path: Path) -> int:
    """The file and its external data (``<name>.data`` beside it, as the exporter writes)."""
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def measure(
    candidate: Candidate,
    original: Original,
    setting: Setting,
    built: dict[str, nn.Module],
) -> Row:
    """Build, export, verify and measure ``candidate``; a failure is the row's reason."""
    row = Row(candidate)
    start = time.perf_counter()
    try:
        model = build(candidate, original.model, setting, built)
        built[candidate.name] = model
        row.setup_seconds = _table_seconds(model) if candidate.plan is not None else 0.0
        row.params, row.macs = count_params(model), count_macs(model, setting.example_inputs)
        file = (
            original.file
            if candidate.is_reference
            else write_file(candidate, model, setting, original, row)
        )
        row.file, row.file_bytes = file, file_bytes(file)
        row.quality = quality_of(file, setting, original, row)
        for runtime in setting.runtimes:
            row.runtimes[runtime.name] = time_on(runtime, file, original, setting)
        row.status = "measured"
    except Exception as exc:  # the candidate fails, the advice goes on (its reason is shown)
        row.status, row.reason = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    row.seconds = time.perf_counter() - start
    return row


def _table_seconds(model: nn.Module) -> float:
    """Seconds a latency-targeted compile spent timing ops for its tables (cached on disk:
    the next latency target reads them)."""
    latency = report(model).latency if hasattr(model, REPORT_ATTRIBUTE) else None
    return float(latency.table_seconds) if latency is not None else 0.0


def prepare_original(model: nn.Module, setting: Setting) -> Original:
    """Export and verify the original (a failure here leaves nothing to compare: raised)."""
    path = setting.workdir / "original.onnx"
    report = export_onnx(model, setting.example_inputs, path)
    reference = outputs_of(model, setting.held_out)
    names = report.exported.input_names
    inputs = make_feeds(setting.example_inputs, names)(SimpleNamespace(input_names=names), 1)
    for runtime in setting.runtimes:  # batch-1 memory per runtime, in fresh processes
        setting.probes[runtime.name] = MemoryProbe(runtime.name, inputs, setting.threads)
    return Original(model, path, names, reference)


def runtime_names(rows: Sequence[Row]) -> list[str]:
    return sorted({name for row in rows for name in row.runtimes})

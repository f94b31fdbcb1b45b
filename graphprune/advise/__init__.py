"""``advise``: which kind of pruning for *this* runtime, measured on the user's model.

The rule of the field -- choose by deployment target, never by compression ratio alone -- as a
measurement: every kind of pruning graphprune does (structured at latency targets,
unstructured with compact storage, 2:4, int8 and the combinations; one-shot, no training) is
built, exported, verified and timed on each requested runtime side by side with the original;
quality is measured on the exported file; the answer is a table per objective with the
Pareto-optimal candidates marked and a recommendation naming what was measured.

    advice = gp.advise(model, x, calibration=batches, runtimes=("onnxruntime", "openvino"))
    print(advice)                       # tables, facts, recommendation
    advice.save_json("advice.json"); plot_advice(advice, "advice.png")
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from graphprune.advise.candidates import Candidate, check_candidates, default_candidates
from graphprune.advise.measure import Row, Setting, measure, prepare_original
from graphprune.advise.plot import plot_advice
from graphprune.advise.quality import Evaluate, OnnxModule, Quality
from graphprune.advise.report import Advice, pareto_front
from graphprune.capture import ExampleInputs, serialized
from graphprune.errors import InputError
from graphprune.onnx.op_latency import cpu_name
from graphprune.onnx.runtimes import available_runtimes
from graphprune.progress import track


def split_calibration(
    calibration: Iterable[Any] | None, example_inputs: ExampleInputs
) -> tuple[list[Any], list[Any], bool]:
    """Calibration batches for the one-shot plans, and the batches quality is measured on:
    the last quarter (at least one) is held back when there are two or more; otherwise the
    example inputs serve both (and the report says so)."""
    batches = list(calibration) if calibration is not None else []
    if len(batches) >= 2:
        held = max(1, len(batches) // 4)
        return batches[:-held], batches[-held:], True
    return batches or [example_inputs], [example_inputs], False


def _estimate(candidate: Candidate, rows: Sequence[Row], unit_s: float) -> float:
    """Seconds a candidate is expected to take: what a measured candidate of the same making
    took (less its one-time work, such as latency tables, which later ones reuse); else its
    relative cost times the original's own row (export, quality, timing). A guide for the
    budget, not a promise."""
    similar = [
        r.seconds - r.setup_seconds
        for r in rows
        if r.measured and _making(r.candidate) == _making(candidate)
    ]
    return max(similar) if similar else candidate.cost * unit_s


def _making(c: Candidate) -> tuple[bool | str, ...]:
    """What decides a candidate's cost: its kind, whether it has a plan (a latency target,
    reconstruction), builds on another, is quantized, is stored compactly."""
    plan = c.plan
    latency, refit = (plan.targets_latency, plan.reconstruct) if plan else (False, False)
    return c.kind, plan is not None, latency, refit, c.base is not None, c.int8, c.compact


@serialized
def advise(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    calibration: Iterable[Any] | None = None,
    evaluate: Evaluate | None = None,
    higher_is_better: bool = True,
    runtimes: Sequence[str] = ("onnxruntime",),
    threads: int | None = None,
    budget_s: float = 900.0,
    candidates: Sequence[Candidate] | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    runs: int = 30,
    tolerance: float = 0.01,
    out: str | Path | None = None,
    progress: bool = True,
) -> Advice:
    """Measure every kind of pruning on ``model`` and say which to use where.

    ``calibration``: batches for the one-shot plans (wanda, reconstruction, SparseGPT, int8);
    the last quarter is held back to measure fidelity. ``evaluate(model) -> float``: the
    quality to report instead (called on each candidate's exported file as a module; say with
    ``higher_is_better`` which way is better); an evaluate that raises or returns a non-number
    is that candidate's error. ``runtimes``: where to time (those not installed are listed as
    skipped). ``threads``: per runtime session (default: every core). ``budget_s``: candidates
    run cheapest first; one expected to overrun what is left is listed as not measured.
    ``candidates``: default :func:`default_candidates` (structured latency targets planned on
    the first runtime). ``tolerance``: the relative quality loss the recommendation accepts.
    ``out``: keep the ONNX files there (default: a temporary folder, removed).

    The model is never modified; each candidate is compiled from a copy.
    """
    start = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    found, skipped = available_runtimes(runtimes)
    if not found:
        raise InputError(f"none of the runtimes {list(runtimes)} is installed: {skipped}")
    todo = check_candidates(
        candidates
        if candidates is not None
        else default_candidates(runtime=found[0].name, threads=threads)
    )
    calib, held_out, held_back = split_calibration(calibration, example_inputs)
    workdir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graphprune-advise-"))
    workdir.mkdir(parents=True, exist_ok=True)
    setting = Setting(
        example_inputs, calib, held_out, held_back, found, threads, tuple(batch_sizes), runs,
        evaluate, higher_is_better, workdir,
    )  # fmt: skip
    try:
        rows = _run(model, todo, setting, budget_s, start, progress)
    finally:
        if out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return Advice(
        rows, [r.name for r in found], skipped, tuple(batch_sizes), threads, cpu_name(),
        tolerance, budget_s, time.perf_counter() - start,
    )  # fmt: skip


def _run(
    model: nn.Module,
    todo: list[Candidate],
    setting: Setting,
    budget_s: float,
    start: float,
    progress: bool,
) -> list[Row]:
    """Every candidate in order under the budget; the reference first (its cost sets the
    unit of the estimates)."""
    was_training = model.training
    model.eval()
    try:
        original = prepare_original(model, setting)
        built: dict[str, nn.Module] = {}
        rows: list[Row] = []
        unit_s = 0.0
        for candidate in track(todo, "advise: candidates", progress, total=len(todo)):
            left = budget_s - (time.perf_counter() - start)
            blocked = next(
                (r for r in rows if r.name == candidate.base and not r.measured), None
            )
            if blocked is not None:
                rows.append(Row(candidate, reason=f"builds on {blocked.name}, not measured"))
                continue
            expected = _estimate(candidate, rows, unit_s)
            if not candidate.is_reference and expected > left:
                rows.append(Row(candidate, reason=(
                    f"budget: expected ~{expected:.0f} s, {max(left, 0):.0f} s left"
                )))  # fmt: skip
                continue
            row = measure(candidate, original, setting, built)
            if candidate.is_reference:
                unit_s = row.seconds
            rows.append(row)
    finally:
        model.train(was_training)
        for probe in setting.probes.values():
            probe.close()
    return rows


__all__ = [
    "Advice",
    "Candidate",
    "OnnxModule",
    "Quality",
    "advise",
    "default_candidates",
    "pareto_front",
    "plot_advice",
]

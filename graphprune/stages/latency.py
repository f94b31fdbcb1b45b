"""Latency-targeted compile: allocate, compile, measure, correct.

The allocation (:mod:`graphprune.planning.latency.allocate`) predicts latency from per-op
tables; what single ops miss (norms, activations, fused kernels) is corrected here by
measuring the real pruned model: each round is compiled, exported and timed against the
original (interleaved, same process), the allocator's budget is scaled by target/measured,
and the loop repeats (at most ``ROUNDS``) until the measured ratio is within ``TOLERANCE``.
The model returned is the round measured closest to the target.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.capture import ExampleInputs, normalize_inputs
from graphprune.onnx import make_feeds
from graphprune.onnx.bench import benchmark
from graphprune.onnx.export import export, input_names
from graphprune.onnx.op_latency import LatencyCache
from graphprune.onnx.runtimes import get_runtime
from graphprune.planning.importance import LossFn
from graphprune.planning.latency.allocate import allocate, cost_model, overrides_for
from graphprune.planning.plan import Plan, PlanError
from graphprune.report import LatencyOutcome, LatencyRound, report

ROUNDS = 4  # measured correction rounds at most
TOLERANCE = 0.04  # |measured / target - 1| that ends the correction
RUNS = 30  # interleaved timed runs per block of a measurement
BLOCKS = 5  # blocks per measurement: the ratio is the median of the blocks' ratios


def measure_ratio(
    original: nn.Module,
    pruned: nn.Module,
    example_inputs: ExampleInputs,
    threads: int,
    runs: int = RUNS,
    runtime: str = "onnxruntime",
) -> tuple[float, float]:
    """Measured latency of ``pruned`` over ``original`` and the original's milliseconds:
    ``BLOCKS`` blocks of ``runs`` interleaved runs (batch of the example inputs) on the same two
    sessions, the median of the blocks' median ratios (one block's ratio wanders with the
    machine's other work; the median of several blocks much less)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, m in (("original", original), ("pruned", pruned)):
            path = Path(tmp) / f"{name}.onnx"
            export(m, example_inputs, path)
            paths.append(path)
        args, kwargs = normalize_inputs(example_inputs)
        batch = next(t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)).shape[0]
        feeds = make_feeds(example_inputs, input_names(original, example_inputs))
        report = benchmark(
            paths[0], paths[1], feeds, batch_sizes=(batch,) * BLOCKS, threads=threads, runs=runs,
            runtime=get_runtime(runtime),
        )
    ratios = [r.pruned.median_ms / r.baseline.median_ms for r in report.results]
    return float(np.median(ratios)), float(
        np.median([r.baseline.median_ms for r in report.results])
    )


def _next_budget(rounds: list[LatencyRound], target: float) -> float:
    """The allocator budget for the next round: scaled by target/measured after one round;
    after more, the secant through the two rounds closest to the target (measured latency is
    close to linear in the budget), kept within half to twice the last budget."""
    last = rounds[-1]
    guess = last.budget * target / last.measured
    near = sorted(rounds, key=lambda r: abs(r.measured - target))[:2]
    if len(near) == 2 and abs(near[0].measured - near[1].measured) > 1e-3:
        a, b = near
        slope = (a.measured - b.measured) / (a.budget - b.budget) if a.budget != b.budget else 0
        if slope > 0:
            guess = a.budget + (target - a.measured) / slope
    return min(0.999, max(0.5 * last.budget, min(2.0 * last.budget, guess)))


def compile_to_latency(
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    compile_fn: Callable[..., nn.Module],
    *,
    calibration: list[Any] | None,
    loss_fn: LossFn | None,
    progress: bool = True,
) -> tuple[nn.Module, Plan, LatencyOutcome]:
    """Allocate, compile, measure, correct (module docstring). Returns the chosen model, the
    concrete per-unit plan it was compiled with, and the outcome."""
    start = time.perf_counter()
    cache = LatencyCache(runtime=plan.latency_runtime)
    batches = calibration if calibration is not None else [example_inputs]
    costs = cost_model(model, plan, example_inputs, batches, loss_fn, cache, progress)
    threads = plan.latency_threads
    runtime = plan.latency_runtime
    _, original_ms = measure_ratio(model, model, example_inputs, threads, runtime=runtime)
    target = plan.target_latency or (plan.target_latency_ms or 0.0) / original_ms
    if target >= 1.0:
        raise PlanError(
            f"target_latency_ms={plan.target_latency_ms} is at or above the original's measured "
            f"{original_ms:.3f} ms: nothing needs pruning"
        )
    budget = target
    rounds: list[LatencyRound] = []
    candidates: list[tuple[nn.Module, Plan]] = []
    for _ in range(ROUNDS):
        try:
            kept = allocate(costs, budget)
        except PlanError:
            if not rounds:
                raise
            break  # a corrected budget beyond the floors: the rounds so far are the best

        concrete = dataclasses.replace(
            plan, ratio=0.0, overrides=overrides_for(costs, kept), target_latency=None,
            target_latency_ms=None, scope="local",
        )  # fmt: skip
        pruned = compile_fn(
            model, concrete, example_inputs, calibration=calibration, loss_fn=loss_fn
        )
        measured, original_ms = measure_ratio(
            model, pruned, example_inputs, threads, runtime=runtime
        )
        macs = report(pruned).macs_ratio
        rounds.append(LatencyRound(budget, costs.ratio(kept), measured, macs))
        candidates.append((pruned, concrete))
        if abs(measured / target - 1) <= TOLERANCE:
            break
        budget = _next_budget(rounds, target)
    chosen = min(range(len(rounds)), key=lambda r: abs(rounds[r].measured / target - 1))
    outcome = LatencyOutcome(
        target, original_ms, rounds, chosen, cache.measured, cache.hits, cache.seconds,
        time.perf_counter() - start, runtime,
    )  # fmt: skip
    pruned, concrete = candidates[chosen]
    return pruned, concrete, outcome

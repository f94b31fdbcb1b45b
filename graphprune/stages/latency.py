"""Latency-targeted compile: allocate, compile, measure, correct.

The allocation (:mod:`graphprune.planning.latency.allocate`) predicts latency from per-op
tables; what single ops miss (norms, activations, fused kernels) is corrected here by
measuring the real pruned model: each round is compiled, exported and timed against the
original (interleaved, same process; exports of a model with the same content are reused
within the process, :mod:`graphprune.onnx.export_cache`), the allocator's budget is scaled
by target/measured, and the loop repeats (at most ``ROUNDS``) until the measured ratio is
within ``TOLERANCE``. The model returned is the round measured closest to the target.
"""

from __future__ import annotations

import dataclasses
import math
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
from graphprune.onnx.export import input_names
from graphprune.onnx.export_cache import exported
from graphprune.onnx.op_latency import LatencyCache
from graphprune.onnx.runtimes import get_runtime
from graphprune.planning.importance import LossFn
from graphprune.planning.latency.allocate import CostModel, allocate, cost_model, overrides_for
from graphprune.planning.plan import Plan, PlanError
from graphprune.report import LatencyOutcome, LatencyRound, report

ROUNDS = 4  # measured correction rounds at most
TOLERANCE = 0.04  # |measured / target - 1| that ends the correction
RUNS = 30  # interleaved timed runs per block of a measurement (at most)
MIN_RUNS = 10  # ... and at least
BLOCK_SECONDS = 0.5  # a block times at least this much of the original (fewer runs when slow)
BLOCKS = 5  # blocks per measurement: the ratio is the median of the blocks' ratios


def measure_ratio(
    original: nn.Module,
    pruned: nn.Module,
    example_inputs: ExampleInputs,
    threads: int,
    runs: int = RUNS,
    runtime: str = "onnxruntime",
    *,
    original_file: Path | None = None,
) -> tuple[float, float]:
    """Measured latency of ``pruned`` over ``original`` and the original's milliseconds:
    ``BLOCKS`` blocks of ``runs`` interleaved runs (batch of the example inputs) on the same two
    sessions, the median of the blocks' median ratios (one block's ratio wanders with the
    machine's other work; the median of several blocks much less). ``original_file``: the
    original's export, when the caller has it (rounds against one original export it once);
    ``pruned is original`` times one export against itself."""
    with tempfile.TemporaryDirectory() as tmp:
        base = original_file
        if base is None:
            base = exported(original, example_inputs, Path(tmp) / "original.onnx")
        other = base
        if pruned is not original:
            other = exported(pruned, example_inputs, Path(tmp) / "pruned.onnx")
        args, kwargs = normalize_inputs(example_inputs)
        batch = next(t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)).shape[0]
        feeds = make_feeds(example_inputs, input_names(original, example_inputs))
        report = benchmark(
            base, other, feeds, batch_sizes=(batch,) * BLOCKS, threads=threads, runs=runs,
            runtime=get_runtime(runtime),
        )  # fmt: skip
    ratios = [r.pruned.median_ms / r.baseline.median_ms for r in report.results]
    return float(np.median(ratios)), float(
        np.median([r.baseline.median_ms for r in report.results])
    )


def runs_per_block(predicted_s: float) -> int:
    """Timed runs per block for a model predicted to take ``predicted_s`` a run: ``RUNS``, fewer
    for a slow one (a block times at least ``BLOCK_SECONDS`` of it, at least ``MIN_RUNS`` runs:
    the relative noise of a long run is lower)."""
    return int(min(RUNS, max(MIN_RUNS, math.ceil(BLOCK_SECONDS / max(predicted_s, 1e-9)))))


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
    """Allocate, compile, measure, correct (module docstring). Returns the chosen round's model,
    the concrete per-unit plan it was compiled with, and the outcome. The rounds are compiled
    without ``reconstruct`` (a refit changes values, not shapes, so not latency): with it, the
    caller compiles the returned plan once more."""
    start = time.perf_counter()
    cache = LatencyCache(runtime=plan.latency_runtime)
    batches = calibration if calibration is not None else [example_inputs]
    costs = cost_model(model, plan, example_inputs, batches, loss_fn, cache, progress)
    with tempfile.TemporaryDirectory() as tmp:
        # exported once (and reused by later compiles of this model), timed against every round
        base = exported(model, example_inputs, Path(tmp) / "original.onnx")

        original_ms: list[float] = []  # as each measurement found it: the last one is reported
        runs = runs_per_block(costs.seconds(costs.full))

        def timed(pruned: nn.Module) -> tuple[float, float]:
            ratio, ms = measure_ratio(
                model, pruned, example_inputs, plan.latency_threads, runs,
                runtime=plan.latency_runtime, original_file=base,
            )  # fmt: skip
            original_ms.append(ms)
            return ratio, ms

        if plan.target_latency is None:  # milliseconds: the original's own, first
            timed(model)
        target = plan.target_latency or (plan.target_latency_ms or 0.0) / original_ms[0]
        if target >= 1.0:
            raise PlanError(
                f"target_latency_ms={plan.target_latency_ms} is at or above the original's "
                f"measured {original_ms[0]:.3f} ms: nothing needs pruning"
            )

        def compile_round(concrete: Plan) -> nn.Module:
            return compile_fn(
                model, concrete, example_inputs, calibration=calibration, loss_fn=loss_fn
            )

        rounds, candidates = _rounds(plan, costs, target, timed, compile_round)
    chosen = min(range(len(rounds)), key=lambda r: abs(rounds[r].measured / target - 1))
    outcome = LatencyOutcome(
        target, original_ms[-1], rounds, chosen, cache.measured,
        cache.hits, cache.seconds, time.perf_counter() - start, plan.latency_runtime,
    )  # fmt: skip
    pruned, concrete = candidates[chosen]
    return pruned, concrete, outcome


def _rounds(
    plan: Plan,
    costs: CostModel,
    target: float,
    timed: Callable[[nn.Module], tuple[float, float]],
    compile_round: Callable[[Plan], nn.Module],
) -> tuple[list[LatencyRound], list[tuple[nn.Module, Plan]]]:
    """Up to ``ROUNDS`` allocate-compile-measure rounds, until one is within ``TOLERANCE``."""
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
        pruned = compile_round(dataclasses.replace(concrete, reconstruct=False))
        measured, _ = timed(pruned)
        rounds.append(LatencyRound(budget, costs.ratio(kept), measured, report(pruned).macs_ratio))
        candidates.append((pruned, concrete))
        if abs(measured / target - 1) <= TOLERANCE:
            break
        budget = _next_budget(rounds, target)
    return rounds, candidates

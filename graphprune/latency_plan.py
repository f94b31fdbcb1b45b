"""Latency-targeted plans: keep at most a fraction of the measured onnxruntime latency.

1. **Cost model.** Every Linear/Conv layer's latency is read from its measured table
   (:mod:`graphprune.latency_tables`) at the widths a choice of kept counts gives it: a layer's
   input and output widths are linear in the kept counts of the pruning units whose channels
   its weight's positions hold. The predicted latency ratio is the sum over layers at the chosen
   widths over the sum at full width.
2. **Allocation** (greedy, as HALP does): starting from full width, repeatedly take one rounding
   step (``round_to`` channels) from the unit where it loses the least normalised importance per
   predicted second saved, until the prediction meets the budget; ``min_channels`` and
   ``max_ratio`` bound every unit.
3. **Measure and correct.** The allocation is compiled, exported and timed against the original
   (interleaved, same process); the budget given to the allocator is scaled by target/measured
   and the loop repeats (at most ``ROUNDS``) until the measured ratio is within ``TOLERANCE``.
   The model returned is the round measured closest to the target.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.analysis import DependencyGraph, analyze
from graphprune.capture import ExampleInputs, normalize_inputs, run_eval
from graphprune.importance import LossFn, score_groups
from graphprune.latency_tables import LatencyCache, OpShape, grid, measure_tables, op_shape
from graphprune.plan import Plan, PlanError
from graphprune.report import REPORT
from graphprune.resolve import candidate_groups
from graphprune.units import Unit, pruning_units

ROUNDS = 4  # measured correction rounds at most
TOLERANCE = 0.04  # |measured / target - 1| that ends the correction
RUNS = 30  # interleaved timed runs per block of a measurement
BLOCKS = 5  # blocks per measurement: the ratio is the median of the blocks' ratios


@dataclass
class Width:
    """A layer dimension's width: ``const + sum(coef[u] * kept[u])``."""

    const: float
    coef: dict[int, float] = field(default_factory=dict)

    def at(self, kept: dict[int, int]) -> float:
        return self.const + sum(c * kept[u] for u, c in self.coef.items())


@dataclass
class TimedLayer:
    name: str
    op: OpShape
    cin: Width
    cout: Width
    groups_in: int = 1  # conv in_channels = groups * weight.shape[1] (grouped, not depthwise)


@dataclass
class PrunableUnit:
    """A unit as the allocator sees it: allowed kept counts and the cost of each step."""

    unit: Unit
    counts: list[int]  # allowed kept counts, ascending, the last = size
    scores: np.ndarray  # normalised importance of its channels, descending

    def loss(self, frm: int, to: int) -> float:
        """Importance lost going from ``frm`` kept channels to ``to``."""
        return float(self.scores[to:frm].sum())


@dataclass
class CostModel:
    layers: list[TimedLayer]
    tables: dict[str, Any]  # name -> LayerTable
    units: dict[int, PrunableUnit]
    full: dict[int, int]  # unit id -> size

    def seconds(self, kept: dict[int, int], only: Iterable[TimedLayer] | None = None) -> float:
        total = 0.0
        for layer in self.layers if only is None else only:
            cout = layer.cout.at(kept)
            cin = cout if layer.op.depthwise else layer.cin.at(kept) * layer.groups_in
            total += self.tables[layer.name](cin, cout)
        return total

    def ratio(self, kept: dict[int, int]) -> float:
        return self.seconds(kept) / max(self.seconds(self.full), 1e-12)


def _input_shapes(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, tuple[int, ...]]:
    """The input shape of every Linear/Conv1d/Conv2d on its first call."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):

            def record(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                shapes.setdefault(name, tuple(args[0].shape))

            handles.append(module.register_forward_pre_hook(record))
    try:
        run_eval(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _width(
    dg: DependencyGraph, fqn: str, dim: int, size: int, unit_of: dict[tuple[int, int], Unit]
) -> Width:
    """Width of ``fqn``'s ``dim`` as a linear function of unit kept counts."""
    try:
        rows = dg.position_channels(fqn, dim)
    except KeyError:
        return Width(float(size))
    width = Width(0.0)
    for row in rows:
        unit = next((unit_of[p] for p in row if p in unit_of), None)
        if unit is None:
            width.const += 1
        else:  # positions per channel of the unit: a flatten repeats each channel
            width.coef[unit.id] = width.coef.get(unit.id, 0.0) + 1.0 / unit.size
    return width


def cost_model(
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    batches: list[Any],
    loss_fn: LossFn | None,
    cache: LatencyCache,
    progress: bool = True,
) -> CostModel:
    """Units, their allowed counts and scores, and the measured tables of every layer."""
    dg = analyze(model, example_inputs)
    modules = dict(model.named_modules())
    groups = candidate_groups(dg, plan)
    units = pruning_units(dg, groups, modules, 0.5, plan.channel_multiple).units
    scores = score_groups(
        model, dg, groups, plan.importance, batches=batches, loss_fn=loss_fn, seed=plan.seed
    )
    unit_of = {(u.group, c): u for u in units for c in u.channels}
    prunable: dict[int, PrunableUnit] = {}
    block = plan.channel_multiple
    for u in units:
        if u.kind != "channels" or u.width < block or plan.ignores(u.names):
            continue
        step = u.rounding(block)
        floor = max(
            math.ceil(plan.min_channels / u.multiplier), math.ceil((1 - plan.max_ratio) * u.size)
        )
        floor = min(u.size, math.ceil(max(floor, 1) / step) * step)
        counts = sorted({*range(floor, u.size, step), u.size})
        group_scores = scores[u.group]
        mean = float(group_scores.mean()) or 1.0
        ranked = np.sort(group_scores[u.channels] / mean)[::-1]
        prunable[u.id] = PrunableUnit(u, counts, ranked)
    full = {u.id: u.size for u in units}
    floors = {u.id: (prunable[u.id].counts[0] if u.id in prunable else u.size) for u in units}
    shapes = _input_shapes(model, example_inputs)
    layers, specs = [], []
    for name, shape in shapes.items():
        module = modules[name]
        op = op_shape(module, shape)
        weight = getattr(module, "weight", None)
        if op is None or not isinstance(weight, torch.Tensor):
            continue
        fqn = f"{name}.weight"
        cout = _width(dg, fqn, 0, weight.shape[0], unit_of)
        cin = _width(dg, fqn, 1, weight.shape[1], unit_of)
        groups_in = 1 if op.kind == "linear" or op.depthwise else op.groups
        layer = TimedLayer(name, op, cin, cout, groups_in)
        layers.append(layer)
        step = block
        ins = grid(round(cin.at(full)) * groups_in, step * groups_in,
                   round(cin.at(floors)) * groups_in)  # fmt: skip
        outs = grid(round(cout.at(full)), step, round(cout.at(floors)))
        specs.append((name, op, ins, outs))
    tables = measure_tables(specs, plan.latency_threads, cache, progress)
    return CostModel(layers, tables, prunable, full)


def allocate(model: CostModel, budget: float) -> dict[int, int]:
    """Kept count per unit whose predicted latency ratio is at most ``budget``: greedy steps
    of least importance lost per second saved (raises when even the floors do not fit)."""
    kept = dict(model.full)
    floors = dict(kept)
    floors.update({i: u.counts[0] for i, u in model.units.items()})
    best = model.ratio(floors)
    if best > budget + 1e-9:
        raise (
            PlanError(
                f"latency budget out of reach: with every layer at its floor (min_channels, "
                f"max_ratio={1 - min(u.counts[0] / u.unit.size for u in model.units.values()):.2f}"
                f", round_to) the best achievable is {best:.3f} of the original latency "
                f"(predicted from the latency tables); asked {budget:.3f}"
            )
            if model.units
            else PlanError("nothing in this model can be pruned to meet a latency")
        )
    touching = {
        i: [layer for layer in model.layers if i in layer.cin.coef or i in layer.cout.coef]
        for i in model.units
    }
    total_full = model.seconds(model.full)
    current = model.seconds(kept)
    while current / total_full > budget:
        choice: tuple[float, int, int, float] | None = None
        for i, unit in model.units.items():
            k = kept[i]
            position = unit.counts.index(k)
            if position == 0:
                continue
            smaller = unit.counts[position - 1]
            before = model.seconds(kept, touching[i])
            kept[i] = smaller
            saved = before - model.seconds(kept, touching[i])
            kept[i] = k
            if saved <= 0:
                continue
            cost = unit.loss(k, smaller) / saved
            if choice is None or cost < choice[0]:
                choice = (cost, i, smaller, saved)
        if choice is None:  # only steps that save nothing are left
            break
        _, i, smaller, saved = choice
        kept[i] = smaller
        current -= saved
    return kept


def overrides_for(model: CostModel, kept: dict[int, int]) -> dict[str, float]:
    """Per-unit ratios (keyed by the unit's exact name) that resolve to ``kept``."""
    out: dict[str, float] = {}
    for i, unit in model.units.items():
        if kept[i] < unit.unit.size and (unit.unit.layers or unit.unit.producers):
            out[unit.unit.name] = (unit.unit.size - kept[i]) / unit.unit.size
    return out


@dataclass
class LatencyRound:
    budget: float  # the ratio the allocator was given
    predicted: float
    measured: float
    macs_ratio: float


@dataclass
class LatencyOutcome:
    target: float  # ratio of the original's measured latency
    original_ms: float
    rounds: list[LatencyRound]
    chosen: int
    table_ops_measured: int
    table_ops_cached: int
    table_seconds: float
    seconds: float

    @property
    def measured(self) -> float:
        return self.rounds[self.chosen].measured

    @property
    def predicted(self) -> float:
        return self.rounds[self.chosen].predicted

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(measured=self.measured, predicted=self.predicted)
        return data


def measure_ratio(
    original: nn.Module,
    pruned: nn.Module,
    example_inputs: ExampleInputs,
    threads: int,
    runs: int = RUNS,
) -> tuple[float, float]:
    """Measured latency of ``pruned`` over ``original`` and the original's milliseconds:
    ``BLOCKS`` blocks of ``runs`` interleaved runs (batch of the example inputs) on the same two
    sessions, the median of the blocks' median ratios (one block's ratio wanders by about
    +-5 % on a 2-core machine for a millisecond model; the median of five by less)."""
    from graphprune.onnx import make_feeds
    from graphprune.onnx.bench import benchmark
    from graphprune.onnx.export import export, input_names

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
            paths[0], paths[1], feeds, batch_sizes=(batch,) * BLOCKS, threads=threads, runs=runs
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
    cache = LatencyCache()
    batches = calibration if calibration is not None else [example_inputs]
    costs = cost_model(model, plan, example_inputs, batches, loss_fn, cache, progress)
    threads = plan.latency_threads
    _, original_ms = measure_ratio(model, model, example_inputs, threads)
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
        measured, original_ms = measure_ratio(model, pruned, example_inputs, threads)
        macs = getattr(pruned, REPORT).macs_ratio
        rounds.append(LatencyRound(budget, costs.ratio(kept), measured, macs))
        candidates.append((pruned, concrete))
        if abs(measured / target - 1) <= TOLERANCE:
            break
        budget = _next_budget(rounds, target)
    chosen = min(range(len(rounds)), key=lambda r: abs(rounds[r].measured / target - 1))
    outcome = LatencyOutcome(
        target, original_ms, rounds, chosen, cache.measured, cache.hits, cache.seconds,
        time.perf_counter() - start,
    )  # fmt: skip
    pruned, concrete = candidates[chosen]
    return pruned, concrete, outcome

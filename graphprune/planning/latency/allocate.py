"""Latency-targeted allocation: per-unit kept counts whose predicted latency meets a budget.

1. **Cost model.** Every Linear/Conv layer's latency is read from its measured table
   (:mod:`graphprune.planning.latency.tables`, measured by a runtime backend) at the widths a
   choice of kept counts gives it: a layer's input and output widths are linear in the kept
   counts of the pruning units whose channels its weight's positions hold. The predicted
   latency ratio is the sum over layers at the chosen widths over the sum at full width.
2. **Allocation** (greedy, as HALP does): starting from full width, repeatedly take one rounding
   step (``round_to`` channels) from the unit where it loses the least normalised importance per
   predicted second saved, until the prediction meets the budget; ``min_channels`` and
   ``max_ratio`` bound every unit.

Measuring the compiled allocation and correcting the budget is the driver's
(:mod:`graphprune.stages.latency`): it needs compile and a runtime, both above planning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.analysis import DependencyGraph, analyze_captured
from graphprune.analysis.cache import analysed
from graphprune.capture import ExampleInputs, own_thread, run_eval
from graphprune.planning.importance import LossFn, score_groups
from graphprune.planning.latency.tables import OpShape, TableSource, grid, op_shape
from graphprune.planning.plan import Plan, PlanError
from graphprune.planning.resolve import candidate_groups
from graphprune.planning.units import Unit, pruning_units


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

            handles.append(module.register_forward_pre_hook(own_thread(record)))
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
    cache: TableSource,
    progress: bool = True,
) -> CostModel:
    """Units, their allowed counts and scores, and the measured tables of every layer."""
    dg = analysed(model, example_inputs, analyze_captured).dg  # the rounds' compiles reuse it
    modules = dict(model.named_modules())
    groups = candidate_groups(dg, plan, model)
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
    tables = cache.tables(specs, plan.latency_threads, progress)
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



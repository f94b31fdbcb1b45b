"""graphprune.compile: capture -> analyze -> score -> resolve -> passes -> verify."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch import nn

from graphprune.analysis import DependencyGraph, analyze_captured
from graphprune.capture import Captured, ExampleInputs, capture
from graphprune.errors import InputError
from graphprune.hf import no_cache, sync_config
from graphprune.importance import LossFn, score_groups
from graphprune.macs import count_macs, count_params
from graphprune.passes.base import Pass, PassContext, PassManager
from graphprune.passes.drop_layers import DropLayers, block_contributions, droppable_blocks
from graphprune.passes.provenance import trace_int_uses
from graphprune.passes.prune_heads import PruneHeads
from graphprune.passes.slice_channels import SliceChannels
from graphprune.passes.verify import make_verifier, output_shapes
from graphprune.plan import Plan, PlanError
from graphprune.report import (
    RECORD,
    REPORT,
    CompileReport,
    GroupOutcome,
    LayerSparsity,
    UnitReport,
)
from graphprune.resolve import Resolution, candidate_groups, resolve
from graphprune.sparsity.masks import compute_masks
from graphprune.sparsity.parametrize import apply_masks
from graphprune.units import pruning_units

RECORD_FORMAT = 2  # 2: resolutions carry per-unit outcomes (1: groups only; still loadable)


class Stopwatch:
    """Seconds per named stage, accumulated from lap to lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._clock
        self._clock = now


@dataclasses.dataclass
class _Setup:
    """Everything computed once per compile, shared by every trial of a MACs search."""

    captured: Captured
    dg: DependencyGraph
    int_uses: list[Any]
    reference_shapes: Any
    macs_before: int


def compile(
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    *,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Prune ``model`` as ``plan`` says; return a module of the same class.

    Structured plans (channels, heads, layers) make the model smaller and dense. Sparse plans
    (unstructured, n:m, block; or ``plan.sparsity`` after a structured one) mask weights with
    ``torch.nn.utils.parametrize`` so fine-tuning keeps them zero; :func:`graphprune.finalize`
    bakes the masks, :func:`graphprune.sparsify` runs them on sparse kernels where faster.

    Works on a deep copy unless ``inplace=True``; the result keeps the input's train/eval
    mode and is an ordinary module (trainable, saveable with :func:`graphprune.save`).
    ``calibration`` batches (defaults to the example inputs) feed the data-driven criteria
    (taylor, fisher) and the layer contributions; ``loss_fn(output)`` defaults to the mean
    squared output (``loss_fn(output, target)`` for :class:`graphprune.LabelledBatch` batches).
    :func:`graphprune.report` returns what was done.
    """
    if not isinstance(plan, Plan):
        raise InputError(f"plan must be a graphprune.Plan, not {type(plan).__name__}")
    watch = Stopwatch()
    target = model if inplace else copy.deepcopy(model)
    with no_cache(target):  # HF models: a KV cache output cannot be captured
        _compile_into(target, model, plan, example_inputs, calibration, loss_fn, watch)
    return target


def _compile_into(
    target: nn.Module,
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    calibration: Iterable[Any] | None,
    loss_fn: LossFn | None,
    watch: Stopwatch,
) -> None:
    batches = list(calibration) if calibration is not None else [example_inputs]
    params_before = count_params(target)
    macs_before = count_macs(target, example_inputs)
    names = [n for n, _ in target.named_modules() if n] + [n for n, _ in target.named_parameters()]
    plan.check_patterns(names)
    changes: list[str] = []
    dropped: list[str] = []
    outcomes: list[GroupOutcome] = []
    resolution = Resolution()
    group_sizes: list[int] = []
    if not plan.is_sparse:
        structure = _prune_structure(
            target, plan, example_inputs, batches, loss_fn, macs_before, watch
        )
        changes, dropped = structure.ctx.changes, structure.ctx.dropped
        outcomes, resolution = structure.outcomes, structure.resolution
        group_sizes = [g.size for g in structure.ctx.dg.groups]
    masked: list[LayerSparsity] = []
    sparse = plan.sparse_plan
    if sparse is not None:
        watch.restart()
        masks = compute_masks(target, sparse, batches=batches, loss_fn=loss_fn)
        apply_masks(target, masks)
        masked = [
            LayerSparsity(name, m.pattern, list(m.mask.shape), m.sparsity)
            for name, m in masks.layers.items()
        ] + [LayerSparsity(name, "dense", [], 0.0, why) for name, why in masks.skipped.items()]
        changes += [
            f"{n}: {m.pattern} mask, {m.sparsity:.1%} zeros" for n, m in masks.layers.items()
        ]
        watch.lap("masks")

    synced = sync_config(
        target, getattr(model, "config", None)
    )  # HF: attention counts and config follow the weights
    if synced is not None:
        changes += [f"config.{k} = {v}" for k, v in synced.changes.items()]
    report = CompileReport(
        plan=_plan_data(plan),
        params_before=params_before,
        params_after=count_params(target),
        macs_before=macs_before,
        macs_after=count_macs(target, example_inputs),  # masks keep the dense MACs
        groups=outcomes,
        units=[UnitReport(**vars(u)) for u in resolution.units],
        changes=changes,
        dropped=dropped,
        seconds=watch.seconds,
        resolution=resolution.to_dict(),
        sparsity=masked,
        config=synced.to_dict() if synced is not None else {},
    )
    record = {
        "format": RECORD_FORMAT,
        "plan": report.plan,
        "dropped": dropped,
        "resolution": resolution.to_dict(),
        "group_sizes": group_sizes,
        "changes": changes,
        "sparsity": {"layers": [m.module for m in masked if m.pattern != "dense"], "baked": False},
        # compiling an already-compiled model (iterative pruning) chains the records, so
        # load() and rewind() replay every step from the original architecture
        "previous": earlier_records(model),
    }
    object.__setattr__(target, RECORD, record)
    object.__setattr__(target, REPORT, report)


@dataclasses.dataclass
class _Structure:
    ctx: PassContext
    outcomes: list[GroupOutcome]
    resolution: Resolution


def _prune_structure(
    target: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    batches: list[Any],
    loss_fn: LossFn | None,
    macs_before: int,
    watch: Stopwatch,
) -> _Structure:
    """Channels, heads or layers: analyze, score, resolve, run the passes (in place)."""
    watch.restart()
    lap = watch.lap
    captured = capture(target, example_inputs)
    lap("capture")
    dg = analyze_captured(captured)
    lap("analyze")
    modules = dict(target.named_modules())
    setup = _Setup(
        captured,
        dg,
        trace_int_uses(target, example_inputs),
        output_shapes(target, example_inputs),
        macs_before,
    )

    if plan.granularity == "layers":
        blocks = [b for b in droppable_blocks(target, captured) if not plan.ignores([b])]
        if not blocks:
            raise PlanError(
                "granularity='layers' found no residual block (y = x + f(x)) to "
                "drop in this model; use granularity='channels'"
            )
        order = _rank_blocks(target, blocks, plan, batches)
        lap("score")

        def layer_trial(ratio: float) -> tuple[list[Pass], dict[int, list[int]]]:
            return [DropLayers(order[: math.floor(ratio * len(order) + 1e-9)])], {}

        passes, kept = _choose(plan, layer_trial, target, example_inputs, setup)
        outcomes: list[GroupOutcome] = []
        resolution = Resolution()
    else:
        groups = candidate_groups(dg, plan)
        units = pruning_units(dg, groups, modules, plan.ratio or 0.5, plan.channel_multiple)
        scores = score_groups(
            target, dg, groups, plan.importance, batches=batches, loss_fn=loss_fn, seed=plan.seed
        )
        lap("score")
        make = PruneHeads if plan.granularity == "heads" else SliceChannels
        resolutions: dict[float, Resolution] = {}

        def channel_trial(ratio: float) -> tuple[list[Pass], dict[int, list[int]]]:
            trial_plan = dataclasses.replace(plan, ratio=ratio, target_macs=None)
            found = resolve(trial_plan, dg, groups, scores, modules, units=units)
            resolutions[ratio] = found
            return [make()], found.kept

        passes, kept = _choose(plan, channel_trial, target, example_inputs, setup)
        resolution = next(r for r in resolutions.values() if r.kept is kept)
        outcomes = [GroupOutcome(g.id, g.name, g.kind, len(kept[g.id]), g.size) for g in groups]
    lap("resolve")

    ctx = PassContext(target, example_inputs, captured, dg, kept, setup.int_uses)
    manager = PassManager(passes, verify=make_verifier(setup.reference_shapes))
    manager(ctx)
    watch.seconds.update({f"pass:{k}": v for k, v in manager.timings.items()})
    return _Structure(ctx, outcomes, resolution)


def earlier_records(model: nn.Module) -> list[dict[str, Any]]:
    """The records of every compile that produced ``model``, oldest first."""
    record = getattr(model, RECORD, None)
    if record is None:
        return []
    own = {k: v for k, v in record.items() if k != "previous"}
    return [*record.get("previous", []), copy.deepcopy(own)]


def report(model: nn.Module) -> CompileReport:
    """The report of the :func:`compile` call that produced ``model``."""
    found = getattr(model, REPORT, None)
    if not isinstance(found, CompileReport):
        raise InputError("this model was not produced by graphprune.compile (no report)")
    return found


def _plan_data(plan: Plan) -> dict[str, Any]:
    if callable(plan.importance):
        data = dataclasses.asdict(dataclasses.replace(plan, importance="l2"))
        data["importance"] = getattr(plan.importance, "__name__", "callable")
        return data
    return plan.to_dict()


def _rank_blocks(model: nn.Module, blocks: list[str], plan: Plan, batches: list[Any]) -> list[str]:
    """Blocks in the order they should be dropped: least contribution (or random) first."""
    if plan.importance == "random":
        order = np.random.default_rng(plan.seed).permutation(len(blocks))
        return [blocks[i] for i in order]
    contributions = block_contributions(model, blocks, batches)
    return sorted(blocks, key=lambda b: (contributions[b], blocks.index(b)))


Trial = Callable[[float], tuple[list[Pass], dict[int, list[int]]]]


def _choose(
    plan: Plan, trial: Trial, model: nn.Module, example_inputs: Any, setup: _Setup
) -> tuple[list[Pass], dict[int, list[int]]]:
    """The passes for ``plan.ratio``, or the smallest ratio that meets ``plan.target_macs``."""
    if plan.target_macs is None:
        return trial(plan.ratio or 0.0)

    def macs_ratio(ratio: float) -> float:
        passes, kept = trial(ratio)
        copy_ = copy.deepcopy(model)
        ctx = PassContext(copy_, example_inputs, setup.captured, setup.dg, kept, setup.int_uses)
        PassManager(passes)(ctx)
        return count_macs(copy_, example_inputs) / max(setup.macs_before, 1)

    lo, hi = 0.0, 0.95
    if macs_ratio(hi) > plan.target_macs:
        raise PlanError(
            f"target_macs={plan.target_macs} is out of reach: removing 95% of "
            f"what the plan may prune keeps {macs_ratio(hi):.3f} of the MACs"
        )
    for _ in range(12):
        mid = (lo + hi) / 2
        if macs_ratio(mid) <= plan.target_macs:
            hi = mid
        else:
            lo = mid
    return trial(hi)

"""graphprune.compile: capture -> analyze -> score -> resolve -> passes -> verify."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from graphprune import structured
from graphprune.capture import ExampleInputs
from graphprune.checks import check_model
from graphprune.errors import InputError
from graphprune.hf import no_cache, sync_config
from graphprune.importance import LossFn
from graphprune.macs import count_macs, count_params
from graphprune.plan import Plan
from graphprune.reconstruct import refit_consumers, sparsegpt
from graphprune.report import (
    RECORD,
    REPORT,
    CompileReport,
    FrozenGroup,
    GroupOutcome,
    LayerFit,
    LayerSparsity,
    UnitReport,
)
from graphprune.resolve import Resolution
from graphprune.sparsity.masks import compute_masks
from graphprune.sparsity.parametrize import apply_masks

# 2: resolutions carry per-unit outcomes and attribute values (1: groups only; still loadable)
RECORD_FORMAT = 2


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


def compile(
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    *,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    inplace: bool = False,
    strict: bool = False,
) -> nn.Module:
    """Prune ``model`` as ``plan`` says; return a module of the same class.

    Structured plans (channels, heads, layers) make the model smaller and dense. Sparse plans
    (unstructured, n:m, block; or ``plan.sparsity`` after a structured one) mask weights with
    ``torch.nn.utils.parametrize`` so fine-tuning keeps them zero; :func:`graphprune.finalize`
    bakes the masks, :func:`graphprune.sparsify` runs them on sparse kernels where faster.

    Works on a deep copy unless ``inplace=True``; the result keeps the input's train/eval
    mode and is an ordinary module (trainable, saveable with :func:`graphprune.save`).
    ``calibration`` batches (defaults to the example inputs) feed the data-driven criteria
    (taylor, fisher, wanda), reconstruction (``Plan(reconstruct=True)``) and the layer
    contributions; ``loss_fn(output)`` defaults to the mean
    squared output (``loss_fn(output, target)`` for :class:`graphprune.LabelledBatch` batches).
    :func:`graphprune.report` returns what was done.

    What cannot be pruned safely -- a size the forward computes in a way that cannot follow
    the kept channels, a rewrite that does not run -- is frozen with its reason (in the
    report) and the rest is pruned; compile raises only when nothing is left to prune.
    ``strict=True`` raises on the first such failure instead (for debugging).
    """
    if not isinstance(plan, Plan):
        raise InputError(f"plan must be a graphprune.Plan, not {type(plan).__name__}")
    check_model(model, example_inputs)
    if plan.targets_latency:
        return _compile_to_latency(
            model, plan, example_inputs, calibration, loss_fn, inplace=inplace, strict=strict
        )
    watch = Stopwatch()
    target = model if inplace else copy.deepcopy(model)
    with no_cache(target), no_cache(model):  # HF models: a KV cache output cannot be captured
        return _compile_into(
            target, model, plan, example_inputs, calibration, loss_fn, watch, inplace, strict
        )


def _compile_into(
    target: nn.Module,
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    calibration: Iterable[Any] | None,
    loss_fn: LossFn | None,
    watch: Stopwatch,
    inplace: bool,
    strict: bool,
) -> nn.Module:
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
    frozen: list[FrozenGroup] = []
    notes: list[str] = []
    fits: list[LayerFit] = []
    reconstruct = plan.reconstruct or (plan.sparsity is not None and plan.sparsity.reconstruct)
    if reconstruct and calibration is None:
        notes.append(
            "reconstruct=True without calibration= fits the layers to the example inputs "
            "only; pass batches of real data"
        )
    # the original's layer outputs are the refit's targets (inplace rewrites the model itself)
    original = copy.deepcopy(model) if inplace and plan.reconstruct else model
    if not plan.is_sparse:
        watch.restart()
        # the user's model is only read (trials rewrite copies; inplace replays at the end)
        setup = structured.setup(model, example_inputs, macs_before, watch.lap)
        if plan.granularity == "layers":
            outcome = structured.prune_layers(target, plan, setup, batches, watch.lap)
        else:
            outcome = structured.prune_channels(
                target, plan, setup, batches, loss_fn, watch.lap, inplace=inplace, strict=strict
            )
        target = outcome.model
        changes, dropped = outcome.ctx.changes, outcome.ctx.dropped
        resolution = outcome.resolution
        outcomes = [
            GroupOutcome(
                g.id, g.name, g.kind, len(resolution.kept.get(g.id, range(g.size))), g.size
            )
            for g in outcome.groups
        ]
        group_sizes = [g.size for g in setup.dg.groups]
        notes += setup.notes() + outcome.notes
        if plan.reconstruct and resolution.changed:
            fits = _refit(original, target, setup, resolution, batches)
            watch.lap("reconstruct")
        frozen = [
            FrozenGroup(g, setup.dg.group(g).name, setup.dg.group(g).size, why)
            for g, why in sorted(resolution.frozen.items())
        ]
    masked: list[LayerSparsity] = []
    sparse = plan.sparse_plan
    if sparse is not None:
        watch.restart()
        masks = compute_masks(target, sparse, batches=batches, loss_fn=loss_fn)
        if reconstruct:  # the plan's or its sparsity plan's flag: SparseGPT
            chosen, sparse_fits = sparsegpt(
                target,
                {name: m.mask for name, m in masks.layers.items()},
                batches,
                adaptive=sparse.granularity if sparse.granularity != "block" else None,
                nm=(sparse.nm[0], sparse.nm[1]),
            )
            for name, mask in chosen.items():
                masks.layers[name].mask = mask
            fits += sparse_fits
        apply_masks(target, masks)
        masked = [
            LayerSparsity(name, m.pattern, list(m.mask.shape), m.sparsity)
            for name, m in masks.layers.items()
        ] + [LayerSparsity(name, "dense", [], 0.0, why) for name, why in masks.skipped.items()]
        changes += [
            f"{n}: {m.pattern} mask, {m.sparsity:.1%} zeros" for n, m in masks.layers.items()
        ]
        watch.lap("masks")

    # HF: the config (and module attributes no forward reads) follow the weights
    synced = sync_config(target, getattr(model, "config", None), example_inputs)
    if synced is not None:
        changes += [f"config.{k} = {v}" for k, v in synced.changes.items()] + synced.attributes
    report = CompileReport(
        plan=_plan_data(plan),
        params_before=params_before,
        params_after=count_params(target),
        macs_before=macs_before,
        macs_after=count_macs(target, example_inputs),  # masks keep the dense MACs
        groups=outcomes,
        units=[UnitReport(**vars(u)) for u in resolution.units],
        frozen=frozen,
        notes=notes,
        changes=changes,
        dropped=dropped,
        seconds=watch.seconds,
        resolution=resolution.to_dict(),
        sparsity=masked,
        config=synced.to_dict() if synced is not None else {},
        reconstruction=fits,
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
    return target


def _compile_to_latency(
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    calibration: Iterable[Any] | None,
    loss_fn: LossFn | None,
    *,
    inplace: bool,
    strict: bool,
) -> nn.Module:
    """``Plan(target_latency=...)``: per-unit widths from latency tables, measured and
    corrected (:mod:`graphprune.latency_plan`); the report keeps the user's plan and says
    what was predicted and measured."""
    from graphprune.latency_plan import compile_to_latency

    batches = list(calibration) if calibration is not None else None

    def compile_copy(m: nn.Module, p: Plan, x: ExampleInputs, **kw: Any) -> nn.Module:
        return compile(m, p, x, strict=strict, **kw)

    pruned, concrete, outcome = compile_to_latency(
        model, plan, example_inputs, compile_copy, calibration=batches, loss_fn=loss_fn
    )
    if inplace:  # the rounds ran on copies: rewrite the user's model with the chosen plan
        pruned = compile(
            model, concrete, example_inputs, calibration=batches, loss_fn=loss_fn, inplace=True
        )
    found = report(pruned)
    found.plan = _plan_data(plan)
    found.latency = outcome.to_dict()
    return pruned


def _refit(
    original: nn.Module,
    pruned: nn.Module,
    setup: structured.Setup,
    resolution: Resolution,
    batches: list[Any],
) -> list[LayerFit]:
    """Least-squares refit of the layers whose inputs were pruned and of the BatchNorms."""
    dims = set(setup.dg.member_dims())
    kept: dict[int, Iterable[int]] = dict(resolution.kept)

    def output_index(name: str) -> torch.Tensor | None:
        fqn = f"{name}.weight"
        if (fqn, 0) not in dims:
            return None
        return torch.as_tensor(setup.dg.kept_positions(fqn, 0, kept))

    return refit_consumers(original, pruned, output_index, batches)


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

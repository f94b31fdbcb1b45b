"""``graphprune.Pruner``: prune to a target in steps, fine-tuning in between.

Each step prunes the current model a little further (:func:`graphprune.compile` for channels,
heads, layers; an in-place mask update for unstructured and block sparsity) so that after step
k the fraction removed -- of the *original* model -- is the schedule's k-th value. With a local
channel or head plan every group ends at exactly the kept count a one-shot compile would give.
Between steps the user's ``finetune(model, step)`` (or their own loop, iterating the pruner)
trains the model; a structured step returns a new, smaller module, so build the optimizer in
the loop. The model is a plain ``nn.Module`` throughout (DistributedDataParallel works on it).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graphprune.analysis import analyze_captured
from graphprune.analysis.cache import analysed
from graphprune.analysis.macs import count_macs, count_params
from graphprune.capture import ExampleInputs, LabelledBatch
from graphprune.compile import compile
from graphprune.finetune.schedule import schedule_ratios
from graphprune.oneshot.reconstruct import sparsegpt
from graphprune.passes.drop_layers import droppable_blocks
from graphprune.planning.importance import LossFn
from graphprune.planning.masks import compute_masks
from graphprune.planning.plan import Plan, PlanError
from graphprune.planning.resolve import candidate_groups, unit_keep
from graphprune.planning.units import Unit, pruning_units
from graphprune.progress import track
from graphprune.sparsity.parametrize import masked_fraction, masked_layers, update_masks
from graphprune.stages.latency import measure_ratio

FineTune = Callable[[nn.Module, int], dict[str, float] | None]


@dataclass
class StepRecord:
    """What one step did: the schedule value, what remained, and the user's metrics."""

    step: int
    ratio: float  # fraction removed from the original (channels, heads, blocks or weights)
    params: int
    macs: int
    weight_sparsity: float  # zeros among masked weights (sparse plans)
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class Pruner:
    """Prune ``model`` as ``plan`` says in ``steps`` steps following ``schedule``.

    ``calibration``: batches for data-driven importance (taylor, fisher, wanda), layer
    contributions and reconstruction (``Plan(reconstruct=True)``: every step refits, sparse
    steps after the first run SparseGPT with that step's nested masks) -- the first
    ``calibration_batches`` are used at each step. With a
    ``loss_fn`` that takes ``(output, target)``, ``(inputs, target)`` pairs (a DataLoader's
    batches) are used as labelled batches (``labelled=None`` detects them; True/False forces).
    """

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        example_inputs: ExampleInputs,
        *,
        steps: int = 1,
        schedule: str = "cubic",
        calibration: Iterable[Any] | None = None,
        calibration_batches: int = 8,
        loss_fn: LossFn | None = None,
        labelled: bool | None = None,
        progress: bool = True,
    ) -> None:
        if plan.sparsity is not None:
            raise PlanError(
                "a Pruner schedules one kind of pruning: run one for the structured plan, "
                "then one for its sparsity plan"
            )
        if plan.granularity == "n:m" and steps > 1:
            raise PlanError("an n:m pattern is applied in one step: use steps=1")
        self.plan, self.example_inputs = plan, example_inputs
        self.loss_fn, self.progress = loss_fn, progress
        self.model = model
        self.history: list[StepRecord] = []
        self._batches = _calibration(calibration, calibration_batches, loss_fn, labelled, progress)
        self._macs0 = count_macs(model, example_inputs)
        target = plan.ratio if plan.target_macs is None else 1.0 - plan.target_macs
        self._latency_ms0 = 0.0
        if plan.targets_latency:  # steps keep a scheduled share of the original's latency
            _, self._latency_ms0 = measure_ratio(
                model, model, example_inputs, plan.latency_threads, runtime=plan.latency_runtime
            )
            keep = plan.target_latency or (plan.target_latency_ms or 0.0) / self._latency_ms0
            target = 1.0 - keep
        self._measured: tuple[nn.Module, float] = (model, self._latency_ms0)
        self.ratios = schedule_ratios(target or 0.0, steps, schedule)
        self._units0 = self._units(model) if self._exact_groups else {}
        self._blocks0 = (
            len(residual_blocks_of(model, example_inputs)) if plan.granularity == "layers" else 0
        )

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StepRecord]:
        """Prune step by step; after each, ``self.model`` is the current model to train."""
        for step, ratio in enumerate(track(self.ratios, "pruning steps", self.progress)):
            start = time.perf_counter()
            self.model = self._prune_to(step, ratio)
            record = StepRecord(
                step,
                ratio,
                count_params(self.model),
                count_macs(self.model, self.example_inputs),
                masked_fraction(self.model),
                time.perf_counter() - start,
            )
            self.history.append(record)
            yield record

    def run(self, finetune: FineTune | None = None) -> nn.Module:
        """All steps, calling ``finetune(model, step)`` after each (its returned metrics are
        kept in ``history``). Returns the final model."""
        for record in self:
            if finetune is not None:
                record.metrics.update(finetune(self.model, record.step) or {})
        return self.model

    # -- one step ---------------------------------------------------------------------------
    @property
    def _exact_groups(self) -> bool:
        p = self.plan
        return p.granularity in ("channels", "heads") and p.scope == "local" and p.ratio is not None

    def _compile(self, plan: Plan) -> nn.Module:
        return compile(
            self.model,
            plan,
            self.example_inputs,
            calibration=self._batches or None,
            loss_fn=self.loss_fn,
        )

    def _current_latency_ms(self) -> float:
        """The current model's latency; measured once per model (a step that found its budget
        met keeps the model, and the first step's model is the original, timed at the start:
        timing it again would only add noise)."""
        model, ms = self._measured
        if model is not self.model:
            plan = self.plan
            _, ms = measure_ratio(
                self.model, self.model, self.example_inputs, plan.latency_threads,
                runtime=plan.latency_runtime,
            )  # fmt: skip
            self._measured = (self.model, ms)
        return ms

    def _prune_to(self, step: int, ratio: float) -> nn.Module:
        plan = self.plan
        if plan.is_sparse:
            return self._mask_to(step, ratio)
        if plan.targets_latency:  # this step's share of the original latency, as a fraction
            budget = (1.0 - ratio) * self._latency_ms0  # of the current model's
            current = self._current_latency_ms()
            if budget >= 0.98 * current:
                return self.model  # the schedule's step is met already
            return self._compile(
                dataclasses.replace(plan, target_latency=budget / current, target_latency_ms=None)
            )
        if plan.target_macs is not None:
            keep = (1.0 - ratio) * self._macs0 / max(count_macs(self.model, self.example_inputs), 1)
            return self._compile(dataclasses.replace(plan, target_macs=min(1.0, keep)))
        if plan.granularity == "layers":
            left = len(residual_blocks_of(self.model, self.example_inputs))
            drop = int(ratio * self._blocks0 + 1e-9) - (self._blocks0 - left)
            return self._compile(dataclasses.replace(plan, ratio=drop / max(left, 1)))
        if not self._exact_groups:  # global scope: the same fraction of what is left
            done = self.ratios[step - 1] if step else 0.0
            relative = 1.0 - (1.0 - ratio) / (1.0 - done)
            return self._compile(dataclasses.replace(plan, ratio=max(relative, 0.0)))
        # local: each unit (layer) keeps exactly what a one-shot compile at this ratio keeps
        progress = ratio / plan.ratio if plan.ratio else 0.0
        overrides: dict[str, float] = {}
        for name, unit in self._units(self.model).items():
            first = self._units0.get(name, unit)
            if plan.ignores(first.names):
                continue
            keep = unit_keep(first, plan.ratio_for(first.names, first.name) * progress, plan)
            overrides[name] = max(0.0, (unit.size - keep) / unit.size)
        return self._compile(dataclasses.replace(plan, ratio=0.0, overrides=overrides))

    def _mask_to(self, step: int, ratio: float) -> nn.Module:
        plan = dataclasses.replace(self.plan, ratio=ratio)
        if step == 0 or not masked_layers(self.model):
            return self._compile(plan)
        masks = compute_masks(
            self.model,
            plan,
            batches=self._batches,
            loss_fn=self.loss_fn,
            previous=masked_layers(self.model),
        )
        if plan.reconstruct:  # SparseGPT updates with this step's masks (each a subset of the last)
            kept, _ = sparsegpt(
                self.model,
                {name: m.mask for name, m in masks.layers.items()},
                self._batches or [self.example_inputs],
                adaptive=None,
                progress=self.progress,
            )
            for name, mask in kept.items():
                masks.layers[name].mask = mask
        update_masks(self.model, masks)
        return self.model

    def _units(self, model: nn.Module) -> dict[str, Unit]:
        """The pruning units of the plan's groups by name (stable across steps)."""
        dg = analysed(model, self.example_inputs, analyze_captured).dg  # compile reuses it
        modules = dict(model.named_modules())
        plan = self.plan
        groups = candidate_groups(dg, plan, model)
        units = pruning_units(dg, groups, modules, plan.ratio or 0.5, plan.channel_multiple)
        return {u.name: u for u in units.units}


def residual_blocks_of(model: nn.Module, example_inputs: ExampleInputs) -> list[str]:
    """The blocks compile's granularity='layers' chooses from (the same function)."""
    captured = analysed(model, example_inputs, analyze_captured).captured
    return droppable_blocks(model, captured, example_inputs)


def _calibration(
    batches: Iterable[Any] | None,
    limit: int,
    loss_fn: LossFn | None,
    labelled: bool | None,
    progress: bool,
) -> list[Any]:
    if batches is None:
        return []
    taken = list(track(itertools.islice(batches, limit), "calibration batches", progress, limit))
    pairs = all(isinstance(b, Sequence) and len(b) == 2 for b in taken)
    if labelled or (labelled is None and loss_fn is not None and pairs and taken):
        return [LabelledBatch(b[0], b[1]) for b in taken]
    return taken

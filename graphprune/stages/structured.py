"""The structured stage: channels, heads or layers removed, then (``reconstruct=True``) the
layers whose inputs were pruned refit to the original's outputs.

The work is :mod:`graphprune.stages.freeze_retry`'s (capture, analysis, resolution, rewrite
and verify, freeze and retry); this stage turns its outcome into the report's parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphprune.analysis.observe import Observed
from graphprune.capture import copy_model
from graphprune.oneshot.reconstruct import LayerFit, refit_consumers
from graphprune.planning.resolve import Resolution
from graphprune.report import FrozenGroup, GroupOutcome
from graphprune.stages import freeze_retry
from graphprune.stages.context import CompileJob


@dataclass
class StructuredResult:
    """What the structured stage did (all empty for a sparse-only plan)."""

    model: nn.Module
    resolution: Resolution = field(default_factory=Resolution)
    groups: list[GroupOutcome] = field(default_factory=list)  # the plan's groups: kept / total
    group_sizes: list[int] = field(default_factory=list)  # every group: the record's check
    frozen: list[FrozenGroup] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fits: list[LayerFit] = field(default_factory=list)
    macs: int | None = None  # of the pruned model, counted by its verification (None: not run)


def prune_structure(job: CompileJob, target: nn.Module, observed: Observed) -> StructuredResult:
    """Prune ``target`` (the user's model when ``inplace``, else a copy) as the plan says.
    ``observed``: the check's forward of the user's model."""
    plan = job.plan
    if plan.is_sparse:
        return StructuredResult(target)
    # the original's layer outputs are the refit's targets (inplace rewrites the model itself)
    original = copy_model(job.model) if job.inplace and plan.reconstruct else job.model
    job.watch.restart()
    # the user's model is only read (trials rewrite copies; inplace replays at the end)
    setup = freeze_retry.setup(
        job.model, job.example_inputs, observed, job.watch.lap, keep=not job.inplace,
    )  # fmt: skip
    if plan.granularity == "layers":
        outcome = freeze_retry.prune_layers(target, plan, setup, job.batches, job.watch.lap)
    else:
        outcome = freeze_retry.prune_channels(
            target, plan, setup, job.batches, job.loss_fn, job.watch.lap,
            inplace=job.inplace, strict=job.strict,
        )  # fmt: skip
    resolution, dg = outcome.resolution, setup.dg
    fits: list[LayerFit] = []
    if plan.reconstruct and resolution.changed:
        fits = _refit(original, outcome.model, setup, resolution, job.batches)
        job.watch.lap("reconstruct")
    return StructuredResult(
        model=outcome.model,
        resolution=resolution,
        groups=[
            GroupOutcome(g.id, g.name, g.kind, _kept(resolution, g.id, g.size), g.size)
            for g in outcome.groups
        ],
        group_sizes=[g.size for g in dg.groups],
        frozen=[
            FrozenGroup(g, dg.group(g).name, dg.group(g).size, why)
            for g, why in sorted(resolution.frozen.items())
        ],
        changes=outcome.ctx.changes,
        dropped=outcome.ctx.dropped,
        notes=setup.notes() + outcome.notes,
        fits=fits,
        macs=outcome.ctx.macs,
    )


def _kept(resolution: Resolution, group: int, size: int) -> int:
    return len(resolution.kept.get(group, range(size)))


def _refit(
    original: nn.Module,
    pruned: nn.Module,
    setup: freeze_retry.Setup,
    resolution: Resolution,
    batches: list[Any],
) -> list[LayerFit]:
    """Least-squares refit of the layers whose inputs were pruned and of the BatchNorms."""
    return refit_consumers(original, pruned, kept_outputs(setup, resolution), batches)


def kept_outputs(
    setup: freeze_retry.Setup, resolution: Resolution
) -> Callable[[str], torch.Tensor | None]:
    """Per layer name: the original output channels it keeps (None: all of them)."""
    dims = set(setup.dg.member_dims())
    kept: dict[int, Iterable[int]] = dict(resolution.kept)

    def output_index(name: str) -> torch.Tensor | None:
        fqn = f"{name}.weight"
        if (fqn, 0) not in dims:
            return None
        return torch.as_tensor(setup.dg.kept_positions(fqn, 0, kept))

    return output_index

"""The sparse stage: weights masked by a sparse plan (or the sparsity plan after a structured
one), SparseGPT when asked, masks kept by ``torch.nn.utils.parametrize`` so fine-tuning keeps
them zero; and :func:`finalize`, which bakes them in."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from graphprune.oneshot.reconstruct import LayerFit, sparsegpt
from graphprune.planning.masks import compute_masks
from graphprune.record import record_of
from graphprune.report import LayerSparsity
from graphprune.sparsity.parametrize import apply_masks, bake_masks
from graphprune.stages.context import CompileJob


@dataclass
class SparseResult:
    """The layers masked (and those left dense, with why), in report form."""

    layers: list[LayerSparsity] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    fits: list[LayerFit] = field(default_factory=list)

    @property
    def masked(self) -> list[str]:
        return [m.module for m in self.layers if m.pattern != "dense"]


def mask_weights(job: CompileJob, target: nn.Module) -> SparseResult:
    """Mask ``target``'s weights in place as the plan's sparse part says."""
    sparse = job.plan.sparse_plan
    if sparse is None:
        return SparseResult()
    job.watch.restart()
    masks = compute_masks(target, sparse, batches=job.batches, loss_fn=job.loss_fn)
    fits: list[LayerFit] = []
    if job.reconstructs:  # SparseGPT chooses the masks and updates the weights
        chosen, fits = sparsegpt(
            target,
            {name: m.mask for name, m in masks.layers.items()},
            job.batches,
            adaptive=sparse.granularity if sparse.granularity != "block" else None,
            nm=(sparse.nm[0], sparse.nm[1]),
        )
        for name, mask in chosen.items():
            masks.layers[name].mask = mask
    apply_masks(target, masks)
    job.watch.lap("masks")
    return SparseResult(
        layers=[
            LayerSparsity(name, m.pattern, list(m.mask.shape), m.sparsity)
            for name, m in masks.layers.items()
        ]
        + [LayerSparsity(name, "dense", [], 0.0, why) for name, why in masks.skipped.items()],
        changes=[f"{n}: {m.pattern} mask, {m.sparsity:.1%} zeros" for n, m in masks.layers.items()],
        fits=fits,
    )


def finalize(model: nn.Module) -> nn.Module:
    """Bake the masks in: plain ``weight`` parameters with exact zeros, no parametrization.

    In place; returns ``model``. Call it after fine-tuning, before export or sparse kernels.
    """
    bake_masks(model)
    record = record_of(model)
    if record is not None and record.sparsity.layers:
        record.sparsity.baked = True
    return model

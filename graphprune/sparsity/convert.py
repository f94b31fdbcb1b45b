"""``graphprune.sparsify``: run mostly-zero layers on sparse kernels where measured faster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.capture import (
    ExampleInputs,
    copy_model,
    normalize_inputs,
    output_tensors,
    own_thread,
    serialized,
)
from graphprune.errors import InputError
from graphprune.passes.base import PassContext, PassManager, PruneError
from graphprune.passes.sparsify import Sparsify, SparsifyReport, matrix_of
from graphprune.sparsity.parametrize import bake_masks, is_masked

SPARSIFY_REPORT = "_graphprune_sparsify"


def with_batch(example_inputs: ExampleInputs, batch: int) -> Any:
    """The example inputs with every tensor's leading (batch) dim resized to ``batch``."""
    args, kwargs = normalize_inputs(example_inputs)

    def resize(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        reps = -(-batch // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch]

    if kwargs:
        return {k: resize(v) for k, v in kwargs.items()}
    return tuple(resize(a) for a in args)


def layer_rows(
    model: nn.Module, example_inputs: ExampleInputs, batch_sizes: Sequence[int]
) -> dict[str, list[int]]:
    """FQN -> rows each Linear / 1x1 conv multiplies, one entry per batch size (forward hooks)."""
    rows: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if matrix_of(module) is None:
            continue

        def hook(mod: nn.Module, inputs: tuple[Any, ...], _out: Any, name: str = name) -> None:
            x = inputs[0]  # Linear: (..., in) -> rows = prod(...); conv: (N, C, H, W) -> N*H*W
            r = x.numel() // x.shape[-1] if isinstance(mod, nn.Linear) else x.numel() // x.shape[1]
            rows.setdefault(name, []).append(int(r))

        handles.append(module.register_forward_hook(own_thread(hook)))
    try:
        with torch.no_grad():
            for b in batch_sizes:
                args, kwargs = normalize_inputs(with_batch(example_inputs, b))
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: sorted(set(r)) for n, r in rows.items()}


@serialized
def sparsify(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    batch_sizes: Sequence[int] | None = None,
    min_speedup: float = 1.1,
    min_sparsity: float = 0.5,
    layers: Sequence[str] | None = None,
    force: dict[str, str] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Swap layers for sparse-kernel modules where that is measured to be faster.

    Masks are baked first (:func:`graphprune.finalize`). Each Linear / 1x1 conv with at least
    ``min_sparsity`` zeros is timed dense vs CSR (and BSR for block masks; 2:4 on CUDA) at the
    rows it sees for every batch size in ``batch_sizes`` (default: the example batch); it is
    converted when a layout is ``min_speedup`` x faster at all of them. ``layers`` (FQN globs)
    limits the candidates; ``force`` maps FQN -> layout to skip measuring. The result is checked
    against the dense model on the example inputs; :func:`sparsify_report` says what was done.
    The converted modules are for inference (their weights are buffers).
    """
    target = model if inplace else copy_model(model)
    if is_masked(target):
        bake_masks(target)
    first = normalize_inputs(example_inputs)
    tensors = [t for t in (*first[0], *first[1].values()) if isinstance(t, Tensor)]
    if not tensors:
        raise InputError("sparsify needs example inputs with at least one tensor")
    sizes = list(batch_sizes or [int(tensors[0].shape[0])])
    if force:
        names = dict(target.named_modules())
        for name in force:
            if name not in names or matrix_of(names[name]) is None:
                raise InputError(f"force: {name!r} is not a Linear or 1x1 conv of the model")
    reference = output_tensors(target, example_inputs)
    sparsify_pass = Sparsify(
        layer_rows(target, example_inputs, sizes),
        min_speedup=min_speedup,
        min_sparsity=min_sparsity,
        layers=layers,
        force=force,
    )
    ctx = PassContext(target, example_inputs, None, None)  # no graph: the pass swaps modules

    def verify(ctx: PassContext) -> None:
        got = output_tensors(ctx.model, example_inputs)
        err = max(float((a - b).abs().max()) for a, b in zip(got, reference, strict=True))
        scale = max(float(r.abs().max()) for r in reference)
        sparsify_pass.report.max_abs_error = err
        if err > 1e-5 + 1e-4 * scale:
            raise PruneError(
                f"sparse kernels changed the outputs by {err:.3e} (output scale {scale:.3e}); "
                "this is a bug: please report it with the model"
            )

    PassManager([sparsify_pass], verify=verify)(ctx)
    object.__setattr__(target, SPARSIFY_REPORT, sparsify_pass.report)
    return target


def sparsify_report(model: nn.Module) -> SparsifyReport:
    """What :func:`sparsify` converted, with the measured kernel times."""
    found = getattr(model, SPARSIFY_REPORT, None)
    if not isinstance(found, SparsifyReport):
        raise InputError("this model was not produced by graphprune.sparsify (no report)")
    return found

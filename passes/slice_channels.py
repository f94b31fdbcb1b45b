"""slice_channels: physically remove the channels a resolution drops.

Every (parameter/buffer, dim) member of a changed group keeps the positions whose channels all
survive (``DependencyGraph.kept_positions``): weights, biases, running stats, norm affine
parameters, embeddings, standalone parameters. Tied tensors are sliced once and stay tied.
The module attributes that describe the tensors follow in the next passes of the sequence
(:mod:`module_attributes`, then :mod:`shape_attributes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from graphprune.analysis import DependencyGraph
from graphprune.passes.base import PassContext, PassResult
from graphprune.passes.tensors import Cut, cut, get_tensor, replace_tensor, select


def slice_plan(
    dg: DependencyGraph, kept: Mapping[int, Iterable[int]]
) -> dict[str, dict[int, np.ndarray]]:
    """Per tensor FQN: the positions kept along each dim that loses some (the slicing this
    pass does, and compile_checkpoint does on the stored tensors)."""
    plans: dict[str, dict[int, np.ndarray]] = {}
    for fqn, dim in dg.member_dims():
        index = dg.kept_positions(fqn, dim, kept)
        if len(index) < len(dg.position_channels(fqn, dim)):
            plans.setdefault(fqn, {})[dim] = index
    return plans


@dataclass
class SliceChannels:
    name: str = "slice_channels"

    def __call__(self, ctx: PassContext) -> PassResult:
        if not ctx.prunes:
            return PassResult(modified=False)
        plans = slice_plan(ctx.dg, ctx.kept)
        done: set[str] = set()
        for fqn, dims in _largest_first(ctx, plans):
            aliases = ctx.captured.aliases.get(fqn, [fqn])
            if done.intersection(aliases):  # tied tensors: sliced once through one name
                continue
            done.update(aliases)
            original = tensor = get_tensor(ctx.model, fqn)
            cuts: list[Cut] = []
            for dim, index in sorted(dims.items()):
                if ctx.undo is None:
                    tensor = select(tensor, dim, index.tolist())
                else:  # in place: the undo keeps what is cut away, not the whole original
                    tensor, taken = cut(tensor, dim, index.tolist())
                    cuts.append(taken)
            if ctx.undo is not None:
                ctx.undo.sliced(original, cuts, tensor.shape)
            replace_tensor(ctx.model, aliases, tensor)
        return PassResult(True)


def _largest_first(
    ctx: PassContext, plans: dict[str, dict[int, np.ndarray]]
) -> list[tuple[str, dict[int, np.ndarray]]]:
    """The largest tensors first: each is sliced while the allocator holds no freed space
    of the smaller ones yet (in place, the peak is the model plus the largest tensor)."""
    return sorted(plans.items(), key=lambda item: -get_tensor(ctx.model, item[0]).numel())

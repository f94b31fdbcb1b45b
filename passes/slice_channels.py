"""slice_channels: physically remove the channels a resolution drops.

Every (parameter/buffer, dim) member of a changed group keeps the positions whose channels all
survive (``DependencyGraph.kept_positions``): weights, biases, running stats, norm affine
parameters, embeddings, standalone parameters. Tied tensors are sliced once and stay tied.
The module attributes that describe the tensors follow in the next passes of the sequence
(:mod:`module_attributes`, then :mod:`shape_attributes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.passes.base import PassContext, PassResult
from graphprune.passes.tensors import get_tensor, replace_tensor, select


@dataclass
class SliceChannels:
    name: str = "slice_channels"

    def __call__(self, ctx: PassContext) -> PassResult:
        if not ctx.prunes:
            return PassResult(modified=False)
        plans: dict[str, dict[int, list[int]]] = {}
        for fqn, dim in ctx.dg.member_dims():
            index = ctx.dg.kept_positions(fqn, dim, ctx.kept)
            if len(index) < len(ctx.dg.position_channels(fqn, dim)):
                plans.setdefault(fqn, {})[dim] = index.tolist()
        done: set[str] = set()
        for fqn, dims in plans.items():
            aliases = ctx.captured.aliases.get(fqn, [fqn])
            if done.intersection(aliases):  # tied tensors: sliced once through one name
                continue
            done.update(aliases)
            tensor = get_tensor(ctx.model, fqn)
            for dim, index in sorted(dims.items()):
                tensor = select(tensor, dim, index)
            replace_tensor(ctx.model, aliases, tensor)
        return PassResult(True)

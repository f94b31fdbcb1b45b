"""slice_channels: physically remove the channels a resolution drops.

1. Every (parameter/buffer, dim) member of a changed group keeps the positions whose channels
   all survive (``DependencyGraph.kept_positions``): weights, biases, running stats, norm
   affine parameters, embeddings, standalone parameters. Tied tensors are sliced once and stay
   tied.
2. Module attributes follow the tensors (in/out_channels, groups, num_features,
   normalized_shape, num_heads, ...; see :mod:`module_attributes`).
3. Int attributes that produce shape constants (``self.n_head``) get their new values (see
   :mod:`shape_attributes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.passes.base import PassContext, PassResult
from graphprune.passes.module_attributes import update_module_attributes
from graphprune.passes.shape_attributes import update_shape_attributes
from graphprune.passes.tensors import get_tensor, replace_tensor, select


@dataclass
class SliceChannels:
    name: str = "slice_channels"

    def __call__(self, ctx: PassContext) -> PassResult:
        sizes = {g.id: g.size for g in ctx.dg.groups}
        if not any(len(k) < sizes[g] for g, k in ctx.kept.items()):
            return PassResult(modified=False)
        plans: dict[str, dict[int, list[int]]] = {}
        for fqn, dim in ctx.dg.member_dims():
            index = ctx.dg.kept_positions(fqn, dim, ctx.kept)
            if len(index) < len(ctx.dg.position_channels(fqn, dim)):
                plans.setdefault(fqn, {})[dim] = index.tolist()
        removed = 0
        done: set[str] = set()
        for fqn, dims in plans.items():
            aliases = ctx.captured.aliases.get(fqn, [fqn])
            if done.intersection(aliases):  # tied tensors: sliced once through one name
                continue
            done.update(aliases)
            tensor = get_tensor(ctx.model, fqn)
            before = tensor.numel()
            for dim, index in sorted(dims.items()):
                tensor = select(tensor, dim, index)
            replace_tensor(ctx.model, aliases, tensor)
            removed += before - tensor.numel()
        update_module_attributes(ctx)
        update_shape_attributes(ctx)
        return PassResult(True, {"tensors_sliced": len(plans), "elements_removed": removed})

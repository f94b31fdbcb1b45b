"""prune_heads: remove whole attention heads (kv heads with their query heads under GQA).

Heads are channels of a ``heads``/``kv_heads`` group: slicing them removes each head's q, k, v
rows and output-projection columns together, and the module's head count follows (an
``nn.MultiheadAttention`` whose width no longer matches its input becomes a
``PrunedMultiheadAttention``). Head groups are what this pass prunes; another group changes
only when a count relation drives it (the resolution says which and why).
"""

from __future__ import annotations

from dataclasses import dataclass

from graphprune.passes.base import PassContext, PassResult, PruneError
from graphprune.passes.slice_channels import SliceChannels

HEAD_KINDS = {"heads", "kv_heads"}


@dataclass
class PruneHeads(SliceChannels):
    """SliceChannels for a heads plan: no attention may lose every head."""

    name: str = "prune_heads"

    def __call__(self, ctx: PassContext) -> PassResult:
        by_id = {g.id: g for g in ctx.dg.groups}
        for gid, kept in ctx.kept.items():
            group = by_id[gid]
            if len(kept) == group.size or group.kind not in HEAD_KINDS:
                continue
            if not kept:
                raise PruneError(f"group {gid} ({group.name}) would lose every head")
        return super().__call__(ctx)

"""Rewriting passes, one a file (installed as ``graphprune.passes``).

A structured rewrite is the sequence :func:`structured_rewrite` returns, run by one
:class:`~graphprune.passes.base.PassManager` and verified at its end.
"""

from __future__ import annotations

from graphprune.passes.base import Pass
from graphprune.passes.module_attributes import UpdateModuleAttributes
from graphprune.passes.prune_heads import PruneHeads
from graphprune.passes.shape_attributes import UpdateShapeAttributes
from graphprune.passes.slice_channels import SliceChannels


def structured_rewrite(heads: bool = False) -> list[Pass]:
    """Slice the tensors (whole heads for a heads plan), then the module attributes that
    describe them, then the int attributes behind shape constants."""
    first: Pass = PruneHeads() if heads else SliceChannels()
    return [first, UpdateModuleAttributes(), UpdateShapeAttributes()]


__all__ = ["structured_rewrite"]

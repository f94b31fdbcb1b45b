"""Rewriting passes, one a file (installed as ``graphprune.passes``).

A structured rewrite is the sequence :func:`structured_rewrite` returns, run by one
:class:`~graphprune.passes.base.PassManager` and verified at its end.
"""

from __future__ import annotations

from graphprune.passes.base import AttributePass, Pass
from graphprune.passes.module_attributes import update_module_attributes
from graphprune.passes.prune_heads import PruneHeads
from graphprune.passes.shape_attributes import update_shape_attributes
from graphprune.passes.slice_channels import SliceChannels


def structured_rewrite(heads: bool = False) -> list[Pass]:
    """Slice the tensors (whole heads for a heads plan), then the module attributes that
    describe them, then the int attributes behind shape constants."""
    first: Pass = PruneHeads() if heads else SliceChannels()
    return [
        first,
        AttributePass("module_attributes", update_module_attributes),
        AttributePass("shape_attributes", update_shape_attributes),
    ]


__all__ = ["structured_rewrite"]

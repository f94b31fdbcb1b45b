"""Lottery-ticket rewind: the pruned structure and masks, with an earlier checkpoint's weights.

Structured pruning is replayed on the early model from the pruned model's compile record(s):
every kept channel takes the early value of the same original position. Masks (unstructured,
n:m, block) are copied from the pruned model -- or, once finalized, read back from its zeros --
and applied to the early weights, which are then retrained with the mask in place.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.capture import ExampleInputs, copy_model, serialized
from graphprune.errors import InputError
from graphprune.planning.masks import LayerMask, MaskSet
from graphprune.record import CompileRecord, record_of
from graphprune.serialize import apply_record
from graphprune.sparsity.parametrize import apply_masks, masked_layers, update_masks


@serialized
def rewind(pruned: nn.Module, early: nn.Module, example_inputs: ExampleInputs) -> nn.Module:
    """A copy of ``early`` (the *unpruned* model at an earlier checkpoint) pruned exactly as
    ``pruned`` was: same kept channels, same masks. ``early`` itself is not changed."""
    record = record_of(pruned)
    if record is None:
        raise InputError("rewind needs a model produced by graphprune.compile (or a Pruner)")
    target = copy_model(early)
    apply_record(target, record, example_inputs)  # kept channels; placeholder masks if masked
    masks = _masks_of(pruned, record)
    if masks.layers:
        if masked_layers(target):
            update_masks(target, masks)
        else:
            apply_masks(target, masks)
    return target


def _masks_of(pruned: nn.Module, record: CompileRecord) -> MaskSet:
    live = masked_layers(pruned)
    if live:
        return MaskSet({n: LayerMask(n, "rewind", m.clone()) for n, m in live.items()})
    out = MaskSet()
    for name in record.sparsity.layers:  # finalized: the zeros are the mask
        weight = pruned.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        out.layers[name] = LayerMask(name, "rewind", weight.detach() != 0)
    return out

"""Masks applied with ``torch.nn.utils.parametrize``: pruned weights stay zero while training.

``module.weight`` becomes ``original * mask``. The gradient reaching ``original`` is masked too
(d(w·m)/dw = m), and whatever an optimizer does to the hidden original values (momentum,
weight decay), the weight the layer uses stays exactly zero where the mask is. The mask is a
bool buffer, so a checkpoint of a masked model holds its masks. While masked, the state_dict
keys of a layer are ``parametrizations.weight.original`` and ``parametrizations.weight.0.mask``
(torch's convention); :func:`finalize` bakes the masks in and brings back ``weight``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from graphprune.errors import InputError
from graphprune.kernels.sparse_modules import densify
from graphprune.modules import stored_weight, weight_of
from graphprune.planning.masks import MaskSet


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a bool ``mask`` buffer of w's shape."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    mask: Tensor

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def apply_masks(model: nn.Module, masks: MaskSet) -> None:
    """Parametrize every masked layer of ``model`` in place."""
    modules = dict(model.named_modules())
    for name, layer in masks.layers.items():
        module = modules[name]
        weight = weight_of(module)
        mask = layer.mask.to(weight.device)
        with torch.no_grad():  # also zero the hidden original, so rewinds and bakes agree
            weight.mul_(mask)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))


def update_masks(model: nn.Module, masks: MaskSet) -> None:
    """Replace the masks of already-masked layers (an iterative pruning step), in place."""
    current = _mask_modules(model)
    for name, layer in masks.layers.items():
        holder = current[name]
        holder.mask.copy_(layer.mask.to(holder.mask.device))
        original = stored_weight(model.get_submodule(name))
        with torch.no_grad():
            original.mul_(holder.mask)


def _mask_modules(model: nn.Module) -> dict[str, WeightMask]:
    out: dict[str, WeightMask] = {}
    for name, module in model.named_modules():
        plist = getattr(module, "parametrizations", {})
        for p in plist["weight"] if "weight" in plist else []:  # noqa: SIM401 (a ModuleDict)
            if isinstance(p, WeightMask):
                out[name] = p
    return out


def register_placeholder_masks(model: nn.Module, layers: list[str]) -> None:
    """All-ones masks on ``layers``, to be filled by ``load_state_dict`` (graphprune.load)."""
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise InputError(f"masked layer {name!r} is not in the model given to load()")
        weight = weight_of(modules[name])
        parametrize.register_parametrization(
            modules[name], "weight", WeightMask(torch.ones_like(weight, dtype=torch.bool))
        )


def masked_layers(model: nn.Module) -> dict[str, Tensor]:
    """FQN -> mask (True = kept) of every layer masked by graphprune."""
    return {name: holder.mask for name, holder in _mask_modules(model).items()}


def masked_fraction(model: nn.Module) -> float:
    """Zeroed fraction of all masked weights of ``model`` (0 when nothing is masked)."""
    masks = masked_layers(model).values()
    total = sum(m.numel() for m in masks)
    return 1.0 - sum(int(m.sum()) for m in masks) / total if total else 0.0


def bake_masks(model: nn.Module) -> nn.Module:
    """Bake the masks in: plain ``weight`` parameters with exact zeros, no parametrization.

    In place; returns ``model`` (:func:`graphprune.finalize` also marks its record).
    """
    for name, module in model.named_modules():
        plist = getattr(module, "parametrizations", {})
        if "weight" not in plist:
            continue
        if not all(isinstance(p, WeightMask) for p in plist["weight"]):
            raise InputError(
                f"{name}.weight has parametrizations other than graphprune's masks; "
                "remove those first (torch.nn.utils.parametrize.remove_parametrizations)"
            )
        _own_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its ``Parametrized*`` class.

    A deepcopy of a parametrized module shares that class with the original, and removing a
    parametrization deletes the property from the class: finalizing a copy would break the
    original (and vice versa). A private class confines the removal to this module.
    """
    cls = module.__class__
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with masks baked in and sparse-kernel layers dense again: what the
    exporter and the dense side of a measurement need (the original is not touched)."""
    return densify(bake_masks(copy.deepcopy(model)))


def is_masked(model: nn.Module) -> bool:
    return bool(masked_layers(model))

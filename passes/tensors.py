"""Reading and replacing parameters and buffers by FQN, keeping tied tensors tied."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


def owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, name = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), name


def get_tensor(model: nn.Module, fqn: str) -> Tensor:
    module, name = owner(model, fqn)
    value = getattr(module, name)
    assert isinstance(value, Tensor), f"{fqn} is not a tensor"
    return value


def replace_tensor(model: nn.Module, fqns: list[str], value: Tensor) -> None:
    """Put ``value`` at every FQN in ``fqns`` (aliases of one tensor stay one tensor).

    A parameter keeps its ``nn.Parameter`` object (its data is swapped, its stale gradient
    dropped): an optimizer built before an in-place compile still holds the model's
    parameters. Its per-parameter state (momentum, Adam moments) has the old shapes: build
    the optimizer again, or clear its state, before it takes a step with state.
    """
    module, name = owner(model, fqns[0])
    old = getattr(module, name)
    fresh = value.detach()
    if isinstance(old, Tensor) and _shares_storage(fresh, old):
        fresh = fresh.clone()  # a view of the old tensor would keep all of it alive
    new: Tensor
    if isinstance(old, nn.Parameter):
        old.data = fresh
        old.grad = None
        new = old
    else:
        new = fresh
    for fqn in fqns:
        module, name = owner(model, fqn)
        if name in module._parameters:
            module._parameters[name] = new  # type: ignore[assignment]
        elif name in module._buffers:
            module._buffers[name] = new
        else:
            setattr(module, name, new)


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    if a.device.type == "meta" or b.device.type == "meta":
        return a is b
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def select(t: Tensor, dim: int, index: list[int] | torch.Tensor) -> Tensor:
    """A new tensor of ``t``'s positions ``index`` along ``dim`` (rows by indexing, other
    dims by a mask when the index is increasing: both faster than index_select on CPU)."""
    index_t = torch.as_tensor(index, dtype=torch.long, device=t.device)
    dim = dim % max(t.dim(), 1)
    with torch.no_grad():
        if t.is_meta:  # shapes only: a mask's selection size would depend on its values
            return t.index_select(dim, index_t)
        if dim == 0:
            return t.detach()[index_t]
        if index_t.numel() > 1 and bool((index_t[1:] > index_t[:-1]).all()):
            mask = torch.zeros(t.shape[dim], dtype=torch.bool, device=t.device)
            mask[index_t] = True
            return t.detach()[(slice(None),) * dim + (mask,)]
        return t.index_select(dim, index_t)


@dataclass
class Cut:
    """What slicing one dim took away, enough to put it back (:func:`uncut`): the positions
    kept and removed along ``dim`` and the removed part itself (``rest``)."""

    dim: int
    kept: Tensor  # long (k,)
    removed: Tensor  # long (n - k,)
    rest: Tensor  # the sliced tensor's positions ``removed`` along ``dim``


def cut(t: Tensor, dim: int, index: list[int]) -> tuple[Tensor, Cut]:
    """:func:`select` that also returns what it took away (an in-place rewrite's undo keeps
    only that, not the whole original)."""
    dim = dim % max(t.dim(), 1)
    removed = np.setdiff1d(np.arange(t.shape[dim]), np.asarray(index, dtype=np.int64))
    kept_t = torch.as_tensor(index, dtype=torch.long, device=t.device)
    removed_t = torch.as_tensor(removed, dtype=torch.long, device=t.device)
    return select(t, dim, index), Cut(dim, kept_t, removed_t, select(t, dim, removed_t))


def uncut(t: Tensor, c: Cut) -> Tensor:
    """The tensor :func:`cut` was given, rebuilt from its result ``t`` and the cut."""
    shape = list(t.shape)
    shape[c.dim] = len(c.kept) + len(c.removed)
    full = t.new_empty(shape)
    with torch.no_grad():
        full.index_copy_(c.dim, c.kept, t)
        full.index_copy_(c.dim, c.removed, c.rest)
    return full

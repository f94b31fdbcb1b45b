"""Reading and replacing parameters and buffers by FQN, keeping tied tensors tied."""

from __future__ import annotations

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
    new: Tensor
    if isinstance(old, nn.Parameter):
        old.data = value.detach().clone()
        old.grad = None
        new = old
    else:
        new = value.detach().clone()
    for fqn in fqns:
        module, name = owner(model, fqn)
        if name in module._parameters:
            module._parameters[name] = new  # type: ignore[assignment]
        elif name in module._buffers:
            module._buffers[name] = new
        else:
            setattr(module, name, new)


def select(t: Tensor, dim: int, index: list[int] | torch.Tensor) -> Tensor:
    index_t = torch.as_tensor(index, dtype=torch.long, device=t.device)
    with torch.no_grad():
        return t.index_select(dim, index_t)

"""Undo for a rewrite made on the user's own model (``inplace=True``): the rewrite runs there
directly, and a failed one is undone, instead of rehearsing it on a full copy first (a copy
of a 1 B-parameter model costs seconds and its size again in memory).

The passes change a model only by assignment -- a parameter's ``data``, an entry of a module's
``_parameters``/``_buffers``/``_modules``, an attribute of a module or of a plain object it
holds (a config) -- never by writing into a tensor, so a shallow record of those restores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from graphprune.analysis.provenance import holders

_TABLES = ("_parameters", "_buffers", "_modules")


@dataclass
class Undo:
    """What :meth:`restore` puts back: every holder's attributes and every parameter's data."""

    attributes: list[tuple[Any, dict[str, Any]]]
    data: list[tuple[nn.Parameter, Tensor, Tensor | None]]  # parameter, its data and grad

    @classmethod
    def of(cls, model: nn.Module) -> Undo:
        attributes = []
        for holder in holders(model).values():
            state = dict(vars(holder))
            for table in _TABLES:
                if isinstance(state.get(table), dict):
                    state[table] = dict(state[table])
            attributes.append((holder, state))
        return cls(attributes, [(p, p.data, p.grad) for p in model.parameters()])

    def restore(self) -> None:
        for holder, state in self.attributes:
            vars(holder).clear()
            vars(holder).update(state)
        for parameter, data, grad in self.data:
            parameter.data = data
            parameter.grad = grad

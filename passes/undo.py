"""Undo for a rewrite made on the user's own model (``inplace=True``): the rewrite runs there
directly, and a failed one is undone, instead of rehearsing it on a full copy first (a copy
of a 1 B-parameter model costs seconds and its size again in memory).

The passes change a model only by assignment -- a parameter's ``data``, an entry of a module's
``_parameters``/``_buffers``/``_modules``, an attribute of a module or of a plain object it
holds (a config) -- never by writing into a tensor, so a shallow record of those restores it.
A parameter's data is changed only by slicing (:mod:`graphprune.passes.slice_channels`), which
hands the undo what it cuts away (:meth:`Undo.sliced`): the undo holds no reference to the
original data, so each original tensor is freed as soon as its sliced form replaces it, and
the rewrite's peak is the model's size plus one tensor, not twice the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.analysis.provenance import holders
from graphprune.passes.tensors import Cut, uncut

_TABLES = ("_parameters", "_buffers", "_modules")


@dataclass
class _Original:
    """A parameter as it was: its shape, dtype and gradient."""

    parameter: nn.Parameter
    shape: torch.Size
    dtype: torch.dtype
    grad: Tensor | None


@dataclass
class Undo:
    """What :meth:`restore` puts back: every holder's attributes, every parameter's gradient,
    and the parts slicing cut from each parameter's data."""

    attributes: list[tuple[Any, dict[str, Any]]]
    originals: list[_Original]
    # id(parameter) -> (cuts in the order made, the shape they left)
    cuts: dict[int, tuple[list[Cut], torch.Size]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> Undo:
        attributes = []
        for holder in holders(model).values():
            state = dict(vars(holder))
            for table in _TABLES:
                if isinstance(state.get(table), dict):
                    state[table] = dict(state[table])
            attributes.append((holder, state))
        originals = [_Original(p, p.shape, p.dtype, p.grad) for p in model.parameters()]
        return cls(attributes, originals)

    def sliced(self, tensor: Tensor, cuts: list[Cut], shape: torch.Size) -> None:
        """``tensor`` is about to be replaced by its slices ``cuts`` (of ``shape``). Buffers
        and plain tensors are replaced by new objects (the attribute record keeps the old);
        a parameter keeps its object and gets new data, so its cuts are kept here."""
        if isinstance(tensor, nn.Parameter) and cuts:
            self.cuts[id(tensor)] = (cuts, shape)

    def restore(self) -> None:
        for holder, state in self.attributes:
            vars(holder).clear()
            vars(holder).update(state)
        for original in self.originals:
            p = original.parameter
            cuts, shape = self.cuts.get(id(p), ([], p.shape))
            if cuts and p.shape == shape:  # not yet replaced when interrupted in between
                data = p.data
                for c in reversed(cuts):
                    data = uncut(data, c)
                p.data = data
            if p.shape != original.shape or p.dtype != original.dtype:
                raise RuntimeError(  # a pass changed data other than by slicing: a bug here
                    f"cannot undo the rewrite of a parameter of shape {tuple(original.shape)}: "
                    f"it is now {tuple(p.shape)} {p.dtype}"
                )
            p.grad = original.grad
        self.cuts.clear()  # the cut-away parts are back in the model

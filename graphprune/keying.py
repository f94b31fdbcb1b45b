"""Hashable stand-ins for a model's attributes and inputs: what graphprune's caches key by.

The analysis cache (:mod:`graphprune.analysis.cache`) keys a model by its structure (tensors
by shape, objects by identity as well as by value: an entry tied to that model), the export
cache (:mod:`graphprune.onnx.export_cache`) by its content (tensors by a digest of their
bytes, modules by name: a copy of the model is a hit). Both walk values the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
DEPTH = 4  # containers deeper than this are not settings a forward branches on: by identity


@dataclass(eq=False)
class Key:
    """A key; the objects it names by identity are held, so that no other object can take
    their id while the key lives."""

    value: Hashable
    held: list[Any] = field(default_factory=list, repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


@dataclass
class Keyer:
    """Values as hashable stand-ins: plain values with their type, containers element by
    element, sets of plain values sorted, an object with attributes (a config) by them two
    levels deep, anything else by identity. ``tensor`` and ``module`` say how those are keyed
    (``module`` returning None: by identity); ``with_identity`` keys objects with attributes
    by identity too. ``root`` is never held (a cache keyed weakly by it must not keep it)."""

    tensor: Callable[[torch.Tensor], Hashable]
    module: Callable[[nn.Module], Hashable | None] = lambda m: None
    with_identity: bool = False
    root: Any = None
    held: list[Any] = field(default_factory=list)
    memo: dict[tuple[int, int], Hashable] = field(default_factory=dict)

    def ident(self, obj: Any) -> int:
        if obj is not self.root:
            self.held.append(obj)
        return id(obj)

    def hooks(self, m: nn.Module) -> tuple[Hashable, ...]:
        """A module's forward hooks by identity (a copy of a model shares them)."""
        tables = (m._forward_hooks, m._forward_pre_hooks)
        return tuple((k, self.ident(h)) for table in tables for k, h in table.items())

    def key(self, value: Hashable) -> Key:
        """``value`` (made of this keyer's stand-ins) as a key holding what it names."""
        return Key(value, self.held)

    def __call__(self, value: Any, depth: int = 0) -> Hashable:
        if isinstance(value, PLAIN):
            return (type(value), value)
        if isinstance(value, torch.Tensor):
            return ("tensor", self.tensor(value))
        if isinstance(value, nn.Module):
            named = self.module(value)
            return named if named is not None else ("module", self.ident(value))
        if depth > DEPTH:
            return ("object", self.ident(value))
        if isinstance(value, list | tuple):
            return (type(value), *(self(v, depth + 1) for v in value))
        if isinstance(value, dict):
            return ("dict", *((repr(k), self(v, depth + 1)) for k, v in value.items()))
        if isinstance(value, set | frozenset) and all(isinstance(v, PLAIN) for v in value):
            return ("set", *sorted(repr(v) for v in value))  # names of non-persistent buffers
        if (id(value), depth) in self.memo:  # a config every module holds: keyed once
            return self.memo[(id(value), depth)]
        state: Hashable = ("object", self.ident(value))
        if depth <= 1 and hasattr(value, "__dict__") and not callable(value):
            attributes = self(dict(vars(value)), depth + 1)
            own = (self.ident(value),) if self.with_identity else ()
            state = (type(value), *own, attributes)
        self.memo[(id(value), depth)] = state
        return state


__all__ = ["DEPTH", "PLAIN", "Key", "Keyer"]

"""Capture and analysis, computed once per model structure and reused.

Latency-target rounds, Pruner steps, advise candidates and a user trying plans in a notebook
compile the same model again and again; the graph, its channel groups and the shape model do
not change between them (only the weights' values and the kept counts do). An entry is tied
to the model object (weakly: it dies with the model) and to a fingerprint of everything the
capture depends on: the module tree and its types, every parameter and buffer (identity,
shape, dtype, device), each module's plain attributes and hooks, and the example inputs'
structure, shapes and dtypes. Any change there -- a module swapped, an attribute set, a
weight replaced by a new tensor, a pruned model -- is a miss and the model is captured anew.

Values are not part of the key: capture and analysis read shapes, not values (the scores,
computed per compile from the current weights, do).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from graphprune.analysis.graph import DependencyGraph
from graphprune.capture import Captured, ExampleInputs, capture, normalize_inputs, serialized

T = TypeVar("T")
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
# nn.Module bookkeeping that is not the module's own configuration (hooks are counted apart)
_BOOKKEEPING = frozenset({"_parameters", "_buffers", "_modules", "training"})


@dataclass
class Analysed:
    """A model's capture and dependency graph, plus values derived from them on demand
    (``derived``: the shape model), all valid while the fingerprint holds."""

    captured: Captured
    dg: DependencyGraph
    _derived: dict[str, Any] = field(default_factory=dict)

    def derived(self, key: str, make: Callable[[], T]) -> T:
        """``make()`` the first time ``key`` is asked for, the stored value after."""
        if key not in self._derived:
            self._derived[key] = make()
        value: T = self._derived[key]
        return value


_entries: weakref.WeakKeyDictionary[nn.Module, tuple[Fingerprint, Analysed]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


@serialized
def analysed(
    model: nn.Module,
    example_inputs: ExampleInputs,
    analyze: Callable[[Captured], DependencyGraph],
    lap: Callable[[str], None] = lambda stage: None,
    *,
    keep: bool = True,
) -> Analysed:
    """The capture and analysis of ``model`` on ``example_inputs``: the stored ones when the
    fingerprint matches (``lap("reuse analysis")``), else computed (``lap("capture")``,
    ``lap("analyze")``). ``keep=False`` stores nothing and drops the model's entry: a model
    about to be rewritten in place, whose old tensors the entry must not keep alive."""
    key = Fingerprint.of(model, example_inputs)
    with _lock:
        found = _entries.get(model) if keep else _entries.pop(model, None)
    if found is not None and found[0] == key:
        lap("reuse analysis")
        return found[1]
    captured = capture(model, example_inputs)
    lap("capture")
    result = Analysed(captured, analyze(captured))
    lap("analyze")
    if keep:
        with _lock:
            _entries[model] = (key, result)
    return result


def forget(model: nn.Module) -> None:
    """Drop ``model``'s entry (it was rewritten in place)."""
    with _lock:
        _entries.pop(model, None)


@dataclass
class Fingerprint:
    """Everything the capture of a model on some inputs depends on, as a value; the objects
    it names by identity are held (an id cannot be reused by another object meanwhile)."""

    value: Hashable
    held: list[Any] = field(default_factory=list, compare=False, repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self.value == other.value

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def of(cls, model: nn.Module, example_inputs: ExampleInputs) -> Fingerprint:
        held: list[Any] = []
        memo: dict[tuple[int, int], Hashable] = {}

        def ident(obj: Any) -> int:
            if obj is not model:  # (the root is the entry's key: holding it would leak it)
                held.append(obj)
            return id(obj)

        modules = tuple(
            (name, type(m), ident(m), ident(type(m).forward), _hooks(m, ident),
             tuple((k, _value(v, memo, ident)) for k, v in sorted(vars(m).items())
                   if k not in _BOOKKEEPING))
            for name, m in model.named_modules(remove_duplicate=False)
        )  # fmt: skip
        tensors = tuple(
            (name, ident(t), tuple(t.shape), t.dtype, t.device.type)
            for name, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        )
        args, kwargs = normalize_inputs(example_inputs)
        everywhere = (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks)
        hooks = tuple((k, ident(h)) for table in everywhere for k, h in table.items())
        value = (modules, tensors, hooks, _value(args, memo, ident), _value(kwargs, memo, ident))
        return cls(value, held)


def _hooks(m: nn.Module, ident: Callable[[Any], int]) -> tuple[Hashable, ...]:
    tables = (m._forward_hooks, m._forward_pre_hooks)
    return tuple((k, ident(h)) for table in tables for k, h in table.items())


def _value(
    value: Any, memo: dict[tuple[int, int], Hashable], ident: Callable[[Any], int], depth: int = 0
) -> Hashable:
    """A hashable stand-in for an attribute or input: plain values as they are, tensors by
    shape and dtype, containers element by element, other objects (a config, and the configs
    it holds) by their own attributes, two levels deep; anything else by identity."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, nn.Module):
        return ("module", ident(value))
    if depth > 4:  # a container this deep is not a setting the forward branches on
        return ("deep", ident(value))
    if isinstance(value, list | tuple):
        return (type(value).__name__, *(_value(v, memo, ident, depth + 1) for v in value))
    if isinstance(value, dict):
        items = ((repr(k), _value(v, memo, ident, depth + 1)) for k, v in value.items())
        return ("dict", *items)
    if (id(value), depth) in memo:
        return memo[(id(value), depth)]
    state: Hashable = (type(value), ident(value))
    if depth <= 1 and hasattr(value, "__dict__") and not callable(value):
        state = (type(value), ident(value), _value(dict(vars(value)), memo, ident, depth + 1))
    memo[(id(value), depth)] = state
    return state

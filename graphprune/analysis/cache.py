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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules import module as module_hooks

from graphprune.analysis.graph import DependencyGraph
from graphprune.capture import Captured, ExampleInputs, capture, normalize_inputs, serialized
from graphprune.keying import Key, Keyer

T = TypeVar("T")
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


_entries: weakref.WeakKeyDictionary[nn.Module, tuple[Key, Analysed]] = weakref.WeakKeyDictionary()
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
    key = fingerprint(model, example_inputs)
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


def fingerprint(model: nn.Module, example_inputs: ExampleInputs) -> Key:
    """Everything the capture of ``model`` on ``example_inputs`` depends on, as a key (objects
    named by identity are held; the model itself is not)."""
    keyer = Keyer(
        tensor=lambda t: (tuple(t.shape), t.dtype, t.device.type), with_identity=True,
        root=model,
    )  # fmt: skip
    modules = tuple(
        (name, type(m), keyer.ident(m), keyer.ident(type(m).forward), keyer.hooks(m),
         tuple((k, keyer(v)) for k, v in sorted(vars(m).items()) if k not in _BOOKKEEPING))
        for name, m in model.named_modules(remove_duplicate=False)
    )  # fmt: skip
    tensors = tuple(
        (name, keyer.ident(t), tuple(t.shape), t.dtype, t.device.type)
        for name, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    )
    args, kwargs = normalize_inputs(example_inputs)
    everywhere = (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks)
    hooks = tuple((k, keyer.ident(h)) for table in everywhere for k, h in table.items())
    return keyer.key((modules, tensors, hooks, keyer(args), keyer(kwargs)))

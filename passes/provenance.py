"""Which module int attributes produce which integer arguments of which ops.

torch.export turns ``x.view(B, T, self.n_head, self.head_dim)`` into a node with plain ints, so
the link to ``self.n_head`` is lost. We recover it with one eager forward in which every int
attribute of every submodule is a :class:`TracedInt` (an ``int`` that remembers where it came
from through arithmetic) and a TorchFunctionMode records the traced ints each torch call gets,
keyed by the source line of the call — the same line the export node's stack trace names.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from graphprune.capture import normalize_inputs

Source = frozenset[tuple[str, str]]  # {(module path, attribute name)}


class TracedInt(int):
    """An int that carries the module attributes it was computed from."""

    src: Source
    origin: int | None  # the attribute's own value when this *is* the attribute (not derived)

    def __new__(cls, value: int, src: Source, origin: int | None = None) -> TracedInt:
        obj = int.__new__(cls, value)
        obj.src = src
        obj.origin = origin
        return obj

    def _derive(self, other: Any, result: Any) -> Any:
        if isinstance(result, bool) or not isinstance(result, int):
            return result
        return TracedInt(result, self.src | getattr(other, "src", frozenset()))

    def __add__(self, o: Any) -> Any:
        return self._derive(o, int(self) + o)

    def __radd__(self, o: Any) -> Any:
        return self._derive(o, o + int(self))

    def __sub__(self, o: Any) -> Any:
        return self._derive(o, int(self) - o)

    def __rsub__(self, o: Any) -> Any:
        return self._derive(o, o - int(self))

    def __mul__(self, o: Any) -> Any:
        return self._derive(o, int(self) * o)

    def __rmul__(self, o: Any) -> Any:
        return self._derive(o, o * int(self))

    def __floordiv__(self, o: Any) -> Any:
        return self._derive(o, int(self) // o)

    def __rfloordiv__(self, o: Any) -> Any:
        return self._derive(o, o // int(self))

    def __mod__(self, o: Any) -> Any:
        return self._derive(o, int(self) % o)

    def __neg__(self) -> Any:
        return self._derive(None, -int(self))


@dataclass(frozen=True)
class IntUse:
    """A traced int passed to a torch call at ``line`` (``file:lineno``)."""

    line: str
    func: str  # name of the torch function called ("view", "expand", ...)
    index: int  # position among the call's integer arguments (flattened)
    value: int
    src: Source
    is_attribute: bool  # the value is the attribute itself, not derived from it


_DISPATCH_FILES = ("torch/overrides.py", "torch/_tensor.py", "torch/utils/_device.py")


def _caller_line() -> str:
    """The line that called the torch op (skipping torch's own __torch_function__ dispatch)."""
    frame = sys._getframe(2)  # 0: here, 1: __torch_function__, 2: the caller of the torch op
    while frame.f_back is not None and frame.f_code.co_filename.endswith(_DISPATCH_FILES):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.uses: list[IntUse] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        line = _caller_line()
        name = getattr(func, "__name__", str(func))
        for index, value in enumerate(_ints((args, kwargs or {}))):
            if isinstance(value, TracedInt):
                is_attr = value.origin is not None and int(value) == value.origin
                self.uses.append(IntUse(line, name, index, int(value), value.src, is_attr))
        return func(*args, **(kwargs or {}))


def _ints(value: Any) -> list[int]:
    """Every int argument in call order (bools excluded), traced or not."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, torch.Size):
        return list(value)
    if isinstance(value, list | tuple):
        return [x for v in value for x in _ints(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _ints(v)]
    return []


def int_attributes(model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(module path, module, attribute, value) for every plain int attribute."""
    found = []
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if type(value) is int and not name.startswith("_"):
                found.append((path, module, name, value))
    return found


def trace_int_uses(model: nn.Module, example_inputs: Any) -> list[IntUse]:
    """Run ``model`` once with traced int attributes; return every use the torch calls saw."""
    attrs = int_attributes(model)
    args, kwargs = normalize_inputs(example_inputs)
    for path, module, name, value in attrs:
        setattr(module, name, TracedInt(value, frozenset({(path, name)}), value))
    recorder = _Recorder()
    try:
        with torch.no_grad(), recorder:
            model(*args, **kwargs)
    finally:
        for _path, module, name, value in attrs:
            setattr(module, name, value)
    return recorder.uses

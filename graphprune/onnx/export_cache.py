"""ONNX exports reused within a process: a latency-target compile times the original against
every round it compiles, and compiles of the same model (another target, the same one again,
advise's candidates) export that original again, and often the same first round. An export
takes seconds (``torch.export``, decompositions, translation); a model whose content is the
same exports to the same file.

The key is the model's content, not its identity, so a copy that equals an earlier model (a
round compiled again to the same plan) is a hit too: the module tree (names, classes, hooks),
every module's plain attributes by value (graphprune's report and record aside; objects
without a value -- functions, objects with slots, anything deeper than a config inside a
config -- by identity, so they can only miss), every parameter and buffer (shape, dtype and a
blake2b digest of its bytes) and the example inputs (the same for tensors among them). A
change anywhere is a miss and a new export.

Files live in a temporary folder removed at exit, at most ``MAX_ENTRIES`` of them (least
recently used dropped); models whose tensors exceed ``MAX_BYTES`` are not hashed or kept.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.capture import ExampleInputs, normalize_inputs
from graphprune.onnx.export import export

MAX_ENTRIES = 16
MAX_BYTES = 256 << 20  # tensors hashed per lookup at most (a few tenths of a second)
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_BOOKKEEPING = frozenset({"_parameters", "_buffers", "_modules"})
GRAPHPRUNE_ATTRIBUTES = "_graphprune_"  # a compiled model's report and record (never read)


class ExportCache:
    """Exported files by model content (module docstring)."""

    def __init__(self) -> None:
        self.files: OrderedDict[_Key, Path] = OrderedDict()
        self.folder: Path | None = None
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def path(self, model: nn.Module, example_inputs: ExampleInputs, scratch: Path) -> Path:
        """The ONNX file of ``model`` on ``example_inputs``: an earlier export of the same
        content, else a new one (kept; a model too large to key is exported to ``scratch``)."""
        try:
            key = content_key(model, example_inputs)
        except Exception:  # a tensor without plain bytes (sparse, a subclass): not keyed
            key = None
        with self._lock:
            found = self.files.get(key) if key is not None else None
            if key is not None and found is not None and found.is_file():
                self.files.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        if key is None:
            export(model, example_inputs, scratch)
            return scratch
        with self._lock:
            folder = self._folder()
            target = folder / f"model-{self.misses}.onnx"
        export(model, example_inputs, target)
        with self._lock:
            self.files[key] = target
            while len(self.files) > MAX_ENTRIES:
                _, old = self.files.popitem(last=False)
                for produced in old.parent.glob(old.name + "*"):  # the model and its .data
                    produced.unlink(missing_ok=True)
        return target

    def _folder(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="graphprune-exports-"))
            atexit.register(shutil.rmtree, self.folder, ignore_errors=True)
        return self.folder


EXPORTS = ExportCache()


def exported(model: nn.Module, example_inputs: ExampleInputs, scratch: Path) -> Path:
    """The process's cached export of ``model`` (:meth:`ExportCache.path` of ``EXPORTS``)."""
    return EXPORTS.path(model, example_inputs, scratch)


def content_key(model: nn.Module, example_inputs: ExampleInputs) -> _Key | None:
    """What the export of ``model`` on ``example_inputs`` depends on, by value (None: tensors
    beyond ``MAX_BYTES``, not hashed)."""
    state = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(
        remove_duplicate=False)]  # fmt: skip
    if sum(t.numel() * t.element_size() for _, t in state) > MAX_BYTES:
        return None
    keyer = _Keyer({id(m): name for name, m in model.named_modules(remove_duplicate=False)})
    modules = tuple(
        (name, type(m), keyer.hooks(m), tuple(
            (k, keyer.value(v)) for k, v in sorted(vars(m).items()) if _read(k)
        ))
        for name, m in model.named_modules(remove_duplicate=False)
    )  # fmt: skip
    tensors = tuple((name, _tensor(t)) for name, t in state)
    args, kwargs = normalize_inputs(example_inputs)
    value = (modules, tensors, keyer.value(args), keyer.value(kwargs))
    return _Key(value, keyer.held)


def _read(attribute: str) -> bool:
    """An attribute the forward may read: not the module's tables (their tensors and modules
    are keyed apart) nor graphprune's report and record of a compiled model."""
    return attribute not in _BOOKKEEPING and not attribute.startswith(GRAPHPRUNE_ATTRIBUTES)


class _Key:
    """A content key; the objects it names by identity are held, so no other object can
    take their id while the entry lives."""

    def __init__(self, value: Hashable, held: list[Any]) -> None:
        self.value, self.held = value, held

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


def _tensor(t: torch.Tensor) -> Hashable:
    """Shape, dtype, device and a digest of the bytes (a view as bytes: no copy when
    contiguous)."""
    data = t.detach()
    if data.is_meta:
        return (tuple(t.shape), t.dtype, "meta")
    flat = data.contiguous().reshape(-1).view(torch.uint8).cpu()
    digest = hashlib.blake2b(flat.numpy().data, digest_size=16).hexdigest()
    return (tuple(t.shape), t.dtype, t.device.type, digest)


class _Keyer:
    """Values by content; what has none by identity (and held)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names  # module id -> its name in the model
        self.held: list[Any] = []

    def ident(self, obj: Any) -> int:
        self.held.append(obj)
        return id(obj)

    def hooks(self, m: nn.Module) -> tuple[Hashable, ...]:
        """Hook functions by identity (a copy of a model shares them; a new hook misses)."""
        tables = (m._forward_hooks, m._forward_pre_hooks)
        return tuple((k, self.ident(h)) for table in tables for k, h in table.items())

    def value(self, value: Any, depth: int = 0) -> Hashable:
        """An attribute or input: plain values, tensors by content, modules by their name in
        the model, containers element by element, an object with attributes (a config) by
        them, two levels deep; anything else by identity (it can only miss)."""
        if isinstance(value, _PLAIN):
            return (type(value), value)
        if isinstance(value, torch.Tensor):
            return ("tensor", _tensor(value))
        if isinstance(value, nn.Module):
            name = self.names.get(id(value))
            return ("module", name) if name is not None else ("object", self.ident(value))
        if depth > 4:
            return ("object", self.ident(value))
        if isinstance(value, list | tuple):
            return (type(value), *(self.value(v, depth + 1) for v in value))
        if isinstance(value, dict):
            return ("dict", *((repr(k), self.value(v, depth + 1)) for k, v in value.items()))
        if isinstance(value, set | frozenset) and all(isinstance(v, _PLAIN) for v in value):
            return ("set", *sorted(repr(v) for v in value))  # names of non-persistent buffers
        if depth <= 1 and hasattr(value, "__dict__") and not callable(value):
            return (type(value), self.value(dict(vars(value)), depth + 1))
        return ("object", self.ident(value))

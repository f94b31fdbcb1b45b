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

import torch
from torch import nn

from graphprune.capture import ExampleInputs, normalize_inputs
from graphprune.keying import Key, Keyer
from graphprune.onnx.export import export

MAX_ENTRIES = 16
MAX_BYTES = 256 << 20  # tensors hashed per lookup at most (a few tenths of a second)
_BOOKKEEPING = frozenset({"_parameters", "_buffers", "_modules"})
GRAPHPRUNE_ATTRIBUTES = "_graphprune_"  # a compiled model's report and record (never read)


class ExportCache:
    """Exported files by model content (module docstring)."""

    def __init__(self) -> None:
        self.files: OrderedDict[Key, Path] = OrderedDict()
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


def content_key(model: nn.Module, example_inputs: ExampleInputs) -> Key | None:
    """What the export of ``model`` on ``example_inputs`` depends on, by value (None: tensors
    beyond ``MAX_BYTES``, not hashed)."""
    state = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(
        remove_duplicate=False)]  # fmt: skip
    if sum(t.numel() * t.element_size() for _, t in state) > MAX_BYTES:
        return None
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    keyer = Keyer(
        tensor=_tensor, module=lambda m: ("module", names[id(m)]) if id(m) in names else None
    )
    modules = tuple(
        (name, type(m), keyer.hooks(m), tuple(
            (k, keyer(v)) for k, v in sorted(vars(m).items()) if _read(k)
        ))
        for name, m in model.named_modules(remove_duplicate=False)
    )  # fmt: skip
    tensors = tuple((name, _tensor(t)) for name, t in state)
    args, kwargs = normalize_inputs(example_inputs)
    return keyer.key((modules, tensors, keyer(args), keyer(kwargs)))


def _read(attribute: str) -> bool:
    """An attribute the forward may read: not the module's tables (their tensors and modules
    are keyed apart) nor graphprune's report and record of a compiled model."""
    return attribute not in _BOOKKEEPING and not attribute.startswith(GRAPHPRUNE_ATTRIBUTES)


def _tensor(t: torch.Tensor) -> Hashable:
    """Shape, dtype, device and a digest of the bytes (a view as bytes: no copy when
    contiguous)."""
    data = t.detach()
    if data.is_meta:
        return (tuple(t.shape), t.dtype, "meta")
    flat = data.contiguous().reshape(-1).view(torch.uint8).cpu()
    digest = hashlib.blake2b(flat.numpy().data, digest_size=16).hexdigest()
    return (tuple(t.shape), t.dtype, t.device.type, digest)

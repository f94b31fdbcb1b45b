"""A checkpoint as ``save_pretrained`` writes it: ``config.json`` and safetensors shards
(``model.safetensors``, or ``model.safetensors.index.json`` naming the shards).

Nothing here loads the model: it is built on the meta device from the config (shapes only),
and the weights are read one tensor at a time from the memory-mapped shards when a stage
asks for them. ``src`` is only ever read.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.errors import InputError
from graphprune.memory import release_freed_memory

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:  # pragma: no cover - the hf extra is missing
        raise InputError(
            "compiling a checkpoint needs transformers and safetensors: "
            "pip install 'graphprune[hf]'"
        ) from None


def _safe_open(path: Path) -> Any:
    safetensors = importlib.import_module("safetensors")
    return safetensors.safe_open(str(path), framework="pt")


@dataclass
class Checkpoint:
    """Where each tensor of ``path`` is, its shape, and the config and class that built it."""

    path: Path
    config: Any
    model_class: type
    files: dict[str, Path]  # tensor name -> shard file
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    kinds: dict[str, str] = field(default_factory=dict)  # tensor name -> stored dtype ("BF16")

    @classmethod
    def open(cls, path: str | Path, model_class: type | None = None) -> Checkpoint:
        """Read ``path``'s config and shard headers (no weights), or raise :class:`InputError`
        saying what is missing."""
        root = Path(path)
        if not root.is_dir() or not (root / "config.json").is_file():
            raise InputError(
                f"{root} is not a checkpoint directory: expected config.json and safetensors "
                "shards as save_pretrained writes them"
            )
        files = _tensor_files(root)
        tf = _transformers()
        try:
            config = tf.AutoConfig.from_pretrained(str(root), local_files_only=True)
        except Exception as exc:
            raise InputError(
                f"{root}/config.json does not load: {type(exc).__name__}: {exc}"
            ) from None
        shapes, kinds = _headers(files)
        return cls(
            root, config, model_class or _class_of(config, tf), files, shapes,
            _dtype_of(config, kinds), kinds,
        )  # fmt: skip

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype ``name`` is stored in (None for a kind torch has no name for here)."""
        return _DTYPES.get(self.kinds.get(name, ""))

    def tensor(self, name: str) -> Tensor:
        """One tensor, read from its shard (mapped only while it is read: the pages of the
        tensors already done do not stay in the process; nor do those the allocator kept of
        the tensors read before and dropped since)."""
        release_freed_memory()
        with _safe_open(self.files[name]) as f:
            return f.get_tensor(name)

    def build_meta(self) -> nn.Module:
        """The model the config describes, on the meta device, built in the checkpoint's dtype
        as ``from_pretrained`` builds it (the default dtype set while it is made: a buffer made
        in float32 on purpose, rotary frequencies, stays float32)."""
        saved = torch.get_default_dtype()
        try:
            torch.set_default_dtype(self.dtype)
            with torch.device("meta"):
                model = self.model_class(self.config)
        except Exception as exc:
            raise InputError(
                f"{self.model_class.__name__} cannot be built from {self.path}/config.json: "
                f"{type(exc).__name__}: {exc}; pass model_class="
            ) from None
        finally:
            torch.set_default_dtype(saved)
        return model.eval()

    def check_against(self, model: nn.Module) -> None:
        """Every tensor of the checkpoint is a tensor of ``model`` with the same shape (tied
        weights may be stored once); otherwise the shards disagree with the config."""
        state = model.state_dict()
        problems = [
            f"{name}: checkpoint {shape}, config builds "
            + (str(tuple(state[name].shape)) if name in state else "no such tensor")
            for name, shape in self.shapes.items()
            if name not in state or tuple(state[name].shape) != shape
        ]
        if problems:
            raise InputError(
                f"the shards of {self.path} disagree with its config.json "
                f"({len(problems)} tensors), e.g. " + "; ".join(problems[:3])
            )


def _tensor_files(root: Path) -> dict[str, Path]:
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads((root / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise InputError(f"{root / INDEX} is not a safetensors index: {exc}") from None
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise InputError(f"{root / INDEX} names shards that are missing: {missing[:3]}")
        return {name: root / file for name, file in weight_map.items()}
    if (root / SINGLE).is_file():
        with _safe_open(root / SINGLE) as f:
            return {name: root / SINGLE for name in f.keys()}  # noqa: SIM118
    raise InputError(
        f"{root} holds no safetensors weights ({SINGLE} or {INDEX}); save the model with "
        "save_pretrained(..., safe_serialization=True)"
    )


def _class_of(config: Any, tf: Any) -> type:
    names = getattr(config, "architectures", None) or []
    for name in names:
        found = getattr(tf, name, None)
        if isinstance(found, type):
            return found
    raise InputError(
        f"config.json names no transformers class (architectures={names}); pass model_class="
    )


def _headers(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor's shape and stored dtype, from the shard headers (no data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    kinds: dict[str, str] = {}
    for file in sorted(set(files.values())):
        with _safe_open(file) as f:
            for name in f.keys():  # noqa: SIM118
                view = f.get_slice(name)
                shapes[name], kinds[name] = tuple(view.get_shape()), str(view.get_dtype())
    return shapes, kinds


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _dtype_of(config: Any, kinds: dict[str, str]) -> torch.dtype:
    """The dtype of the floating-point weights as stored (the config's may be missing)."""
    for kind in kinds.values():
        if kind in _DTYPES:
            return _DTYPES[kind]
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return configured if isinstance(configured, torch.dtype) else torch.float32


class CheckpointTensors(Mapping[str, Tensor]):
    """The model's tensors by FQN, read from the checkpoint on access (a tied tensor stored
    under one name is found under each of its names)."""

    def __init__(self, checkpoint: Checkpoint, aliases: dict[str, list[str]]) -> None:
        self.checkpoint, self.aliases = checkpoint, aliases

    def stored_name(self, name: str) -> str | None:
        """The name ``name`` is stored under (itself, or a tied alias); None: not stored."""
        if name in self.checkpoint.files:
            return name
        return next((a for a in self.aliases.get(name, []) if a in self.checkpoint.files), None)

    def __getitem__(self, name: str) -> Tensor:
        stored = self.stored_name(name)
        if stored is None:
            raise KeyError(name)
        return self.checkpoint.tensor(stored)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.stored_name(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.files)

    def __len__(self) -> int:
        return len(self.checkpoint.files)

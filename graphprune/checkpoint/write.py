"""Writing the pruned checkpoint shard by shard, so that it never looks complete before it is.

Everything goes to ``<dst>.partial`` first: one safetensors shard per decoder layer (the
tensors named ``...layers.<i>.``; the rest, embeddings and final norm, in shards of their
own), each written to a temp file and renamed, then the index, the config and the tokenizer
and other files of ``src``; ``<dst>.partial`` is renamed to ``dst`` last. A manifest in the
staging directory records the run (source, plan) and each shard once it is complete, so an
interrupted run is resumed where it stopped: shards already written are kept when their
header still names the expected tensors with the expected shapes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from graphprune.checkpoint.source import INDEX, SINGLE, Checkpoint, _safe_open
from graphprune.errors import InputError
from graphprune.io import write_atomic, write_text_atomic
from graphprune.passes.tensors import select

MANIFEST = "graphprune-progress.json"
_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3." -> one shard per numbered block


@dataclass
class Slices:
    """Per tensor name: the kept positions of each dim that loses some."""

    kept: dict[str, dict[int, np.ndarray]]

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        dims = self.kept.get(name, {})
        return tuple(len(dims[d]) if d in dims else s for d, s in enumerate(shape))

    def apply(self, name: str, tensor: Tensor) -> Tensor:
        for dim, index in sorted(self.kept.get(name, {}).items()):
            tensor = select(tensor, dim, index.tolist())
        return tensor.contiguous()


def shard_plan(checkpoint: Checkpoint) -> dict[str, list[str]]:
    """Output shard file -> the tensor names it holds (a numbered block's tensors together)."""
    blocks: dict[str, list[str]] = {}
    for name in checkpoint.files:
        match = _LAYER.match(name)
        blocks.setdefault(match.group(1) if match else "", []).append(name)
    count = len(blocks)
    return {
        f"model-{i + 1:05d}-of-{count:05d}.safetensors": names
        for i, (_, names) in enumerate(sorted(blocks.items(), key=lambda kv: _order(kv[0])))
    }


def _order(block: str) -> tuple[int, str]:
    """Blocks in numeric order ("layers.10" after "layers.9"), the rest first."""
    number = re.search(r"(\d+)$", block)
    return (int(number.group(1)) if number else -1, block)


def staging_dir(dst: Path, identity: dict[str, Any]) -> Path:
    """``<dst>.partial``: new, or the one an interrupted run with the same source and plan
    left (any other is refused, never overwritten)."""
    staging = dst.with_name(dst.name + ".partial")
    manifest = staging / MANIFEST
    if staging.exists():
        found = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
        if found.get("identity") != identity:
            raise InputError(
                f"{staging} holds a partial output of another run (other source or plan); "
                "remove it or choose another destination"
            )
        return staging
    staging.mkdir(parents=True)
    write_text_atomic(manifest, json.dumps({"identity": identity, "shards": {}}))
    return staging


def write_shards(
    checkpoint: Checkpoint,
    slices: Slices,
    staging: Path,
    progress: Callable[[str], None] = lambda shard: None,
) -> dict[str, str]:
    """Write every shard not already complete; returns the index's weight map."""
    safetensors_torch = _safetensors_torch()
    manifest_path = staging / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    weight_map: dict[str, str] = {}
    for file, names in shard_plan(checkpoint).items():
        expected = {n: list(slices.shape(n, checkpoint.shapes[n])) for n in names}
        weight_map.update(dict.fromkeys(names, file))
        if manifest["shards"].get(file) == expected and _holds(staging / file, expected):
            progress(f"{file} (kept from the interrupted run)")
            continue
        tensors = {n: slices.apply(n, checkpoint.tensor(n)) for n in names}

        def save(tmp: Path, tensors: dict[str, Tensor] = tensors) -> None:
            safetensors_torch.save_file(tensors, str(tmp), metadata={"format": "pt"})

        write_atomic(staging / file, save)
        del tensors
        manifest["shards"][file] = expected
        write_text_atomic(manifest_path, json.dumps(manifest))
        progress(file)
    return weight_map


def _holds(path: Path, expected: dict[str, list[int]]) -> bool:
    """The shard's header names exactly the expected tensors with their shapes."""
    if not path.is_file():
        return False
    try:
        with _safe_open(path) as f:
            found = {n: list(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    except Exception:
        return False
    return found == expected


def finish(
    checkpoint: Checkpoint, staging: Path, dst: Path, weight_map: dict[str, str], config: Any
) -> None:
    """Index, config and the source's other files (tokenizer, generation config), then the
    rename that makes ``dst`` appear complete."""
    sizes = sum((staging / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(staging / INDEX, json.dumps(index, indent=2))
    config.save_pretrained(str(staging))
    for item in checkpoint.path.iterdir():
        skip = {INDEX, SINGLE, "config.json", MANIFEST}
        if item.name in skip or item.suffix == ".safetensors" or item.name.endswith(".bin"):
            continue
        target = staging / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    (staging / MANIFEST).unlink()
    os.replace(staging, dst)


def _safetensors_torch() -> Any:
    return importlib.import_module("safetensors.torch")

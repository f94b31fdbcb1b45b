"""Writing the pruned checkpoint shard by shard, so that it never looks complete before it is.

Everything goes to ``<dst>.partial`` first: one safetensors shard per decoder layer (the
tensors named ``...layers.<i>.``; the rest, embeddings, final norm and head, in shards no
larger than a layer), each written to a temp file and renamed, then the index, the config
and the tokenizer and generation files of ``src``; the result is checked there, and
``<dst>.partial`` is renamed to ``dst`` last. A manifest in the staging directory records the
run (the source's files, the plan, the calibration data, graphprune's version) and each shard
once it is complete, with what each of its tensors was made from (the kept positions) and the
file's sha256, so an interrupted run resumes where it stopped: a shard is kept only when it
was made the same way and its file is unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from graphprune.checkpoint.source import INDEX, Checkpoint
from graphprune.errors import InputError
from graphprune.io import write_atomic, write_text_atomic
from graphprune.passes.tensors import select

MANIFEST = "graphprune-progress.json"
_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3." -> one shard per numbered block


# files of a Hugging Face checkpoint besides the weights that the pruned one keeps as they are
COPIED = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "README.md",
)  # fmt: skip


@dataclass
class Slices:
    """Per tensor name: the kept positions of each dim that loses some."""

    kept: dict[str, dict[int, np.ndarray]]

    def digest(self, name: str) -> str:
        """Which positions ``name`` keeps, as a short hash (the manifest's resume check)."""
        h = hashlib.sha256()
        for dim, index in sorted(self.kept.get(name, {}).items()):
            h.update(f"{dim}:".encode() + np.asarray(index, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        dims = self.kept.get(name, {})
        return tuple(len(dims[d]) if d in dims else s for d, s in enumerate(shape))

    def apply(self, name: str, tensor: Tensor) -> Tensor:
        for dim, index in sorted(self.kept.get(name, {}).items()):
            tensor = select(tensor, dim, index.tolist())
        return tensor.contiguous()


def block_of(name: str) -> str:
    """The numbered block a tensor or module FQN belongs to ("" outside one)."""
    match = _LAYER.match(name + ".")
    return match.group(1) if match else ""


def shard_plan(checkpoint: Checkpoint) -> dict[str, list[str]]:
    """Output shard file -> the tensor names it holds: a numbered block's tensors together; the
    rest (embeddings, final norm, head) packed into shards no larger than the largest block,
    so writing one shard holds about one decoder layer (an 8 B model's embedding and head are
    each larger than a layer: a shard each)."""
    blocks: dict[str, list[str]] = {}
    for name in checkpoint.files:
        blocks.setdefault(block_of(name), []).append(name)
    size = {n: math.prod(shape) for n, shape in checkpoint.shapes.items()}
    largest = max((sum(size[n] for n in names) for key, names in blocks.items() if key), default=0)
    groups: list[list[str]] = []
    for key, names in sorted(blocks.items(), key=lambda kv: _order(kv[0])):
        if key or not largest:
            groups.append(names)
            continue
        packed: list[str] = []
        for name in names:  # greedily, in the checkpoint's order
            if packed and sum(size[n] for n in packed) + size[name] > largest:
                groups.append(packed)
                packed = []
            packed.append(name)
        groups.append(packed)
    count = len(groups)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": g for i, g in enumerate(groups)}


def _order(block: str) -> tuple[int, str]:
    """Blocks in numeric order ("layers.10" after "layers.9"), the rest first."""
    number = re.search(r"(\d+)$", block)
    return (int(number.group(1)) if number else -1, block)


def staging_dir(dst: Path, identity: dict[str, Any]) -> Path:
    """``<dst>.partial``: new, or the one an interrupted run with the same source and plan
    left (any other is refused, never overwritten)."""
    text = json.dumps({"identity": identity, "shards": {}})  # fails before anything is made
    identity = json.loads(text)["identity"]  # as the manifest will hold it (lists, not tuples)
    staging = dst.with_name(dst.name + ".partial")
    manifest = staging / MANIFEST
    if staging.exists():
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = {}
        if found.get("identity") != identity:
            raise InputError(
                f"{staging} holds a partial output of another run (other source, plan or "
                "graphprune version); remove it or choose another destination"
            )
        return staging
    making = dst.with_name(dst.name + ".partial-new")
    shutil.rmtree(making, ignore_errors=True)
    making.mkdir(parents=True)
    write_text_atomic(making / MANIFEST, text)
    os.replace(making, staging)  # appears with its manifest
    return staging


class ShardWriter:
    """The output shards of one run in its staging directory: which are complete (the manifest
    names them, with what they were made from and their file's sha256), and writing one."""

    def __init__(self, checkpoint: Checkpoint, staging: Path, writes: bool = True) -> None:
        self.staging, self.manifest_path = staging, staging / MANIFEST
        self.writes = writes  # False: another process writes (torch.distributed: rank 0)
        self.manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        self.plan = shard_plan(checkpoint)
        self.weight_map = {n: file for file, names in self.plan.items() for n in names}

    def complete(self, file: str, made: dict[str, list[Any]]) -> bool:
        """The shard was written from ``made`` (per tensor: shape and what it was made from)
        and its file is still the one written (sha256)."""
        entry = self.manifest["shards"].get(file)
        path = self.staging / file
        if not entry or entry.get("tensors") != made or not path.is_file():
            return False
        return bool(entry.get("sha256") == _sha256(path))

    def write(self, file: str, tensors: dict[str, Tensor], made: dict[str, list[Any]]) -> None:
        """Write the shard (temp file, then rename) and record it in the manifest."""
        if not self.writes:
            return
        safetensors_torch = _safetensors_torch()

        def save(tmp: Path) -> None:
            safetensors_torch.save_file(tensors, str(tmp), metadata={"format": "pt"})

        write_atomic(self.staging / file, save)
        digest = _sha256(self.staging / file)
        self.manifest["shards"][file] = {"tensors": made, "sha256": digest}
        write_text_atomic(self.manifest_path, json.dumps(self.manifest))


def write_shards(
    checkpoint: Checkpoint,
    slices: Slices,
    staging: Path,
    progress: Callable[[str], None] = lambda shard: None,
) -> dict[str, str]:
    """Write every shard not already complete; returns the index's weight map."""
    writer = ShardWriter(checkpoint, staging)
    for file, names in writer.plan.items():
        made = {n: [*slices.shape(n, checkpoint.shapes[n]), slices.digest(n)] for n in names}
        if writer.complete(file, made):
            progress(f"{file} (kept from the interrupted run)")
            continue
        writer.write(file, {n: slices.apply(n, checkpoint.tensor(n)) for n in names}, made)
        progress(file)
    return writer.weight_map


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def finish(checkpoint: Checkpoint, staging: Path, weight_map: dict[str, str], config: Any) -> None:
    """Index, config and the source's tokenizer and generation files, in the staging
    directory (other files -- original/ weights of another format, .git -- are not copied)."""
    sizes = sum((staging / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(staging / INDEX, json.dumps(index, indent=2))
    config.save_pretrained(str(staging))
    for name in COPIED:
        if (checkpoint.path / name).is_file():
            shutil.copy2(checkpoint.path / name, staging / name)


def publish(staging: Path, dst: Path) -> None:
    """The rename that makes ``dst`` appear, complete (temp files of killed writes removed)."""
    for leftover in staging.glob(".*.tmp"):
        leftover.unlink()
    (staging / MANIFEST).unlink()
    os.replace(staging, dst)


def reject(staging: Path, dst: Path) -> Path:
    """A staging directory whose check failed, set aside (never resumed from)."""
    rejected = dst.with_name(dst.name + ".rejected")
    shutil.rmtree(rejected, ignore_errors=True)
    os.replace(staging, rejected)
    return rejected


def _safetensors_torch() -> Any:
    return importlib.import_module("safetensors.torch")

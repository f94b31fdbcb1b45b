"""Writing the pruned checkpoint shard by shard, so that it never looks complete before it is.

Everything goes to ``<dst>.partial`` first: one safetensors shard per decoder layer (the
tensors named ``...layers.<i>.``; the rest, embeddings and final norm, in a shard of their
own), each written to a temp file and renamed, then the index, the config and the tokenizer
and generation files of ``src``; the result is checked there, and ``<dst>.partial`` is
renamed to ``dst`` last. A manifest in the staging directory records the run (the source's
files, the plan, graphprune's version) and each shard once it is complete, with a digest of
the kept positions of each of its tensors, so an interrupted run resumes where it stopped:
a shard is kept only when it was made from the same positions and its header still names
the expected tensors with the expected shapes.
"""

from __future__ import annotations

import hashlib
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

from graphprune.checkpoint.source import INDEX, Checkpoint, _safe_open
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
        made = {n: [*expected[n], slices.digest(n)] for n in names}
        weight_map.update(dict.fromkeys(names, file))
        if manifest["shards"].get(file) == made and _holds(staging / file, expected):
            progress(f"{file} (kept from the interrupted run)")
            continue
        tensors = {n: slices.apply(n, checkpoint.tensor(n)) for n in names}

        def save(tmp: Path, tensors: dict[str, Tensor] = tensors) -> None:
            safetensors_torch.save_file(tensors, str(tmp), metadata={"format": "pt"})

        write_atomic(staging / file, save)
        del tensors
        manifest["shards"][file] = made
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

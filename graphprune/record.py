"""The compile record: what one compile did, as plain typed data that :func:`graphprune.load`
and :func:`graphprune.rewind` replay on a freshly built model.

A record is written to JSON only when a model is saved (``to_json``) and read back through
``from_json``, which checks its shape and migrates older formats. Compiling a compiled model
(iterative pruning) chains the records: ``previous`` holds every earlier step, oldest first, so
a replay starts from the original architecture.

Formats:

1. groups only: kept channels and group sizes (the resolution has no units; attribute values
   behind shape constants were not stored and are derived again at replay).
2. per-unit outcomes and the attribute values the rewrite set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graphprune.dictview import DictView
from graphprune.errors import InputError
from graphprune.planning.resolve import Resolution

RECORD_FORMAT = 2
SUPPORTED_FORMATS = (1, 2)
RECORD_ATTRIBUTE = "_graphprune_record"  # where a compiled model carries its record


@dataclass
class SparsityRecord:
    """The layers a sparse plan masked, and whether the masks were baked into the weights."""

    layers: list[str] = field(default_factory=list)
    baked: bool = False


@dataclass(eq=True)
class CompileRecord(DictView):
    """One compile step (and, in ``previous``, the steps before it). Reads as its JSON form
    too (``record["dropped"]``)."""

    plan: dict[str, Any]  # Plan.to_dict() of the plan as the user gave it
    resolution: Resolution
    group_sizes: list[int] = field(default_factory=list)  # checked against the model at replay
    dropped: list[str] = field(default_factory=list)  # blocks replaced by a skip
    changes: list[str] = field(default_factory=list)
    sparsity: SparsityRecord = field(default_factory=SparsityRecord)
    previous: list[CompileRecord] = field(default_factory=list)
    format: int = RECORD_FORMAT

    @property
    def stores_attributes(self) -> bool:
        """Format 2 on: the attribute values behind shape constants are in the resolution."""
        return self.format >= 2

    def steps(self) -> list[CompileRecord]:
        """Every compile step, oldest first, this one last."""
        return [*self.previous, self]

    def chain(self) -> list[CompileRecord]:
        """The steps a compile of the model this record describes inherits: copies of every
        step, oldest first, each without its own ``previous``."""
        own = copy.deepcopy(self)
        own.previous = []
        return [*copy.deepcopy(self.previous), own]

    def to_json(self) -> dict[str, Any]:
        """The on-disk form (JSON-able; key order as every release wrote it)."""
        data = self._step_json()
        data["previous"] = [step._step_json() for step in self.previous]
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.to_json()

    def _step_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "plan": copy.deepcopy(self.plan),
            "dropped": list(self.dropped),
            "resolution": self.resolution.to_dict(),
            "group_sizes": list(self.group_sizes),
            "changes": list(self.changes),
            "sparsity": {"layers": list(self.sparsity.layers), "baked": self.sparsity.baked},
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> CompileRecord:
        """Check and read a record (and its chain); ``where`` names its file in errors."""
        record = cls._step(data, where)
        previous = data.get("previous", [])
        if not isinstance(previous, list):
            raise InputError(f"{where}: the record's 'previous' is not a list of records")
        record.previous = [cls._step(step, where) for step in previous]
        return record

    @classmethod
    def _step(cls, data: Any, where: str) -> CompileRecord:
        if not isinstance(data, dict):
            raise InputError(
                f"{where}: the pruning record is a {type(data).__name__}, not an object; "
                "the file was not written by graphprune.save"
            )
        version = data.get("format", 1)
        if version not in SUPPORTED_FORMATS:
            raise InputError(
                f"{where}: pruning record format {version} is newer than this graphprune "
                f"reads ({', '.join(map(str, SUPPORTED_FORMATS))}); upgrade graphprune"
            )
        try:
            sparsity = data.get("sparsity") or {}
            resolution = Resolution.from_dict(data["resolution"])  # format 1: no units
            _check_resolution(resolution)
            return cls(
                plan=dict(data.get("plan") or {}),
                resolution=resolution,
                group_sizes=[int(s) for s in data.get("group_sizes", [])],
                dropped=[str(p) for p in data.get("dropped", [])],
                changes=[str(c) for c in data.get("changes", [])],
                sparsity=SparsityRecord(
                    [str(n) for n in sparsity.get("layers", [])], bool(sparsity.get("baked"))
                ),
                format=int(version),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(
                f"{where}: the pruning record is malformed ({type(exc).__name__}: {exc}); "
                "save the model again with graphprune.save"
            ) from None


def _check_resolution(resolution: Resolution) -> None:
    """Kept indices name channels of groups the record sizes, each once."""
    for group, kept in resolution.kept.items():
        size = resolution.sizes.get(group)
        if size is None:
            raise ValueError(f"group {group} has kept channels but no size")
        if len(set(kept)) != len(kept) or any(not 0 <= c < size for c in kept):
            raise ValueError(f"group {group}: kept channels outside 0..{size - 1} or repeated")


def record_of(model: nn.Module) -> CompileRecord | None:
    """The record a compiled (or loaded) model carries, or None."""
    found = getattr(model, RECORD_ATTRIBUTE, None)
    return found if isinstance(found, CompileRecord) else None


def attach_record(model: nn.Module, record: CompileRecord) -> None:
    # object.__setattr__: a plain attribute, not a submodule or a parameter
    object.__setattr__(model, RECORD_ATTRIBUTE, record)

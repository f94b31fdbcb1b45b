"""Structured ``reconstruct=True`` from a checkpoint: the refit streamed block by block.

The refit (:func:`~graphprune.oneshot.reconstruct.refit_consumers`) needs, at each layer whose
input channels were removed, the original layer's output on the *original* model's
activations and the pruned layer's input on the pruned model's. Both models stay on the meta
device and run side by side in one forward of the stacked calibration batches
(:func:`~graphprune.oneshot.calibration.in_lockstep`), each through a :class:`BlockStream`:

* the original reads every block from the source as the forward reaches it and drops it when
  the block returns (nothing written);
* the pruned model reads every block from the source *sliced* to the kept channels; each
  layer is refit in a pre-hook before it runs (so the activations after it are those of the
  model as refit so far, as in memory), and the block is written to its output shard and
  dropped when it returns.

The code path is the one :func:`graphprune.compile` runs in memory, so both give the same
weights, bit for bit. An interrupted run resumes: a block whose output shard is complete is
read from that shard (its weights as refit) and its layers are not fit again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.capture import tensor_aliases
from graphprune.checkpoint.source import Checkpoint, CheckpointTensors
from graphprune.checkpoint.stream import (
    REST,
    BlockStream,
    fake_call_order,
    real_buffers,
    tables_kept,
)
from graphprune.checkpoint.write import ShardWriter, Slices, block_of
from graphprune.oneshot.distributed import barrier, same_everywhere
from graphprune.oneshot.reconstruct import LayerFit, refit_consumers, refit_layers
from graphprune.planning.plan import Plan


@dataclass
class RefitOutcome:
    """What the streamed refit did: each layer's fit, and the blocks taken from an
    interrupted run."""

    fits: list[LayerFit] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)


class SlicedTensors(Mapping[str, Tensor]):
    """The pruned model's tensors by FQN: the source's, sliced to the kept positions (a tied
    tensor stored under one name is found, and sliced, under each of its names)."""

    def __init__(self, stored: CheckpointTensors, slices: Slices) -> None:
        self.stored, self.slices = stored, slices

    def __getitem__(self, name: str) -> Tensor:
        stored = self.stored.stored_name(name)
        if stored is None:
            raise KeyError(name)
        return self.slices.apply(stored, self.stored.checkpoint.tensor(stored))

    def __contains__(self, name: object) -> bool:
        return name in self.stored

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


def stream_refit(
    source: Checkpoint,
    original: nn.Module,
    pruned: nn.Module,
    plan: Plan,
    slices: Slices,
    kept_outputs: Callable[[str], Tensor | None],
    batches: list[Any],
    writer: ShardWriter,
    progress: bool,
) -> RefitOutcome:
    """Refit ``pruned`` (the meta model as rewritten) to ``original`` (the meta model as the
    source builds it) on ``batches`` and write every block (see the module docstring)."""
    made = lambda n: [*slices.shape(n, source.shapes[n]), slices.digest(n), "refit"]  # noqa: E731
    # the rest's refit layers (the head) stay loaded after their call: the reference calls the
    # original's again, and the pruned one's are written last, refit
    rest = {n for n in refit_layers(original, pruned) if not block_of(n)}
    sliced = SlicedTensors(CheckpointTensors(source, tensor_aliases(pruned)), slices)
    writing = BlockStream(
        source, pruned, plan, writer, {}, stored=sliced, made=made, keep=rest
    )  # fmt: skip
    reading = BlockStream(source, original, plan, None, {}, keep=rest)
    barrier()  # torch.distributed: every rank has read which blocks are done before any writes
    same_everywhere(sorted(writing.done), "the blocks an interrupted run wrote")
    done = {n for n, _ in pruned.named_modules() if block_of(n) in writing.done}
    order = fake_call_order(pruned, refit_layers(original, pruned, done), batches[0])
    with tables_kept(original), tables_kept(pruned):
        real_buffers(original)
        real_buffers(pruned)
        with reading._hooks(), writing._hooks(), torch.no_grad():
            fits = refit_consumers(
                original, pruned, kept_outputs, batches, progress=progress, order=order,
                one_forward=True, skip=done,
            )  # fmt: skip
        reading.drop_loaded()  # what the original's forward left loaded (the head)
        writing.finish_all()
    return RefitOutcome(fits, sorted(b for b in writing.done if b != REST))


__all__ = ["RefitOutcome", "SlicedTensors", "stream_refit"]

"""One-shot calibration spread over processes with torch.distributed.

The calibration statistics of the one-shot methods are sums over rows: the input norms of
wanda, the normal equations (A^T A, A^T Y, ||Y||^2) of the structured refit and the BatchNorm
refit, the Hessians X^T X of SparseGPT. When a process group is initialised with more than one
process, ``graphprune.compile`` gives each rank its share of the calibration batches (batch
``i`` to rank ``i % world``), every statistic is summed over the ranks (``all_reduce``) before
it is used, and every rank then solves the same system: the masks and refit weights are those
of one process over all the batches, up to the order of float summation. The two cross-
validation folds of the ridge refit are the global batches' parities, as in one process.

Every rank must call compile with the same model, plan and calibration list; the collectives
run in the model's forward order, checked to be the same on every rank (a forward whose path
depends on the data is refused, not deadlocked). The statistics are CPU tensors: use a
backend that reduces them (gloo; NCCL reduces GPU tensors only). Only these statistics are
distributed: a plan that needs gradients (taylor, fisher) or whole-model forwards (layer
contributions) is refused across processes rather than computed from one rank's share.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from graphprune.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Share:
    """This process's part of the calibration batches: ``rank`` of ``world``, ``total``
    batches over all ranks."""

    rank: int
    world: int
    total: int

    def global_index(self, local: int) -> int:
        """The position among all batches of this rank's ``local``-th batch."""
        return self.rank + local * self.world


_ACTIVE: contextvars.ContextVar[Share | None] = contextvars.ContextVar("share", default=None)


def group_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def sharing(batches: Sequence[T], calibrated: bool) -> Iterator[list[T]]:
    """This rank's share of ``batches`` while the statistics are summed over the ranks (all
    of them outside a process group, or for the example inputs standing in for calibration:
    every rank has the same one)."""
    world = group_size()
    if world == 1 or not calibrated:
        yield list(batches)
        return
    if len(batches) < world:
        raise InputError(
            f"calibration= has {len(batches)} batches for {world} processes: each process "
            "needs at least one (pass more, smaller batches)"
        )
    share = Share(dist.get_rank(), world, len(batches))
    token = _ACTIVE.set(share)
    try:
        yield list(batches[share.rank :: world])
    finally:
        _ACTIVE.reset(token)


def active() -> Share | None:
    """The share in force (None: one process, nothing to sum)."""
    return _ACTIVE.get()


def all_sum(*tensors: Tensor) -> None:
    """Sum each tensor over the ranks, in place (nothing outside a share)."""
    if _ACTIVE.get() is None:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_int(value: int) -> int:
    """An int summed over the ranks (a row count)."""
    if _ACTIVE.get() is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def fold_of(local: int) -> int:
    """The cross-validation fold of this rank's ``local``-th batch: its global parity."""
    share = _ACTIVE.get()
    return (share.global_index(local) if share is not None else local) % 2


def batch_total(local: int) -> int:
    """Batches over all ranks, for a rank holding ``local`` of them."""
    share = _ACTIVE.get()
    return share.total if share is not None else local


def same_everywhere(value: list[str], what: str) -> None:
    """Raise on every rank unless every rank has the same ``value`` (the layers a forward
    reached, in order): the collectives that follow pair up by position, so a forward that
    takes another path on one rank's data (a mixture of experts) must stop here, not
    deadlock or sum one layer's statistics with another's."""
    if _ACTIVE.get() is None:
        return
    found: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, value)
    if any(other != value for other in found):
        raise InputError(
            f"{what} differs between the processes (a forward whose path depends on the "
            "data, e.g. a mixture of experts): this one-shot step cannot be distributed; "
            "run it in one process"
        )


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if group_size() > 1 else 0


def barrier() -> None:
    """Wait for every process of the default group (nothing without one)."""
    if group_size() > 1:
        dist.barrier()


def on_rank_zero(work: Callable[[], T]) -> T:
    """``work()`` run by rank 0 alone (files: one writer) and its result given to every rank;
    an error it raises is raised on every rank (as an InputError with its message on the
    others), so no rank waits for a result that will not come."""
    if group_size() == 1:
        return work()
    outcome: list[object] = [None, None]  # [result, error text]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = work()
        except BaseException as exc:  # every rank must hear of it, then it is re-raised
            error = exc
            outcome[1] = f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise InputError(f"rank 0 failed: {outcome[1]}")
    return outcome[0]  # type: ignore[return-value]


def refuse(what: str) -> None:
    """Raise for a computation that is not distributed, inside a share."""
    if _ACTIVE.get() is not None:
        raise InputError(
            f"{what} is not computed across processes (only the input norms, refit normal "
            f"equations and SparseGPT Hessians are summed over ranks): run it in one process, "
            "or use importance='l2'/'wanda'"
        )

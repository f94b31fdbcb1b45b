"""Interleaved timing: the one way graphprune measures latency side by side.

Callables are timed in rounds, and each round starts one later than the last (A B C, B C A,
C A B, ...), so drift -- thermal, other load -- hits all of them equally; every other cycle
runs in reverse (C B A, B A C, A C B), so each callable follows each other one equally often
and none always runs right after the slowest one (whose cache footprint it would inherit).

:func:`block_samples` times runners that must not be alive together -- onnxruntime sessions
with spinning thread pools, as deployed, whose idle workers would take the cores from the
session being timed -- in the same rotating order, one block of calls at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def rotations(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: rotated one step per round, reversed every other cycle."""
    orders = []
    for i in range(rounds):
        order = names if (i // len(names)) % 2 == 0 else names[::-1]
        orders.append(order[i % len(order) :] + order[: i % len(order)])
    return orders


def interleaved_samples(
    runs: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each callable, after ``warmup`` untimed rounds.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in rotations(names, repeats):
        for name in order:
            if sync is not None:
                sync()
            start = time.perf_counter()
            runs[name]()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - start)
    return samples


def block_samples(
    builders: Mapping[str, Callable[[], Callable[[], object]]],
    *,
    blocks: int,
    runs: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Seconds of ``blocks * runs`` calls of each runner, one runner alive at a time.

    Each block builds a runner (``builders[name]()``, e.g. a fresh onnxruntime session), makes
    ``warmup`` untimed calls, times ``runs`` calls and drops it; blocks follow the rotating
    order of :func:`interleaved_samples`, so drift still hits every runner equally."""
    samples: dict[str, list[float]] = {name: [] for name in builders}
    for order in rotations(list(builders), blocks):
        for name in order:
            run = builders[name]()
            for _ in range(warmup):
                run()
            for _ in range(runs):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
            del run  # the session and its thread pool go before the next one starts
    return samples

"""Interleaved timing: the one way graphprune measures latency side by side.

Callables are timed in rounds, and each round starts one later than the last (A B C, B C A,
C A B, ...), so drift -- thermal, other load, cache state -- hits all of them equally.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


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
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            runs[name]()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - start)
    return samples

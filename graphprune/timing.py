"""Interleaved timing: the one way graphprune measures latency side by side.

Callables are timed in rounds, and each round starts one later than the last (A B C, B C A,
C A B, ...), so drift -- thermal, other load -- hits all of them equally; every other cycle
runs in reverse (C B A, B A C, A C B), so each callable follows each other one equally often
and none always runs right after the slowest one (whose cache footprint it would inherit).
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
        order = names if (i // len(names)) % 2 == 0 else names[::-1]
        for name in order[i % len(order) :] + order[: i % len(order)]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            runs[name]()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - start)
    return samples

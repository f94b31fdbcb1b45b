"""Pruning schedules: the fraction removed after each of ``steps`` steps.

With t = k / steps (k = 1 .. steps), from ``initial`` to ``target``:

* ``linear``: initial + (target - initial) * t
* ``cosine``: initial + (target - initial) * (1 - cos(pi t)) / 2
* ``cubic``: the AGP schedule of Zhu & Gupta (2017), target + (initial - target) * (1 - t)^3:
  large steps first, while there is redundancy to remove, small ones near the end.

The last value is ``target`` exactly.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "cubic")


def schedule_ratios(
    target: float, steps: int, kind: str = "cubic", initial: float = 0.0
) -> list[float]:
    if steps < 1:
        raise ValueError(f"steps={steps}: give at least 1")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r}; use one of {SCHEDULES}")
    out = []
    for k in range(1, steps + 1):
        t = k / steps
        if kind == "linear":
            r = initial + (target - initial) * t
        elif kind == "cosine":
            r = initial + (target - initial) * (1 - math.cos(math.pi * t)) / 2
        else:
            r = target + (initial - target) * (1 - t) ** 3
        out.append(r)
    out[-1] = target
    return out

"""The candidates :func:`graphprune.advise.advise` measures: every kind of pruning, one-shot.

Each candidate is data -- a name, its kind, the :class:`Plan` that makes it (None: the original
weights), whether the exported file is quantized to int8 and whether its weights are stored
compactly -- so a user can pass their own list. None is trained: structured plans use wanda
scores and ``reconstruct=True`` (refit by least squares), sparse plans SparseGPT
(``reconstruct=True`` on a mask plan), int8 onnxruntime's static QDQ quantizer.

The default list is ordered cheapest first (what runs first under a time budget): int8 of the
original (one quantization), unstructured masks and 2:4 (one SparseGPT pass each), their int8
combination, then the structured latency targets (latency tables and measured correction
rounds: the dearest), then structured + int8.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from graphprune.errors import InputError
from graphprune.planning.plan import Plan

KINDS = ("dense", "structured", "unstructured", "2:4")


@dataclass(frozen=True)
class Candidate:
    """One way to make the model smaller or faster, as data."""

    name: str
    kind: str  # one of KINDS: what the plan does to the weights
    plan: Plan | None = None  # None: the original's weights (dense, or int8 of the dense)
    int8: bool = False  # quantize the exported file (static QDQ, calibrated)
    compact: bool = False  # store mostly-zero weights compactly (bitmask / sparse tensor)
    base: str | None = None  # reuse the pruned model of the candidate with this name
    cost: float = 1.0  # relative cost, for the order under a budget (cheapest first)

    @property
    def is_reference(self) -> bool:
        """The original, fp32: what every other candidate is measured against."""
        return self.plan is None and self.base is None and not self.int8


ORIGINAL = Candidate("original (fp32)", "dense", cost=0.0)


def default_candidates(
    *,
    latency_targets: Sequence[float] = (0.75, 0.5, 0.35),
    sparsities: Sequence[float] = (0.5, 0.75, 0.9),
    runtime: str = "onnxruntime",
    threads: int = 2,
    two_four: bool = True,
    int8: bool = True,
) -> list[Candidate]:
    """The candidates of the issue's question, cheapest first: int8; unstructured at each
    sparsity (compact storage) and 2:4, SparseGPT; the sparsest unstructured + int8;
    structured at each latency target (fraction of the original's latency on ``runtime``,
    wanda + reconstruct); the middle structured target + int8."""
    found = [ORIGINAL]
    if int8:
        found.append(Candidate("int8", "dense", int8=True, cost=1.0))
    for s in sparsities:
        plan = Plan(granularity="unstructured", ratio=s, reconstruct=True)
        found.append(Candidate(f"unstructured {s:.0%}", "unstructured", plan, compact=True, cost=3))
    if two_four:
        plan = Plan(granularity="n:m", nm=[2, 4], reconstruct=True)
        found.append(Candidate("2:4", "2:4", plan, compact=True, cost=3.0))
    if int8 and sparsities:
        sparsest = f"unstructured {max(sparsities):.0%}"
        found.append(
            Candidate(f"{sparsest} + int8", "unstructured", int8=True, compact=True,
                      base=sparsest, cost=1.0)
        )  # fmt: skip
    structured = []
    for t in latency_targets:
        plan = Plan(
            target_latency=t, importance="wanda", reconstruct=True, latency_runtime=runtime,
            latency_threads=threads,
        )  # fmt: skip
        name = f"structured {t:.0%} latency"
        structured.append(name)
        found.append(Candidate(name, "structured", plan, cost=10.0))
    if int8 and structured:
        middle = structured[len(structured) // 2]
        found.append(Candidate(f"{middle} + int8", "structured", int8=True, base=middle, cost=1))
    return found


def slug(name: str) -> str:
    """A candidate's file stem: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The list with the original first (added when missing); names unique; every ``base``
    names an earlier candidate. Raises InputError naming the candidate otherwise."""
    found = list(candidates)
    if not any(c.is_reference for c in found):
        found.insert(0, ORIGINAL)
    found.sort(key=lambda c: not c.is_reference)  # stable: the reference first
    seen: set[str] = set()
    files: dict[str, str] = {}  # file stem -> candidate: one file each, none the original's
    for c in found[1:]:
        stem = slug(c.name)
        if stem == "original" or files.get(stem, c.name) != c.name:  # same name: see below
            taken = repr(files[stem]) if stem in files else "the original's export"
            raise InputError(
                f"candidate {c.name!r} would write {stem}.onnx, as {taken} does: rename it"
            )
        files[stem] = c.name
        if c.is_reference:
            raise InputError(
                f"candidate {c.name!r} has no plan, base or int8: it is the original's weights "
                "unchanged, which is measured already (the first row)"
            )
    for c in found:
        if c.name in seen:
            raise InputError(f"two candidates are named {c.name!r}; names must be unique")
        if c.kind not in KINDS:
            raise InputError(f"candidate {c.name!r}: kind={c.kind!r}; use one of {KINDS}")
        if c.base is not None and c.base not in seen:
            raise InputError(
                f"candidate {c.name!r} reuses {c.base!r}, which is not an earlier candidate"
            )
        if c.base is not None and c.plan is not None:
            raise InputError(f"candidate {c.name!r}: give a plan or a base, not both")
        seen.add(c.name)
    return found

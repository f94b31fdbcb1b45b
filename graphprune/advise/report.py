"""The advice: tables per objective with the Pareto-optimal candidates marked, the measured
facts, a recommendation that says what it rests on, a plot and JSON.

Objectives: latency on each runtime (batch 1, and the larger batch beside it) and file size,
each against quality. A candidate is Pareto-optimal for an objective when no other measured
candidate is at least as good on both axes and better on one. Speed is only ever what was
timed; a smaller file is called smaller, never faster.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphprune.advise.measure import Row
from graphprune.advise.quality import Quality
from graphprune.io import write_text_atomic

SPEEDUP_NOISE = 1.05  # a measured speed-up below this is "no speed-up" (timing noise), or
# below 1 + twice how far the original timed against itself strayed from 1.0 in this run


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(cost, value)`` points (cost lower is better, value higher is better): which are
    not dominated by another point (as good on both, better on one)."""
    front = []
    for i, (c, v) in enumerate(points):
        dominated = any(
            (c2 <= c and v2 >= v) and (c2 < c or v2 > v)
            for j, (c2, v2) in enumerate(points)
            if j != i
        )
        front.append(not dominated)
    return front


def _value(quality: Quality | None) -> float | None:
    """The quality as "higher is better" (a perplexity is negated), or None."""
    if quality is None or quality.value is None:
        return None
    return quality.value if quality.higher_is_better else -quality.value


@dataclass
class Advice:
    """Every candidate's row, what was skipped, and the reading of them."""

    rows: list[Row]
    runtimes: list[str]  # measured on
    skipped_runtimes: dict[str, str]  # name -> why not measured (not installed)
    batch_sizes: tuple[int, ...]
    threads: int
    cpu: str
    tolerance: float  # quality loss accepted, relative to the original
    budget_s: float
    seconds: float
    objectives: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.objectives = [f"latency:{r}" for r in self.runtimes] + ["size"]
        self.mark_pareto()

    # -- reading the rows -------------------------------------------------------------------
    @property
    def reference(self) -> Row:
        return next(r for r in self.rows if r.candidate.is_reference)

    @property
    def measured(self) -> list[Row]:
        return [r for r in self.rows if r.measured]

    def cost(self, row: Row, objective: str) -> float | None:
        """Latency (ms, batch 1) on a runtime, or file bytes; None where not measured."""
        if objective == "size":
            return float(row.file_bytes) if row.measured else None
        timed = row.runtimes.get(objective.split(":", 1)[1])
        if timed is None or timed.error or self.batch_sizes[0] not in timed.latency_ms:
            return None
        return timed.latency_ms[self.batch_sizes[0]]

    def mark_pareto(self) -> None:
        for objective in self.objectives:
            rows = [
                r for r in self.measured
                if self.cost(r, objective) is not None and _value(r.quality) is not None
            ]  # fmt: skip
            points = [(self.cost(r, objective) or 0.0, _value(r.quality) or 0.0) for r in rows]
            for row, on_front in zip(rows, pareto_front(points), strict=True):
                row.pareto[objective] = on_front

    def acceptable(self, row: Row) -> bool:
        """Quality within ``tolerance`` of the original's (or better)."""
        ref = self.reference.quality
        return bool(row.quality and ref and row.quality.no_worse_than(ref, self.tolerance))

    def speedup(self, row: Row, runtime: str, batch: int | None = None) -> float | None:
        timed = row.runtimes.get(runtime)
        if timed is None or timed.error:
            return None
        return timed.speedup(self.batch_sizes[0] if batch is None else batch)

    def noise(self, runtime: str) -> float:
        """How far the original timed side by side with itself strays from 1.0 (largest over
        the batch sizes): this run's timing noise on ``runtime``."""
        timed = self.reference.runtimes.get(runtime)
        if timed is None or timed.error:
            return 0.0
        return max((abs((timed.speedup(b) or 1.0) - 1.0) for b in timed.latency_ms), default=0.0)

    def faster(self, speedup: float | None, runtime: str) -> bool:
        """A speed-up beyond this run's timing noise (and at least ``SPEEDUP_NOISE``)."""
        return speedup is not None and speedup >= max(SPEEDUP_NOISE, 1 + 2 * self.noise(runtime))

    # -- the recommendation ------------------------------------------------------------------
    def _quality_text(self, row: Row) -> str:
        q = row.quality
        if q is None or q.value is None:
            return "quality not measured"
        return f"{q.name} {q.value:#.4g}"

    def _latency_advice(self, runtime: str) -> str:
        batch = self.batch_sizes[0]
        where = f"for latency on this CPU with {runtime} (batch {batch}, {self.threads} threads)"
        timed = [r for r in self.measured if self.speedup(r, runtime) is not None]
        good = [r for r in timed if self.acceptable(r) and not r.candidate.is_reference]
        best = max(good, key=lambda r: self.speedup(r, runtime) or 0.0, default=None)
        fastest = max(timed, key=lambda r: self.speedup(r, runtime) or 0.0, default=None)
        if best is not None and self.faster(self.speedup(best, runtime), runtime):
            text = (
                f"{where}: {best.name}, {self.speedup(best, runtime):.2f}x faster, "
                f"{self._quality_text(best)}"
            )
        else:
            text = (
                f"{where}: keep the original; no candidate within {self.tolerance:.0%} of its "
                f"quality was measurably faster"
            )
        if fastest is not None and fastest is not best and not fastest.candidate.is_reference:
            text += (
                f" (fastest at any quality: {fastest.name}, "
                f"{self.speedup(fastest, runtime):.2f}x, {self._quality_text(fastest)})"
            )
        return text

    def _size_advice(self) -> str:
        ref = self.reference
        good = [r for r in self.measured if self.acceptable(r) and not r.candidate.is_reference]
        best = min(good, key=lambda r: r.file_bytes, default=None)
        if best is None or not ref.file_bytes:
            return (
                f"for disk size: keep the original; no candidate within {self.tolerance:.0%} of "
                "its quality was measured"
            )
        speeds = []
        for rt in self.runtimes:
            s = self.speedup(best, rt)
            if s is not None:
                speeds.append(
                    f"{s:.2f}x on {rt}" if self.faster(s, rt) else f"no speed-up on {rt} ({s:.2f}x)"
                )
        return (
            f"for disk size: {best.name}, {ref.file_bytes / best.file_bytes:.1f}x smaller "
            f"({best.file_bytes / 1e6:.2f} MB), {self._quality_text(best)}; speed "
            f"{', '.join(speeds) or 'not measured'}"
        )

    def recommendation(self) -> str:
        """One paragraph: what to use for each objective, with the numbers it rests on."""
        parts = [self._latency_advice(rt) for rt in self.runtimes] + [self._size_advice()]
        return "; ".join(parts) + "."

    def facts(self) -> list[str]:
        """The measured facts the advice rests on, one line each."""
        lines = []
        for rt in self.runtimes:
            sparse = [
                r for r in self.measured
                if r.candidate.kind in ("unstructured", "2:4") and not r.candidate.int8
            ]  # fmt: skip
            speeds: dict[str, float] = {}
            for r in sparse:
                s = self.speedup(r, rt)
                if s is not None:
                    speeds[r.name] = s
            if speeds:
                beat = [k for k, v in speeds.items() if self.faster(v, rt)]
                listed = ", ".join(f"{k} {v:.2f}x" for k, v in speeds.items())
                verdict = (
                    f"faster than dense: {', '.join(beat)}" if beat
                    else "none is faster than dense beyond the timing noise"
                )  # fmt: skip
                lines.append(
                    f"{rt}: sparse masks at batch {self.batch_sizes[0]}: {listed}; {verdict} "
                    f"(original against itself: within {self.noise(rt):.1%})"
                )
            lines += self._combination_facts(rt)
        return lines

    def _combination_facts(self, runtime: str) -> list[str]:
        """Structured + int8 against either alone, on ``runtime``."""
        lines = []
        by_name = {r.name: r for r in self.measured}
        for row in self.measured:
            c = row.candidate
            if not (c.int8 and c.kind == "structured" and c.base in by_name):
                continue
            alone = by_name[c.base]
            int8 = next((r for r in self.measured if r.candidate.int8 and r.candidate.kind ==
                         "dense"), None)  # fmt: skip
            parts = [row, alone] + ([int8] if int8 else [])
            speeds = [
                f"{r.name} {s:.2f}x ({self.reference.file_bytes / r.file_bytes:.1f}x smaller)"
                for r in parts
                if (s := self.speedup(r, runtime)) is not None
            ]
            if speeds:
                lines.append(f"{runtime}: combined vs alone at batch 1: {'; '.join(speeds)}")
        return lines

    # -- tables, JSON, plot --------------------------------------------------------------------
    def table(self) -> str:
        """A table per objective (Pareto-optimal rows marked ``*``), the rows not measured,
        the facts and the recommendation."""
        lines = [
            f"advice on {self.cpu}, {self.threads} threads; quality: "
            f"{self._quality_name()}; {self.seconds:.0f} s of a {self.budget_s:.0f} s budget"
        ]
        for rt in self.runtimes:
            lines += ["", f"latency on {rt}: ms = the candidate's median; speed-up = original / "
                      "candidate, timed side by side in one run (drift between runs cancels); "
                      "mem = peak RSS to load and run at batch 1 (fresh process), less that of "
                      "a one-op model"]
            lines += self._latency_table(rt)
        lines += ["", "file size (storage, not speed)"]
        lines += self._size_table()
        failed = [r for r in self.rows if not r.measured]
        if failed:
            lines += ["", "not measured:"]
            lines += [f"  {r.name}: {r.status}: {r.reason}" for r in failed]
        for name, why in self.skipped_runtimes.items():
            lines.append(f"runtime {name} skipped: {why}")
        lines += ["", "measured facts:"] + [f"  {f}" for f in self.facts()]
        lines += ["", "recommendation: " + self.recommendation()]
        return "\n".join(lines)

    def _quality_name(self) -> str:
        q = self.reference.quality
        if q is None:
            return "not measured"
        return f"{q.name} ({'higher' if q.higher_is_better else 'lower'} is better)"

    def _latency_table(self, runtime: str) -> list[str]:
        batches = self.batch_sizes
        head = f"  {'candidate':<34} {'quality':>9}" + "".join(
            f" {f'ms b{b}':>9} {'speedup':>7}" for b in batches
        ) + f" {'mem MB':>7}"  # fmt: skip
        lines = [head]
        for row in self.measured:
            timed = row.runtimes.get(runtime)
            mark = "*" if row.pareto.get(f"latency:{runtime}") else " "
            cells = f"{mark} {row.name:<34} {_q(row.quality):>9}"
            if timed is None or timed.error:
                lines.append(f"{cells}  {timed.error if timed else 'not timed'}")
                continue
            for b in batches:
                ms, s = timed.latency_ms.get(b), timed.speedup(b)
                cells += f" {ms:>9.3f} {s:>6.2f}x" if ms and s else f" {'-':>9} {'-':>7}"
            memory = "-" if timed.memory_mb is None else f"{timed.memory_mb:.1f}"
            lines.append(f"{cells} {memory:>7}")
        return lines

    def _size_table(self) -> list[str]:
        ref = self.reference.file_bytes or 1
        lines = [
            f"  {'candidate':<34} {'quality':>9} {'rel err':>8} {'MB':>9} {'smaller':>8} "
            f"{'MACs':>6}"
        ]
        ref_macs = self.reference.macs or 1
        for row in self.measured:
            mark = "*" if row.pareto.get("size") else " "
            lines.append(
                f"{mark} {row.name:<34} {_q(row.quality):>9} {_err(row.quality):>8} "
                f"{row.file_bytes / 1e6:>9.3f} "
                f"{ref / max(row.file_bytes, 1):>7.1f}x {row.macs / ref_macs:>6.2f}"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu, "threads": self.threads, "batch_sizes": list(self.batch_sizes),
            "runtimes": self.runtimes, "skipped_runtimes": self.skipped_runtimes,
            "tolerance": self.tolerance, "budget_s": self.budget_s, "seconds": self.seconds,
            "rows": [_row_dict(r) for r in self.rows], "facts": self.facts(),
            "recommendation": self.recommendation(),
        }  # fmt: skip

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))
        return path

    def __str__(self) -> str:
        return self.table()


def _q(quality: Quality | None) -> str:
    if quality is None:
        return "-"
    return "error" if quality.value is None else f"{quality.value:#.4g}"  # 1.000, not 1


def _err(quality: Quality | None) -> str:
    """The relative output error (fidelity only; the user's evaluate has none)."""
    if quality is None or quality.relative_error is None:
        return "-"
    return f"{quality.relative_error:.2e}"


def _row_dict(row: Row) -> dict[str, Any]:
    c = row.candidate
    return {
        "name": c.name, "kind": c.kind, "int8": c.int8, "compact": c.compact, "base": c.base,
        "plan": c.plan.to_dict() if c.plan is not None else None, "status": row.status,
        "reason": row.reason, "file": str(row.file) if row.file else None,
        "file_bytes": row.file_bytes, "params": row.params, "macs": row.macs,
        "quality": asdict(row.quality) if row.quality else None,
        "runtimes": {k: asdict(v) for k, v in row.runtimes.items()},
        "fp32_max_abs": row.fp32_max_abs, "int8_max_abs": row.int8_max_abs,
        "int8_float_nodes": row.int8_float_nodes,
        "seconds": row.seconds, "pareto": row.pareto,
    }  # fmt: skip

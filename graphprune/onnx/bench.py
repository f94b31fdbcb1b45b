"""Latency of a baseline and a pruned ONNX model, measured side by side in one runtime.

Both models live in one process, loaded by one :mod:`graphprune.onnx.runtimes` runtime
(onnxruntime by default) with the same thread count; runs alternate A B, B A, ... so drift
(thermal, other load) hits both equally; after a warm-up the median and p90 of each are
reported. speedup = t_baseline / t_pruned, next to the ideal speedup MACs_baseline /
MACs_pruned (efficiency = speedup / ideal). Memory is the process RSS growth while a model is
loaded and first run, a proxy for its footprint.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphprune.onnx.runtime import denormals_flushed
from graphprune.onnx.runtimes import Feeds, Loaded, Runtime, get_runtime, load_checked
from graphprune.timing import interleaved_samples


@dataclass
class Latency:
    median_ms: float
    p90_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = sorted(s * 1e3 for s in seconds)
        return cls(statistics.median(ms), ms[min(len(ms) - 1, int(0.9 * len(ms)))])


@dataclass
class BatchResult:
    batch: int
    baseline: Latency
    pruned: Latency

    @property
    def speedup(self) -> float:
        return self.baseline.median_ms / self.pruned.median_ms


@dataclass
class BenchReport:
    threads: int
    runs: int
    baseline_bytes: int
    pruned_bytes: int
    ideal_speedup: float | None = None  # MACs_baseline / MACs_pruned
    baseline_memory_mb: float = 0.0
    pruned_memory_mb: float = 0.0
    results: list[BatchResult] = field(default_factory=list)
    labels: tuple[str, str] = ("baseline", "pruned")
    runtime: str = "onnxruntime CPU"

    def efficiency(self, result: BatchResult) -> float | None:
        return result.speedup / self.ideal_speedup if self.ideal_speedup else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, result in zip(data["results"], self.results, strict=True):
            row["speedup"] = result.speedup
            row["efficiency"] = self.efficiency(result)
        return data

    def table(self) -> str:
        a, b = self.labels
        head = (
            f"{'batch':>5}  {a + ' ms':>12} {'p90':>8}  {b + ' ms':>12} {'p90':>8}  "
            f"{'speedup':>7}  {'ideal':>6}  {'effic.':>6}"
        )
        lines = [f"{self.runtime}, {self.threads} threads, {self.runs} interleaved runs", head]
        for r in self.results:
            eff = self.efficiency(r)
            ideal = f"{self.ideal_speedup:.2f}" if self.ideal_speedup else "-"
            lines.append(
                f"{r.batch:>5}  {r.baseline.median_ms:>12.3f} {r.baseline.p90_ms:>8.3f}  "
                f"{r.pruned.median_ms:>12.3f} {r.pruned.p90_ms:>8.3f}  {r.speedup:>6.2f}x  "
                f"{ideal:>6}  {'-' if eff is None else f'{eff:.2f}':>6}"
            )
        if not self.baseline_bytes:  # timed in-process (torch): no files, no sessions
            return "\n".join(lines)
        lines.append(
            f"file size: {a} {self.baseline_bytes / 1e6:.2f} MB, {b} "
            f"{self.pruned_bytes / 1e6:.2f} MB"
        )
        lines.append(
            f"RSS growth at session start: {a} {self.baseline_memory_mb:.1f} MB, {b} "
            f"{self.pruned_memory_mb:.1f} MB"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def interleaved(
    run_a: Callable[[], object], run_b: Callable[[], object], *, warmup: int, runs: int
) -> tuple[Latency, Latency]:
    """Median/p90 of ``run_a`` and ``run_b`` timed A B, B A, ... after ``warmup`` pairs."""
    samples = interleaved_samples({"a": run_a, "b": run_b}, warmup=warmup, repeats=runs)
    return Latency.of(samples["a"]), Latency.of(samples["b"])


@denormals_flushed
def benchmark(
    baseline: str | Path,
    pruned: str | Path,
    make_feeds: Callable[[Loaded, int], Feeds],
    *,
    batch_sizes: tuple[int, ...] = (1, 16),
    threads: int = 2,
    warmup: int = 10,
    runs: int = 50,
    ideal_speedup: float | None = None,
    labels: tuple[str, str] = ("baseline", "pruned"),
    runtime: Runtime | None = None,
) -> BenchReport:
    """Interleaved latency of two models in ``runtime`` (default onnxruntime's CPU provider);
    ``make_feeds(loaded, batch)`` builds the inputs."""
    runtime = runtime or get_runtime("onnxruntime")
    memory = []
    sessions = []
    for path in (baseline, pruned):
        before = _rss_mb()
        loaded = load_checked(runtime, path, threads)
        loaded.run(make_feeds(loaded, batch_sizes[0]))
        memory.append(_rss_mb() - before)
        sessions.append(loaded)
    report = BenchReport(
        threads,
        runs,
        Path(baseline).stat().st_size,
        Path(pruned).stat().st_size,
        ideal_speedup,
        memory[0],
        memory[1],
        labels=labels,
        runtime=f"{runtime.name} {runtime.version()} CPU",
    )
    a, b = sessions
    for batch in batch_sizes:
        fa, fb = make_feeds(a, batch), make_feeds(b, batch)
        run_a = functools.partial(a.run, fa)
        run_b = functools.partial(b.run, fb)
        la, lb = interleaved(run_a, run_b, warmup=warmup, runs=runs)
        report.results.append(BatchResult(batch, la, lb))
    return report

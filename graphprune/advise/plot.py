"""The advice as a figure: quality vs latency (one marker per runtime) and quality vs file size,
Pareto-optimal candidates filled and named, the others hollow."""

from __future__ import annotations

from pathlib import Path

from graphprune.advise.report import Advice
from graphprune.finetune.plots import pyplot, save_figure

MARKERS = ("o", "s", "^", "D")


def plot_advice(advice: Advice, path: str | Path, title: str = "") -> Path:
    """Write the two panels to ``path`` (PNG unless the suffix says otherwise)."""
    plt = pyplot()
    fig, (lat, size) = plt.subplots(1, 2, figsize=(12, 4.8))
    batch = advice.batch_sizes[0]
    rows = [r for r in advice.measured if r.quality is not None and r.quality.value is not None]
    for runtime, marker in zip(advice.runtimes, MARKERS, strict=False):
        objective = f"latency:{runtime}"
        for row in rows:
            cost = advice.cost(row, objective)
            if cost is None or row.quality is None or row.quality.value is None:
                continue
            front = row.pareto.get(objective, False)
            lat.scatter(
                cost, row.quality.value, marker=marker, s=46,
                facecolors="#3b75af" if front else "none", edgecolors="#3b75af",
            )  # fmt: skip
            if front:
                lat.annotate(row.name, (cost, row.quality.value), fontsize=7,
                             xytext=(4, 3), textcoords="offset points")  # fmt: skip
        lat.scatter([], [], marker=marker, color="#3b75af", label=runtime)
    lat.set_xlabel(f"latency, ms (batch {batch}, {advice.threads} threads)")
    lat.legend(loc="best", fontsize=8)
    for row in rows:
        assert row.quality is not None and row.quality.value is not None
        front = row.pareto.get("size", False)
        size.scatter(
            row.file_bytes / 1e6, row.quality.value, s=46,
            facecolors="#c0504d" if front else "none", edgecolors="#c0504d",
        )  # fmt: skip
        if front:
            size.annotate(row.name, (row.file_bytes / 1e6, row.quality.value), fontsize=7,
                          xytext=(4, 3), textcoords="offset points")  # fmt: skip
    size.set_xscale("log")
    size.set_xlabel("file size, MB (log; storage, not speed)")
    quality = advice.reference.quality
    label = "quality" if quality is None else quality.name
    if quality is not None and not quality.higher_is_better:
        label += " (lower is better)"
    for ax in (lat, size):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "graphprune advise: filled = Pareto-optimal")
    return save_figure(fig, path)

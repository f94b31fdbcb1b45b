"""Plots written to files (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphprune.io import write_atomic
from graphprune.report import CompileReport


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never opens a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    suffix = path.suffix.lstrip(".") or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120, bbox_inches="tight"))
    pyplot().close(fig)
    return path


def plot_kept_channels(report: CompileReport, path: str | Path, title: str = "") -> Path:
    """Per layer (pruning unit): output channels (or heads) kept vs total, as horizontal bars;
    per group for reports without units."""
    plt = pyplot()
    rows = [(u.name, u.kept * u.multiplier, u.total * u.multiplier) for u in report.units] or [
        (g.name.replace(".weight", ""), g.kept, g.total) for g in report.groups
    ]
    if not rows:
        raise ValueError("the report has no pruned layers or groups to plot")
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    names = [name if len(name) <= 48 else name[:45] + "..." for name, _, _ in rows]
    ax.barh(names, [total for _, _, total in rows], color="#dddddd", label="original")
    ax.barh(names, [kept for _, kept, _ in rows], color="#3b75af", label="kept")
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.legend(loc="lower right")
    ax.set_title(title or f"kept channels per layer (MACs kept {report.macs_ratio:.2f})")
    return save_figure(fig, path)


def plot_accuracy_vs_speedup(
    points: Sequence[tuple[str, float, float]],
    path: str | Path,
    baseline_accuracy: float | None = None,
    title: str = "accuracy vs measured onnxruntime speed-up",
) -> Path:
    """``points``: (label, measured speed-up, accuracy %); labels sharing the text before
    ' @' are drawn as one series (e.g. 'fine-tuned @0.5')."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for label, speedup, accuracy in points:
        name, _, tag = label.partition(" @")
        series.setdefault(name, []).append((speedup, accuracy, tag))
    for name, values in series.items():
        values.sort()
        ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=name)
        for x, y, tag in values:
            if tag:
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if baseline_accuracy is not None:
        ax.axhline(baseline_accuracy, color="grey", linestyle="--", label="dense")
        ax.axhline(baseline_accuracy - 1.0, color="grey", linestyle=":", label="dense - 1 pt")
    ax.set_xlabel("measured speed-up (onnxruntime, x)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)

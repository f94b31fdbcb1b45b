"""CompileReport: what compile did, measured — printable as a table, JSON-able."""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

RECORD = "_graphprune_record"  # plain-data record of what compile did, used by save()/load()
REPORT = "_graphprune_report"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 1)] + "…"


def _wrap(text: str, width: int, indent: int = 0) -> list[str]:
    pad = " " * indent
    return textwrap.wrap(text, width, initial_indent=pad, subsequent_indent=pad + "  ") or [pad]


@dataclass
class GroupOutcome:
    id: int
    name: str
    kind: str
    kept: int
    total: int


@dataclass
class UnitReport:
    """One pruning unit (a layer's output channels, or one concat slice): kept of total."""

    name: str
    group: int
    kind: str
    kept: int
    total: int
    multiplier: int = 1  # output channels per unit channel (conv groups held whole)


@dataclass
class FrozenGroup:
    """A group the plan would prune that compile kept whole, and why."""

    id: int
    name: str
    channels: int
    reason: str


@dataclass
class LayerSparsity:
    """A layer a sparse plan masked (pattern "unstructured"/"n:m"/"block") or left dense."""

    module: str
    pattern: str
    shape: list[int]
    sparsity: float  # zeroed fraction of the weight
    skipped: str = ""  # why it stays dense


@dataclass
class LayerFit:
    """How reconstruction changed one layer's output on the calibration data.

    Errors are relative: ||Y - Y_pruned||^2 / ||Y||^2 over every calibration row, where Y is
    the original layer's output (structured: on the original model's activations) and
    Y_pruned the pruned layer's, before and after its weights were updated.
    """

    module: str
    method: str  # "least squares", "sparsegpt", or "skipped"
    error_before: float
    error_after: float
    rows: int  # calibration rows (tokens or conv output positions) the fit used
    note: str = ""


@dataclass
class CompileReport:
    plan: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: list[GroupOutcome] = field(default_factory=list)
    units: list[UnitReport] = field(default_factory=list)  # per layer: kept / total channels
    frozen: list[FrozenGroup] = field(default_factory=list)  # kept whole by relations/retries
    notes: list[str] = field(default_factory=list)  # what the user should know (not errors)
    changes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    resolution: dict[str, Any] = field(default_factory=dict)  # Resolution.to_dict(): kept indices
    sparsity: list[LayerSparsity] = field(default_factory=list)  # masks of a sparse plan
    config: dict[str, Any] = field(default_factory=dict)  # HF models: graphprune.hf.ConfigSync
    reconstruction: list[LayerFit] = field(default_factory=list)  # Plan(reconstruct=True)
    latency: dict[str, Any] = field(default_factory=dict)  # latency_plan.LatencyOutcome

    @property
    def weight_sparsity(self) -> float:
        """Zeroed fraction of the masked layers' weights, all together."""
        sizes = [(math.prod(s.shape), s.sparsity) for s in self.sparsity if s.shape]
        total = sum(n for n, _ in sizes)
        return sum(n * z for n, z in sizes) / max(total, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(params_ratio=self.params_ratio, macs_ratio=self.macs_ratio)
        return data

    def table(self, max_groups: int = 20, width: int = 100) -> str:
        """The report as text: long names are shortened and prose wrapped to ``width``."""
        rows = [
            ("", "before", "after", "after/before"),
            (
                "params",
                f"{self.params_before:,}",
                f"{self.params_after:,}",
                f"{self.params_ratio:.3f}",
            ),
            ("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}", f"{self.macs_ratio:.3f}"),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        changed = [g for g in self.groups if g.kept < g.total]
        pruned_units = [u for u in self.units if u.kept < u.total]
        lines.append(
            f"groups pruned: {len(changed)} of {len(self.groups)} eligible"
            + (f"; layers pruned: {len(pruned_units)} of {len(self.units)}" if self.units else "")
            + (f"; blocks dropped: {len(self.dropped)}" if self.dropped else "")
        )
        if self.units:
            lines.append(f"  {'kept/total':>11}  {'group':>5}  layer (unit)")
            for u in self.units[:max_groups]:
                kept, total = u.kept * u.multiplier, u.total * u.multiplier
                unit = " (heads)" if u.kind != "channels" else ""
                head = f"  {kept:>5}/{total:<5} {u.group:>5}  "
                lines.append(head + _shorten(u.name + unit, width - len(head)))
            if len(self.units) > max_groups:
                lines.append(f"  … {len(self.units) - max_groups} more layers")
        else:
            for g in changed[:max_groups]:
                lines.append(f"  group {g.id:<3} {g.kind:<9} {g.kept:>5}/{g.total:<5} {g.name}")
            if len(changed) > max_groups:
                lines.append(f"  … {len(changed) - max_groups} more")
        for path in self.dropped:
            lines.append(f"  dropped {path}")
        if self.frozen:
            lines.append(f"frozen (not pruned, with why): {len(self.frozen)} groups")
            for f in self.frozen[:max_groups]:
                lines += _wrap(f"group {f.id} ({f.channels} ch, {f.name}): {f.reason}", width, 2)
        masked = [s for s in self.sparsity if s.shape]
        if self.sparsity:
            lines.append(
                f"masked layers: {len(masked)} ({self.weight_sparsity:.1%} of their weights "
                "zero; dense MACs unchanged: sparse kernels or storage, not dense speed)"
            )
        for s in self.sparsity[:max_groups]:
            detail = s.skipped or f"{s.pattern:<12} {s.sparsity:>6.1%} of {tuple(s.shape)}"
            lines.append(f"  {s.module:<32} {detail}")
        if self.config:
            updates = ", ".join(f"{k}={v}" for k, v in self.config["changes"].items()) or "none"
            lines.append(f"config ({self.config['family']}): {updates}")
            lines.append(
                "  save_pretrained/from_pretrained rebuilds it"
                if self.config["expressible"]
                else f"  config cannot express it: {self.config['reason']}"
            )
        if self.reconstruction:
            fitted = [f for f in self.reconstruction if f.method != "skipped"]
            lines.append(
                f"reconstructed layers: {len(fitted)} of {len(self.reconstruction)} "
                "(relative output error on the calibration data, before -> after)"
            )
            for fit in self.reconstruction[:max_groups]:
                detail = (
                    f"skipped: {fit.note}"
                    if fit.method == "skipped"
                    else f"{fit.method:<13} {fit.error_before:.2e} -> {fit.error_after:.2e}"
                    + (f"  ({fit.note})" if fit.note else "")
                )
                lines += _wrap(f"{_shorten(fit.module, 32):<32} {detail}", width, 2)
            if len(self.reconstruction) > max_groups:
                lines.append(f"  … {len(self.reconstruction) - max_groups} more layers")
        if self.latency:
            lines += _wrap(self._latency_line(), width)
        for n in self.notes:
            lines += _wrap(f"note: {n}", width)
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        lines += _wrap(f"stages: {stages}", width)
        return "\n".join(lines)

    def _latency_line(self) -> str:
        lat = self.latency
        rounds = lat["rounds"]
        base = lat["original_ms"]
        measured = ", ".join(f"{r['measured']:.3f}" for r in rounds)
        return (
            f"latency (onnxruntime, measured): target {lat['target']:.3f} of {base:.3f} ms, "
            f"predicted {lat['predicted']:.3f}, measured {lat['measured']:.3f} "
            f"({lat['measured'] * base:.3f} ms), round {lat['chosen'] + 1} of {len(rounds)} "
            f"(measured: {measured}); tables: "
            f"{lat['table_ops_measured']} ops timed in {lat['table_seconds']:.1f} s, "
            f"{lat['table_ops_cached']} from the cache; {lat['seconds']:.1f} s in all"
        )

    def __str__(self) -> str:
        return self.table()

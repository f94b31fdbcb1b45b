"""CompileReport: what compile did, measured -- typed parts, printable as a table, JSON-able
through ``to_dict()`` only."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graphprune.dictview import DictView
from graphprune.errors import InputError
from graphprune.hf import ConfigSync
from graphprune.oneshot.reconstruct import LayerFit
from graphprune.planning.resolve import Resolution, UnitOutcome

REPORT_ATTRIBUTE = "_graphprune_report"  # where a compiled model carries its report

UnitReport = UnitOutcome  # one pruning unit (a layer's output channels): kept of total


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
    resolution: Resolution = field(default_factory=Resolution)  # kept indices per group
    sparsity: list[LayerSparsity] = field(default_factory=list)  # masks of a sparse plan
    config: ConfigSync | None = None  # Hugging Face models: what the config says now
    reconstruction: list[LayerFit] = field(default_factory=list)  # Plan(reconstruct=True)
    latency: LatencyOutcome | None = None  # Plan(target_latency=...): predicted and measured

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
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data.update(config=data["config"] or {}, latency=data["latency"] or {})  # as ever
        data.update(params_ratio=self.params_ratio, macs_ratio=self.macs_ratio)
        return data

    def table(self, max_groups: int = 20, width: int = 100) -> str:
        """The report as text: long names are shortened and prose wrapped to ``width``."""
        lines = self._size_lines() + self._pruned_lines(max_groups, width)
        if self.frozen:
            lines.append(f"frozen (not pruned, with why): {len(self.frozen)} groups")
            for f in self.frozen[:max_groups]:
                lines += _wrap(f"group {f.id} ({f.channels} ch, {f.name}): {f.reason}", width, 2)
        lines += self._sparsity_lines(max_groups) + self._config_lines()
        lines += self._reconstruction_lines(max_groups, width)
        if self.latency is not None:
            lines += _wrap(self.latency.line(), width)
        for n in self.notes:
            lines += _wrap(f"note: {n}", width)
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return "\n".join(lines + _wrap(f"stages: {stages}", width))

    def _size_lines(self) -> list[str]:
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
        return [
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]

    def _pruned_lines(self, max_groups: int, width: int) -> list[str]:
        changed = [g for g in self.groups if g.kept < g.total]
        pruned_units = [u for u in self.units if u.kept < u.total]
        lines = [
            f"groups pruned: {len(changed)} of {len(self.groups)} eligible"
            + (f"; layers pruned: {len(pruned_units)} of {len(self.units)}" if self.units else "")
            + (f"; blocks dropped: {len(self.dropped)}" if self.dropped else "")
        ]
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
        return lines + [f"  dropped {path}" for path in self.dropped]

    def _sparsity_lines(self, max_groups: int) -> list[str]:
        if not self.sparsity:
            return []
        masked = [s for s in self.sparsity if s.shape]
        lines = [
            f"masked layers: {len(masked)} ({self.weight_sparsity:.1%} of their weights "
            "zero; dense MACs unchanged: sparse kernels or storage, not dense speed)"
        ]
        for s in self.sparsity[:max_groups]:
            detail = s.skipped or f"{s.pattern:<12} {s.sparsity:>6.1%} of {tuple(s.shape)}"
            lines.append(f"  {s.module:<32} {detail}")
        return lines

    def _config_lines(self) -> list[str]:
        if self.config is None:
            return []
        updates = ", ".join(f"{k}={v}" for k, v in self.config.changes.items()) or "none"
        return [
            f"config ({self.config.family}, {self.config.mode}): {updates}",
            "  save_pretrained/from_pretrained rebuilds it"
            if self.config.expressible
            else f"  config cannot express it: {self.config.reason}",
        ]

    def _reconstruction_lines(self, max_groups: int, width: int) -> list[str]:
        if not self.reconstruction:
            return []
        fitted = [f for f in self.reconstruction if f.method != "skipped"]
        lines = [
            f"reconstructed layers: {len(fitted)} of {len(self.reconstruction)} "
            "(relative output error on the calibration data, before -> after)"
        ]
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
        return lines

    def __str__(self) -> str:
        return self.table()


@dataclass
class LatencyRound:
    """One measure-and-correct round of a latency-targeted compile."""

    budget: float  # the ratio the allocator was given
    predicted: float
    measured: float
    macs_ratio: float


@dataclass
class LatencyOutcome(DictView):
    """What a latency-targeted compile predicted and measured, round by round."""

    target: float  # ratio of the original's measured latency
    original_ms: float
    rounds: list[LatencyRound]
    chosen: int
    table_ops_measured: int
    table_ops_cached: int
    table_seconds: float
    seconds: float
    runtime: str = "onnxruntime"  # where it was measured (Plan.latency_runtime)

    @property
    def measured(self) -> float:
        return self.rounds[self.chosen].measured

    @property
    def predicted(self) -> float:
        return self.rounds[self.chosen].predicted

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(measured=self.measured, predicted=self.predicted)
        return data

    def line(self) -> str:
        base = self.original_ms
        measured = ", ".join(f"{r.measured:.3f}" for r in self.rounds)
        return (
            f"latency ({self.runtime}, measured): target {self.target:.3f} of {base:.3f} ms, "
            f"predicted {self.predicted:.3f}, measured {self.measured:.3f} "
            f"({self.measured * base:.3f} ms), round {self.chosen + 1} of {len(self.rounds)} "
            f"(measured: {measured}); tables: {self.table_ops_measured} ops timed in "
            f"{self.table_seconds:.1f} s, {self.table_ops_cached} from the cache; "
            f"{self.seconds:.1f} s in all"
        )


def _plain(value: Any) -> Any:
    """The JSON form of a report field: parts by their own ``to_dict``, lists item by item."""
    if isinstance(value, DictView):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def attach_report(model: nn.Module, report: CompileReport) -> None:
    object.__setattr__(model, REPORT_ATTRIBUTE, report)  # a plain attribute, not a submodule


def report(model: nn.Module) -> CompileReport:
    """The report of the :func:`graphprune.compile` call that produced ``model``."""
    found = getattr(model, REPORT_ATTRIBUTE, None)
    if not isinstance(found, CompileReport):
        raise InputError("this model was not produced by graphprune.compile (no report)")
    return found

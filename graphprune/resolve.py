"""Resolve a Plan and importance scores into concrete kept channel indices per group."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from graphprune.analysis import DependencyGraph, Group, Member
from graphprune.plan import Plan, keep_count

KINDS_FOR = {"channels": {"channels"}, "heads": {"heads", "kv_heads"}}


@dataclass
class Resolution:
    """Kept channel indices for every group a plan touches (plain data, JSON-able)."""

    kept: dict[int, list[int]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)

    @property
    def changed(self) -> dict[int, list[int]]:
        return {g: k for g, k in self.kept.items() if len(k) < self.sizes[g]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": {str(g): k for g, k in self.kept.items()},
            "sizes": {str(g): s for g, s in self.sizes.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resolution:
        return cls(
            {int(g): [int(c) for c in k] for g, k in data["kept"].items()},
            {int(g): int(s) for g, s in data["sizes"].items()},
        )


def is_output_dim(module: nn.Module | None, member: Member) -> bool:
    """Does this member hold the channels ``module`` *produces* (vs. the ones it reads)?"""
    name = member.fqn.rpartition(".")[2]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return name == "bias" or member.dim == 1
    if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        return name == "bias" or member.dim == 0
    if isinstance(module, nn.Embedding):
        return member.dim == 1
    if isinstance(module, nn.MultiheadAttention):
        return name.startswith("in_proj") and member.dim == 0
    return True  # norms, PReLU, standalone parameters: per-channel of what flows through


def producers(group: Group, modules: dict[str, nn.Module]) -> list[str]:
    """Modules (or standalone parameters) whose output channels are this group."""
    names = []
    for m in group.members:
        if is_output_dim(modules.get(m.module), m):
            names.append(m.module if m.module in modules and m.module else m.fqn)
    return sorted(set(names))


def eligible_groups(dg: DependencyGraph, plan: Plan, modules: dict[str, nn.Module]) -> list[Group]:
    kinds = KINDS_FOR.get(plan.granularity, set())
    out = []
    for g in dg.groups:
        if not g.prunable or g.kind not in kinds or plan.ignores(producers(g, modules)):
            continue
        if plan.granularity == "heads":
            plan.check_heads(g.size, ", ".join(producers(g, modules)) or g.name)
        out.append(g)
    return out


def _top(scores: np.ndarray, keep: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def _no_empty_members(group: Group, kept: list[int], scores: np.ndarray) -> list[int]:
    """Every member keeps at least one of its channels (a concat part must not vanish)."""
    chosen = set(kept)
    for m in group.members:
        used = set(m.index_map[m.index_map >= 0].tolist())
        if used and not used & chosen:
            chosen.add(max(used, key=lambda c: (scores[c], -c)))
    return sorted(chosen)


def resolve(
    plan: Plan,
    dg: DependencyGraph,
    groups: list[Group],
    scores: dict[int, np.ndarray],
    modules: dict[str, nn.Module],
) -> Resolution:
    """Kept indices per group: same ratio per group (local) or ranked across groups (global)."""
    resolution = Resolution(sizes={g.id: g.size for g in groups})
    ratio = plan.ratio or 0.0
    pooled: list[Group] = []
    for g in groups:
        group_ratio = plan.ratio_for(producers(g, modules))
        if plan.scope == "global" and group_ratio == ratio:
            pooled.append(g)
            continue
        keep = keep_count(g.size, group_ratio, plan.channel_multiple, plan.min_channels)
        resolution.kept[g.id] = _top(scores[g.id], keep)
    if pooled:
        resolution.kept.update(_global(plan, pooled, scores, ratio))
    for g in groups:
        resolution.kept[g.id] = _no_empty_members(g, resolution.kept[g.id], scores[g.id])
    _no_empty_dims(dg, resolution.kept, scores)
    return resolution


def _global(
    plan: Plan, groups: list[Group], scores: dict[int, np.ndarray], ratio: float
) -> dict[int, list[int]]:
    """Remove the globally least important channels, scores normalised per group."""
    total = sum(g.size for g in groups)
    budget = math.floor(ratio * total + 1e-9)
    ranked: list[tuple[float, int, int]] = []
    for g in groups:
        s = scores[g.id]
        normalised = s / s.mean() if s.mean() > 0 else s
        ranked.extend((float(v), g.id, c) for c, v in enumerate(normalised))
    ranked.sort()
    limit = {
        g.id: min(math.floor(plan.max_ratio * g.size), g.size - min(g.size, plan.min_channels))
        for g in groups
    }
    removed: dict[int, set[int]] = {g.id: set() for g in groups}
    count = 0
    for _, gid, c in ranked:
        if count >= budget:
            break
        if len(removed[gid]) < limit[gid]:
            removed[gid].add(c)
            count += 1
    kept: dict[int, list[int]] = {}
    for g in groups:
        keep = keep_count(
            g.size, len(removed[g.id]) / g.size, plan.channel_multiple, plan.min_channels
        )
        kept[g.id] = _top(scores[g.id], keep)
    return kept


def _no_empty_dims(
    dg: DependencyGraph, kept: dict[int, list[int]], scores: dict[int, np.ndarray]
) -> None:
    """No tensor dim may lose every position. A position of a composite dim (a grouped conv's
    (group, k) channel, a qkv row's (head, d)) survives only if *all* its channels do, so
    per-group choices can jointly empty a dim (e.g. a split of a grouped conv's output):
    put back the best-scoring position's channels until every dim keeps one."""
    rows_per_dim = [dg.position_channels(f, d) for f, d in dg.member_dims()]
    rows_per_dim += [c.positions for c in dg.shape_constants if c.per == "size"]
    changed = True
    while changed:
        changed = False
        sets = {g: set(k) for g, k in kept.items()}
        for all_rows in rows_per_dim:
            rows = [r for r in all_rows if r]
            if not rows or any(all(c in sets.get(g, {c}) for g, c in r) for r in rows):
                continue
            best = max(rows, key=lambda r: sum(float(scores[g][c]) for g, c in r if g in scores))
            for g, c in best:
                if g in sets and c not in sets[g]:
                    sets[g].add(c)
                    kept[g] = sorted(sets[g])
                    changed = True

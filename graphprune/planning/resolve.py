"""Resolve a Plan and importance scores into concrete kept channel indices per group.

1. **Units.** Each eligible group is split into pruning units
   (:mod:`graphprune.planning.units`): the channels one layer (or one set of layers)
   produces. Outer factors of composite outputs (conv groups, norm groups) are held whole so
   that a ratio is never compounded.
2. **Local scope.** Every unit keeps ``keep_count(size, ratio)`` of its best-scoring channels:
   rounded *up* so that the layer width is a multiple of ``round_to`` (a unit narrower than
   ``round_to`` is left whole), never below ``min_channels``. ``overrides``/``ignore`` name the
   unit's layers.
3. **Global scope.** Channels are ranked across units by their score normalised by the group's
   mean; at most ``max_ratio`` of any unit is removed; the budget counts layer width.
4. **Scores** are per group channel and sum over *every* member of the group, so the layers a
   group couples agree on what to keep.
5. **Safety.** No member loses all its channels (a concat part must not vanish) and no tensor
   dimension empties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from graphprune.analysis import DependencyGraph, Group
from graphprune.analysis.graph import HEAD_KIND_PRIORITY
from graphprune.analysis.rules_layers import DEFAULT_SCALE_NOTE
from graphprune.dictview import DictView
from graphprune.hf import is_pretrained
from graphprune.planning.plan import Plan, keep_count
from graphprune.planning.units import Unit, Units, is_output_dim, producers, pruning_units

KINDS_FOR = {"channels": {"channels"}, "heads": {"heads", "kv_heads"}}

__all__ = [
    "ATTENTION_KINDS",
    "KINDS_FOR",
    "Resolution",
    "UnitOutcome",
    "attention_kinds",
    "candidate_groups",
    "eligible_groups",
    "is_output_dim",
    "producers",
    "resolve",
    "unit_keep",
]


@dataclass
class UnitOutcome:
    """How many channels one unit (layer) kept."""

    name: str
    group: int
    kind: str
    kept: int
    total: int
    multiplier: int = 1

    @property
    def width(self) -> tuple[int, int]:
        """Kept and total output channels of the layer."""
        return self.kept * self.multiplier, self.total * self.multiplier


@dataclass(eq=True)
class Resolution(DictView):
    """Kept channel indices for every group a plan touches (plain data, JSON-able), and how
    many channels each unit kept."""

    kept: dict[int, list[int]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    units: list[UnitOutcome] = field(default_factory=list)
    held: dict[int, str] = field(default_factory=dict)  # group id -> why it was kept whole
    # module attributes behind shape constants: (module path, name, index or -1) -> value
    attributes: dict[tuple[str, str, int], int] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)  # group id -> why it is not pruned
    driven: dict[int, str] = field(default_factory=dict)  # group id -> relation that sized it
    unit_channels: list[list[int]] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list, repr=False)  # (the report's, not the record's)

    @property
    def changed(self) -> dict[int, list[int]]:
        return {g: k for g, k in self.kept.items() if len(k) < self.sizes[g]}

    def refresh_units(self) -> None:
        """Recount each unit's kept channels (after the relation solver moved groups)."""
        sets = {g: set(k) for g, k in self.kept.items()}
        for u, channels in zip(self.units, self.unit_channels, strict=True):
            u.kept = len(sets.get(u.group, set(channels)).intersection(channels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": {str(g): k for g, k in self.kept.items()},
            "sizes": {str(g): s for g, s in self.sizes.items()},
            "units": [vars(u) for u in self.units],
            "held": {str(g): why for g, why in self.held.items()},
            "attributes": [[p, n, i, v] for (p, n, i), v in sorted(self.attributes.items())],
            "frozen": {str(g): why for g, why in self.frozen.items()},
            "driven": {str(g): why for g, why in self.driven.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resolution:
        return cls(
            {int(g): [int(c) for c in k] for g, k in data["kept"].items()},
            {int(g): int(s) for g, s in data["sizes"].items()},
            [UnitOutcome(**u) for u in data.get("units", [])],
            {int(g): str(why) for g, why in data.get("held", {}).items()},
            {(str(p), str(n), int(i)): int(v) for p, n, i, v in data.get("attributes", [])},
            {int(g): str(why) for g, why in data.get("frozen", {}).items()},
            {int(g): str(why) for g, why in data.get("driven", {}).items()},
        )


def candidate_groups(
    dg: DependencyGraph, plan: Plan, model: nn.Module | None = None
) -> list[Group]:
    """Prunable groups of the kinds the plan's granularity prunes; for channels, with the
    attention groups :func:`attention_kinds` picks for ``model`` (in a model built from a
    config, heads only where the residual width they sit in is pruned too: the config states
    hidden / heads, and heads alone would change it)."""
    kinds = set(KINDS_FOR.get(plan.granularity, set()))
    found = [g for g in dg.groups if g.prunable and g.kind in kinds]
    if plan.granularity != "channels":
        return found
    configured = model is not None and is_pretrained(model)
    attention = attention_kinds(dg, plan.attention, configured)
    extra = [g for g in dg.groups if g.prunable and g.kind in attention]
    if configured and plan.attention == "auto":
        by_dim: dict[tuple[str, int], list[Group]] = {}
        for g in dg.groups:
            for m in g.members:
                by_dim.setdefault((m.fqn, m.dim), []).append(g)
        extra = [g for g in extra if _residual_prunable(g, by_dim)]
    return sorted(found + extra, key=lambda g: g.id)


MAX_RANK = 8  # tensor dims looked at beside a member's own
ATTENTION_KINDS = frozenset(HEAD_KIND_PRIORITY)  # heads, kv heads, heads per kv, head_dim


def _residual_prunable(group: Group, by_dim: dict[tuple[str, int], list[Group]]) -> bool:
    """Every channel group on the other dims of ``group``'s weights (the residual width q/k/v
    read and the output projection writes) is prunable. ``by_dim``: (FQN, dim) -> groups."""
    residual = [
        other
        for m in group.members
        if m.is_parameter
        for dim in range(MAX_RANK)
        if dim != m.dim
        for other in by_dim.get((m.fqn, dim), [])
        if other.kind not in ATTENTION_KINDS
    ]
    return bool(residual) and all(g.prunable for g in residual)


def attention_kinds(dg: DependencyGraph, attention: str, configured: bool) -> set[str]:
    """The group kinds through which a channel plan narrows attention (``Plan.attention``).
    "auto" prunes head_dim channel by channel where nothing else depends on head_dim's size,
    and whole heads where something does: a config (``configured``: heads halved with the
    hidden size keep hidden / heads, which every config can state), a rotary table built from
    head_dim (a pruned model would keep a subset of its frequencies), or attention's default
    scale 1/sqrt(head_dim), which would change with it (the pruned model would no longer
    compute the original's scores minus the removed channels)."""
    if attention == "keep":
        return set()
    if attention == "heads":
        return set(KINDS_FOR["heads"])
    if attention == "head_dim":
        return {"head_dim"}
    sized = any(
        any(not m.is_parameter for m in g.members)
        or any(DEFAULT_SCALE_NOTE in note for note in g.notes)
        for g in dg.groups
        if g.kind == "head_dim"
    )
    return set(KINDS_FOR["heads"]) if configured or sized else {"head_dim"}


def eligible_groups(dg: DependencyGraph, plan: Plan, modules: dict[str, nn.Module]) -> list[Group]:
    """Candidate groups none of whose producing modules the plan ignores."""
    found = candidate_groups(dg, plan, modules.get(""))
    return [g for g in found if not plan.ignores(producers(g, modules))]


def unit_keep(unit: Unit, ratio: float, plan: Plan) -> int:
    """Channels ``unit`` keeps when it loses ``ratio`` of them (rule 2 of the docstring)."""
    if unit.kind != "channels":  # heads: whole heads, no SIMD rounding
        return keep_count(unit.size, ratio, 1, 1)
    block = plan.channel_multiple
    if ratio <= 0.0 or unit.width < block:
        return unit.size
    floor = max(1, math.ceil(plan.min_channels / unit.multiplier))
    return keep_count(unit.size, ratio, unit.rounding(block), floor)


def _top(scores: np.ndarray, channels: list[int], keep: int) -> list[int]:
    order = sorted(channels, key=lambda c: (-scores[c], c))
    return sorted(order[:keep])


def resolve(
    plan: Plan,
    dg: DependencyGraph,
    groups: list[Group],
    scores: dict[int, np.ndarray],
    modules: dict[str, nn.Module],
    *,
    units: Units | None = None,
    ties: Sequence[tuple[list[str], list[int]]] = (),
) -> Resolution:
    """Kept indices per group: the same ratio in every unit (local) or ranked across units
    (global). ``groups`` are the candidates (:func:`candidate_groups`); ``ties``: (config
    fields, groups) that keep one fraction (:mod:`graphprune.planning.config_ties`)."""
    if units is None:
        units = pruning_units(dg, groups, modules, plan.ratio or 0.0, plan.channel_multiple)
    resolution = Resolution(sizes={g.id: g.size for g in groups}, held=dict(units.held))
    ratio = plan.ratio or 0.0
    unit_kept: dict[int, list[int]] = {}
    pooled: list[Unit] = []
    for u in units.units:
        if plan.ignores(u.names):
            unit_kept[u.id] = list(u.channels)
            continue
        unit_ratio = plan.ratio_for(u.names, u.name)
        if plan.granularity == "heads":
            plan.check_heads(u.size, u.name, unit_ratio)
        if plan.scope == "global" and unit_ratio == ratio:
            pooled.append(u)
            continue
        unit_kept[u.id] = _top(scores[u.group], u.channels, unit_keep(u, unit_ratio, plan))
    if pooled:
        unit_kept.update(_global(plan, pooled, scores, ratio))
    notes = [_even_out(fields, tied, units, unit_kept, scores, plan) for fields, tied in ties]
    by_group: dict[int, list[int]] = {g.id: [] for g in groups}
    for u in units.units:
        by_group[u.group].extend(unit_kept[u.id])
    for g in groups:
        if g.id in units.held:
            by_group[g.id] = list(range(g.size))
        resolution.kept[g.id] = _no_empty_members(g, sorted(by_group[g.id]), scores[g.id])
    _no_empty_dims(dg, resolution.kept, scores)
    resolution.units = [
        UnitOutcome(u.name, u.group, u.kind, 0, u.size, u.multiplier) for u in units.units
    ]
    resolution.unit_channels = [list(u.channels) for u in units.units]
    resolution.refresh_units()
    resolution.notes = [n for n in notes if n]
    return resolution


def _even_out(
    fields: list[str],
    groups: list[int],
    units: Units,
    unit_kept: dict[int, list[int]],
    scores: dict[int, np.ndarray],
    plan: Plan,
) -> str:
    """Give every unit of ``groups`` (tied by the config ``fields``) one kept fraction: the
    fraction of the narrowest unit after the units' mean request, scaled exactly to the others
    (a 4 x wide FFN keeps 4 x the channels). '' when they already agree, else what changed."""
    tied = [u for g in groups for u in units.of_group(g) if u.id in unit_kept]
    if len(tied) < 2:
        return ""
    fractions = {len(unit_kept[u.id]) / u.size for u in tied}
    if max(fractions) - min(fractions) < 1e-9:
        return ""
    asked = sorted({len(unit_kept[u.id]) for u in tied})
    mean = sum(len(unit_kept[u.id]) for u in tied) / sum(u.size for u in tied)
    narrowest = min(tied, key=lambda u: u.size)
    anchor = unit_keep(narrowest, 1.0 - mean, plan)
    for u in tied:
        keep = anchor * u.size / narrowest.size
        count = round(keep) if abs(keep - round(keep)) < 1e-9 else unit_keep(u, 1.0 - mean, plan)
        unit_kept[u.id] = _top(scores[u.group], u.channels, max(1, min(u.size, count)))
    widths = sorted({len(unit_kept[u.id]) for u in tied})
    return (
        f"config: {', '.join(fields)} {'holds' if len(fields) == 1 else 'hold'} one value for "
        f"{len(tied)} layers, which the plan asked to keep {asked[0]}..{asked[-1]} of; they "
        f"keep {'/'.join(map(str, widths))} so that from_pretrained rebuilds the model "
        "(Plan(config='free') keeps per-layer widths, saved with graphprune.save)"
    )


def _global(
    plan: Plan, units: list[Unit], scores: dict[int, np.ndarray], ratio: float
) -> dict[int, list[int]]:
    """Remove the globally least important channels, scores normalised per group; the budget
    counts layer width, at most ``max_ratio`` of a unit goes, units narrower than
    ``round_to`` stay whole."""
    block = plan.channel_multiple
    kept: dict[int, list[int]] = {}
    ranked_units = []
    for u in units:
        if u.kind == "channels" and u.width < block:
            kept[u.id] = list(u.channels)
        else:
            ranked_units.append(u)
    total = sum(u.width for u in ranked_units)
    budget = math.floor(ratio * total + 1e-9)
    ranked: list[tuple[float, int, int]] = []
    by_id = {u.id: u for u in ranked_units}
    for u in ranked_units:
        s = scores[u.group]
        mean = float(s.mean()) if s.size else 0.0
        normalised = s / mean if mean > 0 else s
        ranked.extend((float(normalised[c]), u.id, c) for c in u.channels)
    ranked.sort()
    limit = {
        u.id: min(math.floor(plan.max_ratio * u.size), u.size - unit_keep(u, plan.max_ratio, plan))
        for u in ranked_units
    }
    removed = {u.id: 0 for u in ranked_units}
    count = 0
    for _, uid, _c in ranked:
        if count >= budget:
            break
        if removed[uid] < limit[uid]:
            removed[uid] += 1
            count += by_id[uid].multiplier
    for u in ranked_units:
        keep = unit_keep(u, removed[u.id] / u.size, plan)
        kept[u.id] = _top(scores[u.group], u.channels, keep)
    return kept


def _no_empty_members(group: Group, kept: list[int], scores: np.ndarray) -> list[int]:
    """Every member keeps at least one of its channels (a concat part must not vanish)."""
    chosen = set(kept)
    for m in group.members:
        used = set(m.index_map[m.index_map >= 0].tolist())
        if used and not used & chosen:
            chosen.add(max(used, key=lambda c: (scores[c], -c)))
    return sorted(chosen)


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

"""Config ties: the widths one config field holds move together (``Plan(config="expressible")``).

A transformers model is rebuilt by ``from_pretrained`` from its config, and a config holds one
int per field: ``intermediate_size`` is every layer's FFN width, ``num_key_value_heads`` every
layer's kv head count, ``hidden_sizes[2]`` the width of stage 2. The shape map of
:mod:`graphprune.hf` says which parameter dims each field sizes (its *footprint*); the analysis
says which groups make up each dim. Together they give, with no per-family table:

1. **Ties.** A group that alone sizes a footprint dim (the only pruned factor of it: the heads
   group of ``q_proj``'s (heads x head_dim) rows under a heads plan) keeps the fraction of its
   channels that the field keeps of its value. Every group tied to one field keeps the same
   fraction: all the FFN groups of a LLaMA, a ConvNeXt stage's residual and its 4 x wide FFN.
2. **Pins.** A field one of whose footprint dims cannot change (no pruned group sizes it: a
   base model's output width, a parameter the forward never reads) keeps its value, and the
   groups that alone size one of its dims are kept whole -- unless another field of that dim
   can change (DINOv2's FFN is ``hidden_size x mlp_ratio``: a pinned hidden size leaves the
   ratio to say it).

Ties and pins never guess: a dim two pruned groups share (head_dim mode's q rows) or two free
fields size constrains nothing here, and the config sync after the rewrite still checks that
the config rebuilds the model (and says why not).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from graphprune.analysis import DependencyGraph, Group
from graphprune.analysis.graph import HEAD_KIND_PRIORITY
from graphprune.hf import LAYER_FIELDS, is_pretrained, shape_map

HEAD_KINDS = frozenset(HEAD_KIND_PRIORITY)
UNPLANNED = "not pruned by this plan"


@dataclass
class ConfigTies:
    """Groups that must keep one fraction (one class per set of tied fields), and groups a
    pinned field keeps whole."""

    classes: list[tuple[list[str], list[int]]] = field(default_factory=list)  # (fields, groups)
    pinned: dict[int, str] = field(default_factory=dict)  # group id -> why it is kept whole


def config_ties(model: nn.Module, dg: DependencyGraph, candidates: list[Group]) -> ConfigTies:
    """The ties and pins of ``model``'s config over ``candidates`` (the groups a plan may
    prune); empty for a model that is not built from a config or whose class cannot be built
    on the meta device."""
    if not is_pretrained(model):
        return ConfigTies()
    config = getattr(model, "config", None)
    found = shape_map(type(model), config) if config is not None else None
    if found is None:
        return ConfigTies()
    pruned = {g.id: g for g in candidates}
    names = {g.id: g.name for g in dg.groups}
    member_dims = set(dg.member_dims())
    # per footprint dim: field -> the pruned group that sizes it for that field (None: none
    # does; -1: several might), and the fields one of whose dims no pruned group sizes
    sized: dict[tuple[str, int], dict[str, int | None]] = defaultdict(dict)
    factors_of: dict[tuple[str, int], set[int]] = {}  # dim -> its pruned factors
    fixed_why: dict[str, str] = {}
    for name, footprint in found.footprints.items():
        if name in LAYER_FIELDS:
            continue
        for key in footprint.dims:
            if key not in factors_of:
                factors_of[key] = _pruned_factors(dg, key, pruned, member_dims)
            factors = factors_of[key]
            sized[key][name] = _factor_for(factors, pruned, footprint.value)
            if not factors and _better_reason(dg, key, member_dims, fixed_why.get(name)):
                fixed_why[name] = _fixed(dg, key, member_dims, names)
    ties = ConfigTies()
    tied: dict[int, list[str]] = defaultdict(list)
    for key, per_field in sized.items():
        free = [f for f in per_field if f not in fixed_why]
        if not free:  # the dim keeps its size: whatever prunes it would break the config
            f = next(iter(per_field))
            for g in factors_of[key]:
                ties.pinned.setdefault(
                    g,
                    f"config: {type(config).__name__}.{f} sizes {key[0]} (dim {key[1]}) and "
                    f"cannot change: {fixed_why[f]} (Plan(config='free') prunes it, saved with "
                    "graphprune.save)",
                )
            continue
        for f in free:
            sizer = per_field[f]
            if sizer is not None and sizer >= 0 and f not in tied[sizer]:
                tied[sizer].append(f)
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    live = {g: fs for g, fs in tied.items() if fs and g not in ties.pinned}
    for fs in live.values():
        for f in fs[1:]:
            parent[root(f)] = root(fs[0])
    by_root: dict[str, tuple[set[str], set[int]]] = {}
    for g, fs in live.items():
        entry = by_root.setdefault(root(fs[0]), (set(), set()))
        entry[0].update(fs)
        entry[1].add(g)
    ties.classes = [(sorted(fs), sorted(gs)) for fs, gs in by_root.values() if len(gs) > 1]
    return ties


def _pruned_factors(
    dg: DependencyGraph, key: tuple[str, int], pruned: dict[int, Group],
    member_dims: set[tuple[str, int]],
) -> set[int]:  # fmt: skip
    """The pruned groups among the factors of dim ``key``."""
    if key not in member_dims:
        return set()
    return {g for pattern in dg.factor_patterns(*key) for g in pattern if g in pruned}


def _factor_for(factors: set[int], pruned: dict[int, Group], value: int) -> int | None:
    """The one pruned factor a field sizes: the only one, or among several the one head
    group that counts the field's value (``k_proj`` rows are kv heads x head_dim, and a
    rotary half-dim group may be pruned too); None for none, -1 where it stays ambiguous."""
    if not factors:
        return None
    if len(factors) == 1:
        return next(iter(factors))
    counting = [g for g in factors if pruned[g].kind in HEAD_KINDS and pruned[g].size == value]
    return counting[0] if len(counting) == 1 else -1


def _better_reason(
    dg: DependencyGraph, key: tuple[str, int], member_dims: set[tuple[str, int]],
    current: str | None,
) -> bool:  # fmt: skip
    """Whether dim ``key`` explains a fixed field better than ``current``: any reason beats
    none, and a group's own frozen reason (the model's output) beats "not pruned by this
    plan"."""
    if current is None:
        return True
    if UNPLANNED not in current or key not in member_dims:
        return False
    return any(dg.group(g).frozen_reasons for p in dg.factor_patterns(*key) for g in p)


def _fixed(
    dg: DependencyGraph, key: tuple[str, int], member_dims: set[tuple[str, int]],
    names: dict[int, str],
) -> str:  # fmt: skip
    """Why dim ``key`` keeps its size."""
    fqn, dim = key
    if key not in member_dims:
        return f"{fqn} (dim {dim}) is in no channel group (the forward does not prune it)"
    groups = sorted({g for pattern in dg.factor_patterns(*key) for g in pattern})
    reasons = {g: dg.group(g).frozen_reasons for g in groups}
    whys = [f"{names[g]} ({reasons[g][0] if reasons[g] else UNPLANNED})"
            for g in groups]  # fmt: skip
    return f"{fqn} (dim {dim}) belongs to {'; '.join(whys)}"

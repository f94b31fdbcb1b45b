"""Pruning units: the per-layer pieces of a group that a plan's ratio applies to.

A group (:class:`graphprune.Group`) is a channel *space*: everything coupled to everything else.
That is the right object for removing channels consistently, but not for saying how many: a
DenseNet block's whole concatenation is one group, and "remove half of it" could take every
channel of one layer and none of another. A *unit* is what a user means by "a layer's
channels":

1. **Producers.** The channels of a group are partitioned by the set of layers that produce
   them (members holding a layer's *output* channels: conv/linear rows, norm affine terms,
   standalone parameters). A residual stage is one unit (every block writes every channel);
   each concatenated layer of a DenseNet block is its own unit with its own offsets.
2. **Composite outputs are not compounded.** A grouped conv's output channel is the pair
   (conv group, channel within group), GroupNorm's is (norm group, channel within group): two
   groups. Pruning both by ``ratio`` would remove ``1 - (1 - ratio)^2`` of the layer. The outer
   factor is *held* (kept whole) and the inner one carries the ratio, so the layer loses
   exactly ``ratio`` of its channels. A unit's ``multiplier`` is how many output positions each
   of its channels occupies (the number of conv groups): rounding applies to the layer width.
3. **Grouped convs keep whole SIMD blocks per conv group.** onnxruntime runs a grouped conv in
   its blocked NCHWc layout only when each conv group's channels are a multiple of the block
   (RegNet's 16 per group with AVX-512); 8 per group falls back to a plain NCHW kernel with
   layout reorders around it, which costs more than the pruned channels save. So the
   channels within a conv group round to ``block`` itself, not to ``block / groups``, and where
   that leaves no room inside a group, whole groups are removed (rule 2's inner factor held).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from graphprune.analysis import DependencyGraph, Group, Member
from graphprune.planning.plan import keep_count


@dataclass
class Unit:
    """Channels of one group that the same layers produce."""

    id: int
    group: int
    channels: list[int]  # channel indices of the group, ascending
    producers: list[str]  # modules (or standalone tensors) writing these channels
    layers: list[str]  # the producers that are layers with a weight matrix: the unit's name
    multiplier: int = 1  # output positions per channel in the producing layer (conv groups)
    kind: str = "channels"
    conv_grouped: bool = False  # channels within the groups of a grouped (not depthwise) conv

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def width(self) -> int:
        """Channels of the producing layer's output that this unit covers."""
        return self.size * self.multiplier

    @property
    def name(self) -> str:
        return ", ".join(self.layers or self.producers) or f"group {self.group}"

    @property
    def names(self) -> list[str]:
        """What ``ignore``/``overrides`` globs are matched against."""
        return self.layers or self.producers

    def rounding(self, round_to: int) -> int:
        """Channel step that keeps the layer width a multiple of ``round_to`` (and each conv
        group's channels, where the group holds a block: rule 3 of the module docstring)."""
        return part_step(self.size, self.multiplier, round_to, self.conv_grouped)


def part_step(size: int, parts: int, block: int, conv_grouped: bool) -> int:
    """Rounding step of a factor of ``size`` channels repeated in ``parts`` parts."""
    if conv_grouped and size >= block:
        return block
    return block // math.gcd(block, parts)


def is_grouped_conv(module: nn.Module | None) -> bool:
    """A conv with several groups of several channels each (not depthwise)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.in_channels != module.groups
    )


@dataclass
class Units:
    """The units of a set of groups, and the groups held whole (with why)."""

    units: list[Unit] = field(default_factory=list)
    held: dict[int, str] = field(default_factory=dict)  # group id -> reason

    def of_group(self, group_id: int) -> list[Unit]:
        return [u for u in self.units if u.group == group_id]


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
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight (in, out)
        return name == "bias" or member.dim == 1
    return True  # norms, PReLU, standalone parameters: per-channel of what flows through


def owner_name(member: Member, modules: dict[str, nn.Module]) -> str:
    """The module a member belongs to, or the tensor itself when it is a standalone
    parameter of the root (a cls token, a layer scale on the root module)."""
    return member.module if member.module and member.module in modules else member.fqn


def _is_layer(module: nn.Module | None, member: Member) -> bool:
    """A layer with a weight matrix (conv, linear, embedding, attention projections)."""
    if module is None or not member.is_parameter:
        return False
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = getattr(module, "in_proj_weight", None)
    return getattr(weight, "ndim", 0) >= 2


def producers(group: Group, modules: dict[str, nn.Module]) -> list[str]:
    """Modules (or standalone parameters) whose output channels are this group."""
    return sorted(
        {owner_name(m, modules) for m in group.members if is_output_dim(modules.get(m.module), m)}
    )


def _kept_fraction(size: int, other: int, ratio: float, block: int, conv_grouped: bool) -> float:
    """Fraction of a composite layer kept when a factor of ``size`` (the other factor being
    ``other``) carries the ratio, with the layer width rounded to ``block``."""
    if size * other < block:
        return 1.0
    return keep_count(size, ratio, part_step(size, other, block, conv_grouped)) / size


def conv_group_inners(
    dg: DependencyGraph, groups: list[Group], modules: dict[str, nn.Module]
) -> set[int]:
    """Groups that are the channels *within* the conv groups of a grouped conv (rule 3 of the
    module docstring): the inner factor of its weight's output dim (groups x out-per-group)
    and the groups of its weight's input dim (in-per-group)."""
    eligible = {g.id for g in groups}
    inners: set[int] = set()
    for g in groups:
        for m in g.members:
            if m.dim > 1 or not is_grouped_conv(modules.get(m.module)):
                continue
            for pattern in dg.factor_patterns(m.fqn, m.dim):
                factors = [gid for gid in pattern if gid in eligible]
                if factors and (m.dim == 1 or len(factors) > 1):
                    inners.add(factors[-1])
    return inners


def held_groups(
    dg: DependencyGraph,
    groups: list[Group],
    conv_grouped: set[int],
    ratio: float = 0.5,
    block: int = 1,
) -> dict[int, str]:
    """Factors of composite dims kept whole so that one factor alone carries the plan's ratio
    (rule 2 of the module docstring). By default the outer factor (conv groups, norm groups)
    is held and channels are removed inside each part; where rounding to ``block`` would stop
    that (16 channels per group, block 16) but removing whole parts reaches the ratio, the
    inner factors are held instead. ``conv_grouped``: the inner factors that are channels
    within conv groups (:func:`conv_group_inners`), which round per group."""
    eligible = {g.id for g in groups}
    sizes = {g.id: g.size for g in groups}
    pairs: dict[int, dict[int, str]] = defaultdict(dict)  # outer -> inner -> member label
    alone: set[int] = set()  # groups that are a tensor dim's only factor somewhere
    for g in groups:
        for m in g.members:
            for pattern in dg.factor_patterns(m.fqn, m.dim):
                factors = [gid for gid in pattern if gid in eligible]
                if len(factors) == 1:
                    alone.add(factors[0])
                for outer in factors[:-1]:
                    pairs[outer].setdefault(factors[-1], m.label())
    held: dict[int, str] = {}
    for outer, inners in pairs.items():
        target = 1.0 - ratio
        # holding a group that is also pruned on its own elsewhere (timm PiT: a stage's width
        # times a channel multiplier of 2) would stop that pruning too: hold the other factor
        outer_alone = outer in alone and not any(i in alone for i in inners)
        whole_parts = outer_alone or all(
            _kept_fraction(sizes[outer], sizes[i], ratio, block, False) - target
            < _kept_fraction(sizes[i], sizes[outer], ratio, block, i in conv_grouped) - target
            for i in inners
        )
        if whole_parts and ratio > 0:
            for inner, label in inners.items():
                held.setdefault(
                    inner,
                    f"kept whole: the channels within each part of {label}; whole parts are "
                    f"removed instead (round_to={block} leaves no room inside a part)",
                )
        else:
            label = next(iter(inners.values()))
            held.setdefault(
                outer,
                f"kept whole: it indexes the parts of {label}, whose channels are removed "
                "inside each part instead (so a ratio is not compounded)",
            )
    return held


def pruning_units(
    dg: DependencyGraph,
    groups: list[Group],
    modules: dict[str, nn.Module],
    ratio: float = 0.5,
    block: int = 1,
) -> Units:
    """Partition every eligible group's channels into units (see the module docstring);
    ``ratio`` and ``block`` (the plan's ratio and rounding) choose which factor of a composite
    dim carries the ratio."""
    conv_grouped = conv_group_inners(dg, groups, modules)
    held = held_groups(dg, groups, conv_grouped, ratio, block)
    units: list[Unit] = []
    for g in groups:
        if g.id in held:
            continue
        writers: dict[int, set[str]] = defaultdict(set)
        layers: set[str] = set()
        per_channel: dict[str, np.ndarray] = {}  # layer -> output positions per channel
        for m in g.members:
            module = modules.get(m.module)
            if not is_output_dim(module, m):
                continue
            name = owner_name(m, modules)
            mapped = m.index_map[m.index_map >= 0]
            counts = np.bincount(mapped, minlength=g.size)
            for c in np.flatnonzero(counts).tolist():
                writers[c].add(name)
            if _is_layer(module, m):
                layers.add(name)
                per_channel[name] = np.maximum(per_channel.get(name, counts), counts)
        by_signature: dict[frozenset[str], list[int]] = defaultdict(list)
        for c in range(g.size):
            by_signature[frozenset(writers.get(c, ()))].append(c)
        for signature, channels in sorted(by_signature.items(), key=lambda kv: kv[1][0]):
            unit_layers = sorted(signature & layers)
            multiplier = max(
                (int(per_channel[name][channels].max()) for name in unit_layers), default=1
            )
            units.append(
                Unit(
                    len(units),
                    g.id,
                    channels,
                    sorted(signature),
                    unit_layers,
                    max(multiplier, 1),
                    g.kind,
                    g.id in conv_grouped,
                )
            )
    return Units(units, held)

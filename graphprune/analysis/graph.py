"""DependencyGraph: the groups of coupled channels, inspectable and explainable.

A *group* is a set of channels that are removed together: removing channel ``i`` of a group
removes, from every member ``(tensor FQN, dim)``, every position whose index map says ``i``.
A member may belong to several groups: the rows of a fused qkv weight are indexed by
``(head, head_dim)``, so it is a member of the heads group and of the head_dim group.
"""

from __future__ import annotations

import difflib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from graphprune.analysis.registry import FOLDED_HEADS
from graphprune.analysis.walk import Walked
from graphprune.capture import Captured
from graphprune.errors import InputError

TensorDim = tuple[str, int]  # (display name: FQN for parameters/buffers, dim)


@dataclass(frozen=True)
class Member:
    """One dimension of one parameter or buffer, and which group channel each position is."""

    fqn: str
    dim: int
    index_map: np.ndarray  # (size,) channel of the group at each position, -1 if none
    is_parameter: bool
    aliases: tuple[str, ...] = ()  # other FQNs of the same tensor (tied weights)

    @property
    def module(self) -> str:
        return self.fqn.rpartition(".")[0]

    def describe_map(self) -> str:
        """A short human description: identity, offset, repeat or blocks of the group."""
        m = self.index_map
        if np.array_equal(m, np.arange(m.shape[0])):
            return "identity"
        used = m[m >= 0]
        if used.size and used.size < m.size and np.all(np.diff(used) == 1):
            start = int(np.argmax(m >= 0))
            if np.all(m[start : start + used.size] >= 0):
                return f"[{start}:{start + used.size}] <- channels {used[0]}..{used[-1]}"
        if used.size == m.size and m.size % max(int(m.max()) + 1, 1) == 0:
            reps = m.size // (int(m.max()) + 1)
            if np.array_equal(m, np.repeat(np.arange(m.size // reps), reps)):
                return f"each channel x{reps} (blocks)"
            if np.array_equal(m, np.tile(np.arange(m.size // reps), reps)):
                return f"each channel x{reps} (interleaved)"
        return f"pattern ({np.count_nonzero(m >= 0)}/{m.size} positions)"

    def label(self) -> str:
        return f"{self.fqn}[{self.dim}]"


@dataclass
class Group:
    """Channels that must be pruned together."""

    id: int
    size: int  # number of independent channels
    members: list[Member]
    frozen_reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # where pruning is not exact (norm stats)
    ops: list[str] = field(default_factory=list)  # "op (module)" that coupled the members
    kind: str = "channels"  # "channels", "heads", "kv_heads", "heads_per_kv" (GQA), "head_dim"

    @property
    def prunable(self) -> bool:
        return not self.frozen_reasons

    @property
    def name(self) -> str:
        return self.members[0].label() if self.members else f"group{self.id}"

    @property
    def modules(self) -> list[str]:
        return sorted({m.module for m in self.members})

    def summary(self) -> str:
        """One line: size, state and members; used by golden tests."""
        state = "prunable" if self.prunable else "frozen"
        members = ", ".join(m.label() for m in self.members)
        return f"{self.size} {state}: {members}"

    def compact(self) -> str:
        """``"<size> <state>: module[dim] ..."``: a stable one-line summary for golden tests.

        A module's ``weight`` appears as ``module[dim]``; its bias and running stats are left
        out when its weight is in the group (they follow it), else listed by full name.
        """
        state = "prunable" if self.prunable else "frozen"
        with_weight = {m.module for m in self.members if m.fqn.endswith(".weight")}
        names = sorted(
            {
                f"{m.module}[{m.dim}]" if m.fqn.endswith(".weight") else f"{m.fqn}[{m.dim}]"
                for m in self.members
                if m.fqn.endswith(".weight") or m.module not in with_weight
            }
        )
        return f"{self.size} {state}: {' '.join(names)}"

    def __str__(self) -> str:
        lines = [
            f"group {self.id}: {self.size} channels, {'prunable' if self.prunable else 'FROZEN'}"
        ]
        lines += [f"  {m.label():<40} {m.describe_map()}" for m in self.members]
        lines += [f"  frozen: {r}" for r in self.frozen_reasons[:3]]
        lines += [f"  note: {n}" for n in self.notes[:3]]
        return "\n".join(lines)


@dataclass(frozen=True)
class PositionArrays:
    """Positions of a tensor dim as arrays: ``groups[i, j]``, ``channels[i, j]`` is the j-th
    (group, channel) position i depends on (group -1: padding), so which positions survive a
    resolution is a few numpy operations, not a Python loop over the positions."""

    groups: np.ndarray  # (positions, width) int64
    channels: np.ndarray  # (positions, width) int64

    @classmethod
    def of(cls, rows: list[tuple[tuple[int, int], ...]]) -> PositionArrays:
        width = max((len(r) for r in rows), default=0)
        groups = np.full((len(rows), width), -1, dtype=np.int64)
        channels = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            for j, (g, c) in enumerate(row):
                groups[i, j], channels[i, j] = g, c
        return cls(groups, channels)

    def surviving(self, kept: Mapping[int, Iterable[int]]) -> np.ndarray:
        """Per position: every channel it depends on is kept (groups absent from ``kept``
        keep all)."""
        ok = np.ones(self.groups.shape[0], dtype=bool)
        for g in np.unique(self.groups[self.groups >= 0]).tolist():
            if g not in kept:
                continue
            here = self.groups == g
            alive = np.zeros(int(self.channels[here].max()) + 1, dtype=bool)
            chans = np.fromiter((int(c) for c in kept[g]), dtype=np.int64)
            alive[chans[chans < alive.size]] = True
            lost = here & ~alive[np.where(here, self.channels, 0)]
            ok &= ~lost.any(axis=1)
        return ok


@dataclass
class ShapeConstantUse:
    """An integer argument that must be recomputed when these groups are pruned."""

    node: str
    op: str
    module: str
    argument: str
    value: int
    groups: list[int]
    per: str
    source: str
    positions: list[tuple[tuple[int, int], ...]] = field(repr=False, default_factory=list)

    _encoded: PositionArrays | None = field(default=None, init=False, repr=False, compare=False)

    def expected(self, kept: Mapping[int, Iterable[int]]) -> int:
        """The value this argument must take when each group keeps ``kept[group]``."""
        if self._encoded is None:
            self._encoded = PositionArrays.of(self.positions)
        return int(self._encoded.surviving(kept).sum())

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "positions" and k[0] != "_"}
        return data


@dataclass
class Diagnostic:
    node: str
    op: str
    reason: str


class DependencyGraph:
    """The result of :func:`graphprune.analyze`."""

    def __init__(
        self,
        groups: list[Group],
        graph: nx.MultiGraph,
        positions: dict[TensorDim, list[tuple[tuple[int, int], ...]]],
        shape_constants: list[ShapeConstantUse],
        diagnostics: list[Diagnostic],
        aliases: dict[str, list[str]],
        seconds: float = 0.0,
        node_rows: Any = None,
    ) -> None:
        self._node_rows = node_rows  # (node name, dim) -> channel rows, for any graph tensor
        self.groups = groups
        self._graph = graph
        self._positions = positions
        self._encoded: dict[TensorDim, PositionArrays] = {}  # made on first use
        self._patterns: dict[TensorDim, list[tuple[int, ...]]] = {}  # made on first use
        self.shape_constants = shape_constants
        self.diagnostics = diagnostics
        self._aliases = aliases
        self.seconds = seconds

    # -- queries ----------------------------------------------------------------------------
    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group(self, group_id: int) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise InputError(f"no group {group_id}; groups are 0..{len(self.groups) - 1}")

    def groups_of(self, fqn_or_module: str) -> list[Group]:
        """Groups with a member that is ``fqn_or_module`` or a tensor of that module."""
        names = self._resolve(fqn_or_module)
        return [g for g in self.groups if any(m.fqn in names for m in g.members)]

    def member_dims(self) -> list[TensorDim]:
        """Every (parameter/buffer FQN, dim) that belongs to at least one group."""
        return [key for key, rows in self._positions.items() if any(rows)]

    def position_channels(self, fqn: str, dim: int) -> list[tuple[tuple[int, int], ...]]:
        """For each position of ``fqn``'s dim: the (group id, channel) pairs it depends on."""
        return self._positions[(fqn, dim)]

    def factor_patterns(self, fqn: str, dim: int) -> list[tuple[int, ...]]:
        """The distinct group-id sequences the positions of ``fqn``'s dim depend on, in the
        order first met (a composite dim, heads x head_dim, has one; a concat has one per
        part): what the planner asks of a dim's factors, without a loop over its positions."""
        found = self._patterns.get((fqn, dim))
        if found is None:
            rows = self._positions[(fqn, dim)]
            found = list(dict.fromkeys(tuple(g for g, _ in row) for row in rows))
            self._patterns[(fqn, dim)] = found
        return found

    def node_channels(self, node: str, dim: int) -> list[tuple[tuple[int, int], ...]] | None:
        """Like :meth:`position_channels` for any tensor of the captured graph (by fx node
        name); None for a node or dim the analysis has no layout for."""
        return self._node_rows(node, dim) if self._node_rows is not None else None

    def kept_positions(self, fqn: str, dim: int, kept: Mapping[int, Iterable[int]]) -> np.ndarray:
        """Positions of ``fqn``'s dim that survive when each group keeps ``kept[group]``."""
        encoded = self._encoded.get((fqn, dim))
        if encoded is None:
            encoded = self._encoded[(fqn, dim)] = PositionArrays.of(self._positions[(fqn, dim)])
        return np.flatnonzero(encoded.surviving(kept))

    def to_networkx(self) -> nx.MultiGraph:
        """Tensor dims as nodes (attribute ``groups``), coupling ops as edges (``op``, ``why``)."""
        return self._graph.copy()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description of the groups and diagnostics."""
        return {
            "groups": [
                {
                    "id": g.id,
                    "size": g.size,
                    "prunable": g.prunable,
                    "frozen_reasons": g.frozen_reasons,
                    "notes": g.notes,
                    "ops": g.ops,
                    "members": [
                        {
                            "fqn": m.fqn,
                            "dim": m.dim,
                            "parameter": m.is_parameter,
                            "aliases": list(m.aliases),
                            "index_map": m.index_map.tolist(),
                        }
                        for m in g.members
                    ],
                }
                for g in self.groups
            ],
            "shape_constants": [s.to_dict() for s in self.shape_constants],
            "diagnostics": [vars(d) for d in self.diagnostics],
            "analysis_seconds": self.seconds,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    # -- presentation -----------------------------------------------------------------------
    def table(self, include_frozen: bool = True) -> str:
        """An aligned plain-text table of the groups."""
        rows = [("id", "channels", "state", "members", "modules")]
        for g in self.groups:
            if not include_frozen and not g.prunable:
                continue
            mods = g.modules
            shown = ", ".join(mods[:4]) + (f", … (+{len(mods) - 4})" if len(mods) > 4 else "")
            state = "prunable" if g.prunable else "frozen: " + _short(g.frozen_reasons[0])
            rows.append((str(g.id), str(g.size), state, str(len(g.members)), shown))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=False)) + "  " + r[4]
            for r in rows
        ]
        lines.insert(1, "-" * min(max(len(s) for s in lines), 120))
        n_prunable = len(self.prunable_groups)
        lines.append(
            f"{len(self.groups)} groups ({n_prunable} prunable), "
            f"{len(self.diagnostics)} unsupported ops, analysed in {self.seconds:.2f}s"
        )
        for d in self.diagnostics[:10]:
            lines.append(f"  unsupported: {d.node}: {d.reason}")
        return "\n".join(lines)

    def summary(self, rows: int = 10, width: int = 80) -> str:
        """A short overview for a terminal: the counts, the first ``rows`` prunable groups
        (modules abbreviated to fit ``width``) and the frozen ones grouped by reason."""
        prunable = self.prunable_groups
        frozen = [g for g in self.groups if not g.prunable]
        lines = [
            f"{len(self.groups)} groups of coupled channels: {len(prunable)} prunable, "
            f"{len(frozen)} frozen (analysed in {self.seconds:.2f} s)",
            f"{'id':>4} {'channels':>8} {'members':>7}  modules",
        ]
        for g in prunable[:rows]:
            head = f"{g.id:>4} {g.size:>8} {len(g.members):>7}  "
            lines.append(head + _fit(g.modules, width - len(head)))
        if len(prunable) > rows:
            lines.append(f"{'':>4} … {len(prunable) - rows} more prunable groups")
        reasons: dict[str, int] = {}
        for g in frozen:
            why = g.frozen_reasons[0].split(" (")[0] if g.frozen_reasons else "frozen"
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(_short(f"frozen ({n}): {why}", width))
        if self.diagnostics:
            lines.append(
                f"{len(self.diagnostics)} ops without a channel rule (their channels are frozen)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"DependencyGraph({len(self.groups)} groups, {len(self.prunable_groups)} prunable)"

    def explain(self, fqn_or_module: str, *, echo: bool = True, max_paths: int = 8) -> str:
        """The coupling paths that tie a layer's tensors to the other members of its groups."""
        names = self._resolve(fqn_or_module)
        lines: list[str] = []
        for g in self.groups:
            own = [m for m in g.members if m.fqn in names]
            if not own:
                continue
            lines.append(
                f"group {g.id} ({g.size} channels, {'prunable' if g.prunable else 'frozen'}):"
            )
            explained: set[tuple[str, int]] = set()
            for m in own:
                lines.append(f"  {m.label()}: {m.describe_map()}")
                if (m.module, m.dim) in explained:
                    continue
                explained.add((m.module, m.dim))
                source = _node_key(m.fqn, m.dim)
                done = {m.module}
                for other in g.members:
                    if other.module in done or len(done) > max_paths:
                        continue
                    done.add(other.module)
                    target = _node_key(other.fqn, other.dim)
                    try:
                        path = nx.shortest_path(self._graph, source, target)
                    except (nx.NetworkXNoPath, nx.NodeNotFound):
                        continue
                    lines.append("    " + self._describe_path(path))
            for reason in g.frozen_reasons[:3]:
                lines.append(f"  frozen because: {reason}")
            for note in g.notes[:3]:
                lines.append(f"  note: {note}")
        if not lines:
            lines.append(f"'{fqn_or_module}' is in no group (no prunable dimension)")
        text = "\n".join(lines)
        if echo:
            print(text)
        return text

    def _describe_path(self, path: list[str]) -> str:
        """``a[1] -> op (module: why) -> ... -> b[0]``; pass-through steps show the op only."""
        parts = [path[0]]
        for a, b in itertools.pairwise(path):
            data = next(iter(self._graph.get_edge_data(a, b).values()))
            op = str(data["op"]).removeprefix("aten.").split(".")[0]
            if data["why"] == "passes through":
                parts.append(op)
            else:
                where = f"{data['module']}: " if data.get("module") else ""
                parts.append(f"{op} ({where}{data['why']})")
        parts.append(path[-1])
        return " -> ".join(parts)

    def _resolve(self, name: str) -> set[str]:
        fqns = {m.fqn for g in self.groups for m in g.members}
        fqns |= {a for f in list(fqns) for a in self._aliases.get(f, [])}
        if name in fqns:
            return {name, *self._aliases.get(name, [])}
        prefix = name + "."
        found = {f for f in fqns if f.startswith(prefix) and "." not in f[len(prefix) :]}
        if not found:
            found = {f for f in fqns if f.startswith(prefix)}
        if not found:
            modules = sorted({f.rpartition(".")[0] for f in fqns} | fqns)
            close = difflib.get_close_matches(name, modules, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InputError(f"'{name}' is not a parameter, buffer or module in any group{hint}")
        return found


def _fit(names: list[str], width: int) -> str:
    """As many names as fit in ``width``, then how many more."""
    shown: list[str] = []
    for k, name in enumerate(names):
        more = f", … +{len(names) - k}" if k < len(names) else ""
        if len(", ".join([*shown, name])) + len(more) > width and shown:
            return ", ".join(shown) + f", … +{len(names) - k}"
        shown.append(name)
    return _short(", ".join(shown), width)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _node_key(name: str, dim: int) -> str:
    return f"{name}[{dim}]"


Rows = list[tuple[tuple[int, int], ...]]  # per position: the (group, channel) pairs it holds
HEAD_KIND_PRIORITY = {"kv_heads": 4, "heads_per_kv": 3, "heads": 2, "head_dim": 1}


class _Atoms:
    """The walk's atom table, read as channel spaces and base roots (memoised)."""

    def __init__(self, walked: Walked) -> None:
        self.walked, self.table = walked, walked.table
        self.memo: dict[int, tuple[int, ...]] = {}
        self._spaces: dict[int, tuple[int, ...]] = {}

    def roots(self, atom: int) -> tuple[int, ...]:
        return self.table.base_of(atom, self.memo)

    def forget(self) -> None:
        """Drop the memos (an entry per atom met: ~150 MiB at 1 B parameters); what is asked
        later is computed again."""
        self.memo, self._spaces = {}, {}

    def space(self, root: int) -> int:
        return self.table.find_space(self.table.space_of[root])

    def spaces(self, atoms: np.ndarray) -> set[int]:
        out: set[int] = set()
        for a in np.unique(atoms).tolist():
            found = self._spaces.get(a)
            if found is None:
                found = tuple(self.space(r) for r in self.roots(a))
                self._spaces[a] = found
            out.update(found)
        return out

    def by_space(self, facts: list[tuple[np.ndarray, str]]) -> dict[int, list[str]]:
        """Each fact's text under every space its atoms touch."""
        out: dict[int, list[str]] = {}
        for atoms, text in facts:
            for s in self.spaces(atoms):
                out.setdefault(s, []).append(text)
        return out

    def kinds(self) -> dict[int, str]:
        """Attention kinds of spaces (a query head of GQA is (kv head, repeat))."""
        kinds: dict[int, str] = {}

        def mark(space: int, kind: str) -> None:
            if HEAD_KIND_PRIORITY[kind] > HEAD_KIND_PRIORITY.get(kinds.get(space, ""), 0):
                kinds[space] = kind

        batch = self._batch_roots()
        for atoms, kind in self.walked.facts.tags:
            if kind not in ("heads", FOLDED_HEADS):
                for s in self.spaces(atoms):
                    mark(s, kind)
                continue
            for a in np.unique(atoms).tolist():
                roots = self.roots(a)
                if kind == FOLDED_HEADS:  # (batch x heads): the batch factor is no head (a
                    # batch of 1 folds to the heads alone: nothing to drop)
                    roots = tuple(r for r in roots if r not in batch)
                if len(roots) == 2:  # a query head is (kv head, repeat): grouped-query attention
                    mark(self.space(roots[0]), "kv_heads")
                    mark(self.space(roots[1]), "heads_per_kv")
                else:
                    for r in roots:
                        mark(self.space(r), "heads")
        return kinds

    def _batch_roots(self) -> set[int]:
        """Base roots of the inputs' first dim (the batch)."""
        found: set[int] = set()
        for name, shown in self.walked.display.items():
            layout = self.walked.values.get(name)
            if shown.startswith("input:") and isinstance(layout, list) and layout:
                first = layout[0]
                if isinstance(first, np.ndarray):
                    for a in np.unique(first).tolist():
                        found.update(self.roots(a))
        return found

    def state_rows(self, captured: Captured) -> dict[TensorDim, list[tuple[int, ...]]]:
        """Per-position base channels of every parameter/buffer dim."""
        rows: dict[TensorDim, list[tuple[int, ...]]] = {}
        for node_name, fqn in captured.state_fqn.items():
            layout = self.walked.values.get(node_name)
            if isinstance(layout, list):
                for d, atoms in enumerate(layout):
                    rows[(fqn, d)] = [self.roots(a) for a in atoms.tolist()]
        return rows


@dataclass
class _Numbering:
    """Groups numbered by their first channel; each group's channels by creation order."""

    atoms: _Atoms
    channels: dict[int, list[int]]  # space -> its base roots
    order: list[int]  # spaces in group-id order
    group_of_space: dict[int, int]
    index_of_root: dict[int, tuple[int, int]]  # root -> (group id, channel)

    @classmethod
    def of(
        cls, atoms: _Atoms, state_rows: dict[TensorDim, list[tuple[int, ...]]], hidden: set[int]
    ) -> _Numbering:
        found: dict[int, list[int]] = {}
        for rows in state_rows.values():
            for row in rows:
                for root in row:
                    found.setdefault(atoms.space(root), []).append(root)
        candidate = {s: sorted(set(c)) for s, c in found.items() if s not in hidden}
        candidate = {s: c for s, c in candidate.items() if len(c) > 1}
        order = sorted(candidate, key=lambda s: candidate[s][0])
        group_of_space = {s: i for i, s in enumerate(order)}
        index_of_root = {
            root: (group_of_space[s], k)
            for s, roots in candidate.items()
            for k, root in enumerate(roots)
        }
        return cls(atoms, candidate, order, group_of_space, index_of_root)

    def row(self, roots: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        return tuple(self.index_of_root[r] for r in roots if r in self.index_of_root)

    def rows(self, atoms: np.ndarray) -> Rows:
        return [self.row(self.atoms.roots(a)) for a in atoms.tolist()]


def build(captured: Captured, walked: Walked, seconds: float = 0.0) -> DependencyGraph:
    """Resolve the walk's atoms into groups, members, notes and shape constants."""
    atoms = _Atoms(walked)
    hidden: set[int] = set()
    for structural in walked.facts.structural:
        hidden |= atoms.spaces(structural)
    state_rows = atoms.state_rows(captured)
    numbering = _Numbering.of(atoms, state_rows, hidden)
    positions = {key: [numbering.row(r) for r in rows] for key, rows in state_rows.items()}
    graph, node_groups = _inspection_graph(walked, atoms.spaces, numbering.group_of_space)
    frozen, notes = atoms.by_space(walked.facts.frozen), atoms.by_space(walked.facts.notes)
    kinds = atoms.kinds()
    members = _members(captured, positions, len(numbering.order))
    ops = _group_ops(graph, node_groups)
    groups = [
        Group(
            id=i,
            size=len(numbering.channels[s]),
            members=members[i],
            frozen_reasons=_unique(frozen.get(s, [])),
            notes=_unique(notes.get(s, [])),
            ops=ops.get(i, []),
            kind=kinds.get(s, "channels"),
        )
        for i, s in enumerate(numbering.order)
    ]
    diagnostics = [Diagnostic(n, op, reason) for n, op, reason in walked.facts.unsupported]
    constants, node_rows = _constants(walked, numbering), _node_rows(walked, numbering)
    atoms.forget()  # node_rows keeps the walk; its per-atom memos would outlive the analysis
    return DependencyGraph(
        groups, graph, positions, constants, diagnostics, captured.aliases, seconds, node_rows,
    )  # fmt: skip


def _members(
    captured: Captured, positions: dict[TensorDim, Rows], n_groups: int
) -> dict[int, list[Member]]:
    """Each group's members: every (tensor, dim) with a position holding its channels."""
    members: dict[int, list[Member]] = {i: [] for i in range(n_groups)}
    for (fqn, d), channel_rows in positions.items():
        for g in sorted({g for row in channel_rows for g, _ in row}):
            index_map = np.array(
                [next((c for gg, c in row if gg == g), -1) for row in channel_rows],
                dtype=np.int64,
            )
            tied = tuple(a for a in captured.aliases.get(fqn, []) if a != fqn)
            members[g].append(Member(fqn, d, index_map, fqn in captured.parameters, tied))
    return members


def _group_ops(graph: nx.MultiGraph, node_groups: dict[str, set[int]]) -> dict[int, list[str]]:
    """Per group: the ops (with their modules) whose both ends carry its channels."""
    found: dict[int, set[str]] = {}
    for a, b, data in graph.edges(data=True):
        for g in node_groups.get(a, set()) & node_groups.get(b, set()):
            found.setdefault(g, set()).add(f"{data['op']} ({data['module'] or '<root>'})")
    return {g: sorted(ops) for g, ops in found.items()}


def _constants(walked: Walked, numbering: _Numbering) -> list[ShapeConstantUse]:
    """Shape constants that depend on a group, with the channels of each of their units."""
    constants = []
    for c in walked.facts.shape_constants:
        spaces = numbering.atoms.spaces(c.atoms)
        gids = sorted(numbering.group_of_space[s] for s in spaces if s in numbering.group_of_space)
        if gids:
            rows = numbering.rows(c.atoms)
            use = ShapeConstantUse(
                c.node, c.op, c.module, c.argument, c.value, gids, c.per, c.source, rows
            )
            constants.append(use)
    return constants


def _node_rows(walked: Walked, numbering: _Numbering) -> Callable[[str, int], Rows | None]:
    """(node, dim) -> the channels at each position of that node's output dim (memoised)."""
    cache: dict[tuple[str, int], Rows | None] = {}

    def node_rows(node: str, dim: int) -> Rows | None:
        key = (node, dim)
        if key not in cache:
            layout = walked.values.get(node)
            cache[key] = (
                numbering.rows(layout[dim])
                if isinstance(layout, list)
                and all(isinstance(a, np.ndarray) for a in layout)
                and 0 <= dim < len(layout)
                else None
            )
        return cache[key]

    return node_rows


def _inspection_graph(
    walked: Walked, spaces: Any, group_of_space: dict[int, int]
) -> tuple[nx.MultiGraph, dict[str, set[int]]]:
    graph = nx.MultiGraph()
    node_groups: dict[str, set[int]] = {}
    for name, value in walked.values.items():
        if not (isinstance(value, list) and all(isinstance(a, np.ndarray) for a in value)):
            continue
        for d, atoms in enumerate(value):
            key = _node_key(walked.display[name], d)
            gids = {group_of_space[s] for s in spaces(atoms) if s in group_of_space}
            node_groups[key] = gids
            graph.add_node(key, groups=sorted(gids), module=walked.modules.get(name, ""))
    for (na, da), (nb, db), attrs in walked.facts.edges:
        a = _node_key(walked.display.get(na, na), da)
        b = _node_key(walked.display.get(nb, nb), db)
        if a in graph and b in graph:
            graph.add_edge(a, b, **attrs)
    return graph, node_groups


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))

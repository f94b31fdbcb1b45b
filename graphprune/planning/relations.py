"""Count relations: the ints a forward computes must equal what the kept channels need.

Every shape constant of the export graph that follows a group (a view/reshape/expand size, a
split size, a slice bound, conv groups, ...) is matched to the eager call that produced it
(same source line, same module instance, same op, in order; see
:mod:`graphprune.analysis.provenance`). The provenance trace says how that call computed it: a
literal, a module attribute, a tensor's shape, or arithmetic on those. A *relation* is then

    computed(pruned shapes, new attribute values) == needed(kept channels)

where ``needed`` is the number of kept positions (:meth:`ShapeConstantUse.expected`). The
solver (:func:`satisfy`) makes a resolution satisfy every relation it can evaluate:

1. An attribute used bare (``view(..., self.num_heads, ...)``) takes the value its use needs.
   An attribute asked for two values ties the groups of those uses to one count.
2. An attribute used once inside arithmetic (``split(self.expand_chs // 2)``) is solved for.
3. A group the plan does not prune (head_dim under a channel plan) follows a relation that
   sets its count: ``kept(head_dim) = kept(residual) // num_heads``; a pruned group may be
   moved to *more* kept channels to satisfy one, never fewer.
4. Whatever still fails freezes the pruned groups it involves (kept whole), the source line
   and the computation as the reason; the rest is solved again.

Relations whose call could not be matched stay unknown: the verification after the rewrite
(re-capture, every constant compared) and compile's freeze-and-retry cover them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import fx

from graphprune.analysis import DependencyGraph
from graphprune.analysis.arguments import argument_position
from graphprune.analysis.graph import ShapeConstantUse
from graphprune.analysis.provenance import AttrKey, CallKey, DimKey, Expr, IntUse, ShapeTrace
from graphprune.analysis.registry import flatten_args, source_line
from graphprune.capture import Captured, owning_module

Rows = list[tuple[tuple[int, int], ...]]
_log = logging.getLogger(__name__)  # DEBUG: every drive, tie and freeze the solver decides

# eager torch function -> aten ops it may appear as in the export graph (besides its own name)
_ALIASES = {
    "__getitem__": ("slice", "select", "index", "narrow"),
    "reshape": ("view", "_unsafe_view"),
    "view": ("_unsafe_view",),
    "flatten": ("view", "reshape"),
    "unflatten": ("view", "reshape"),
    "chunk": ("split",),
    "narrow": ("slice",),
    "view_as": ("view",),
    "expand_as": ("expand",),
    "conv1d": ("convolution",),
    "conv2d": ("convolution",),
    "conv3d": ("convolution",),
}


def _short(target: Any) -> str:
    name = str(getattr(target, "__name__", target))
    return name.removeprefix("aten.").split(".")[0]


def compatible(func: str, op: str) -> bool:
    return op == func or op.startswith(func) or op in _ALIASES.get(func, ())


def _line(node: fx.Node) -> str:
    return ":".join(source_line(node).split(":")[:2])


def _node_ints(node: fx.Node) -> list[int]:
    return [
        int(v)
        for v in flatten_args((node.args, node.kwargs))
        if isinstance(v, int) and not isinstance(v, bool)
    ]


@dataclass
class Relation:
    """One shape constant and how the forward computes it."""

    constant: ShapeConstantUse
    expr: Expr
    line: str
    tensors: dict[int, str] = field(default_factory=dict)  # read tensor -> graph node name

    def describe(self, computed: int, needed: int) -> str:
        c = self.constant
        where = f"{c.source or c.node}: {c.op.removeprefix('aten.')} {c.argument}"
        if self.expr.op == "const":
            return f"{where} is hard-coded as {computed}, but the kept channels need {needed}"
        how = self.expr.describe(lambda k: self.tensors.get(k, f"<tensor {k}>"))
        return f"{where} is computed as {how} = {computed}, but the kept channels need {needed}"


def match_uses(captured: Captured, trace: ShapeTrace) -> dict[str, IntUse]:
    """Export node name -> the eager call that made it (for nodes with int arguments)."""
    return _match(captured, trace.uses)


def _match(captured: Captured, uses: list[IntUse]) -> dict[str, IntUse]:
    """Export node name -> the call among ``uses`` that made it.

    Nodes and calls are aligned in order per (source line, module instance); a node takes the
    next call whose function is compatible with its op (``reshape`` for ``aten.view``, ...).
    Nodes whose stack trace names another line (torch.export keeps fewer frames for some
    wrappers, e.g. ``torch.split``) get a second chance per module instance alone, taking
    only a call that got exactly the node's ints: order alone is no evidence there (Hugging
    Face's SDPA attention repeats kv heads under export but not in eager, so the two orders
    differ, and a call whose sequence length equals the head count would otherwise pass).
    """
    nodes = [
        n
        for n in captured.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("aten.") and _node_ints(n)
    ]
    found: dict[str, IntUse] = {}
    taken: set[int] = set()
    for second in (False, True):
        keyed = _by_module if second else _by_line
        calls: dict[tuple[str, str], list[tuple[int, IntUse]]] = defaultdict(list)
        for k, use in enumerate(uses):
            if k not in taken:
                calls[keyed(use.line, use.module)].append((k, use))
        cursor: dict[tuple[str, str], int] = defaultdict(int)
        for node in nodes:
            if node.name in found:
                continue
            key = keyed(_line(node), owning_module(node))
            pending = calls.get(key, [])
            op = _short(node.target)
            for j in range(cursor[key], len(pending)):
                k, use = pending[j]
                if compatible(use.func, op) and (not second or _same_ints(use, node)):
                    found[node.name] = use
                    taken.add(k)
                    cursor[key] = j + 1
                    break
    return found


def _by_line(line: str, module: str) -> tuple[str, str]:
    return (line, module)


def _by_module(_line: str, module: str) -> tuple[str, str]:
    return ("", module)


def _same_ints(use: IntUse, node: fx.Node) -> bool:
    return [int(v) for v in use.values] == _node_ints(node)


@dataclass(frozen=True)
class ConstantCall:
    """The eager call that passed a shape constant: its key, how many ints it got, and
    which of them is the constant."""

    key: CallKey
    count: int
    position: int


def constant_calls(
    dg: DependencyGraph, captured: Captured, recorded: list[IntUse]
) -> dict[tuple[str, str], ConstantCall]:
    """(node, argument) of each shape constant -> the call among the original's ``recorded``
    calls that passed it, where the call's ints are exactly the node's (so the position is
    certain). The verification reads the rewritten forward's value of the constant at the
    same call instead of capturing the model again."""
    nodes = {n.name: n for n in captured.graph.nodes}
    uses = _match(captured, recorded)
    found: dict[tuple[str, str], ConstantCall] = {}
    for c in dg.shape_constants:
        node, use = nodes.get(c.node), uses.get(c.node)
        if node is None or use is None or list(use.values) != _node_ints(node):
            continue
        position = argument_position(node, c.argument)
        if position is not None and 0 <= position < len(use.values):
            key = (use.line, use.module, use.func, use.occurrence)
            found[(c.node, c.argument)] = ConstantCall(key, len(use.values), position)
    return found


def _expr_for(c: ShapeConstantUse, node: fx.Node, use: IntUse) -> Expr | None:
    """Which of the call's ints is this constant: by position when the call's ints are the
    node's, else the one int of that value (several of that value computed differently:
    unknown)."""
    node_ints = _node_ints(node)
    if list(use.values) == node_ints:
        position = argument_position(node, c.argument)
        if position is not None and 0 <= position < len(use.exprs):
            return use.exprs[position]
    same = [e for v, e in zip(use.values, use.exprs, strict=True) if v == c.value]
    if same and all(e == same[0] for e in same):
        return same[0]
    return None


def build_relations(
    dg: DependencyGraph, captured: Captured, trace: ShapeTrace, links: dict[int, str]
) -> tuple[list[Relation], list[ShapeConstantUse]]:
    """Relations for the shape constants whose eager call was found, and the constants left
    unknown."""
    nodes = {n.name: n for n in captured.graph.nodes}
    uses = match_uses(captured, trace)
    relations, unknown = [], []
    for c in dg.shape_constants:
        node = nodes.get(c.node)
        use = uses.get(c.node)
        expr = _expr_for(c, node, use) if node is not None and use is not None else None
        if expr is None or any(k not in links for k, _ in expr.dims()):
            unknown.append(c)  # (a tensor whose shape it reads could not be identified)
        else:
            relations.append(Relation(c, expr, use.line if use else "", links))
    return relations, unknown


def count_kept(rows: Rows, kept: dict[int, set[int]]) -> int:
    """Positions whose channels all survive."""
    return sum(all(c in kept.get(g, {c}) for g, c in row) for row in rows)


@dataclass
class Solution:
    """A resolution made consistent with the relations."""

    kept: dict[int, list[int]]
    attributes: dict[AttrKey, int] = field(default_factory=dict)  # only changed ones
    frozen: dict[int, str] = field(default_factory=dict)  # group -> why it is kept whole
    driven: dict[int, str] = field(default_factory=dict)  # group -> relation that set it


@dataclass
class _Evaluator:
    dg: DependencyGraph
    trace: ShapeTrace
    links: dict[int, str]  # read tensor number -> node name

    def dim_size(self, key: DimKey, kept: dict[int, set[int]]) -> int:
        number, d = key
        node = self.links.get(number)
        rows = self.dg.node_channels(node, d) if node is not None else None
        if rows is None:
            return self.trace.tensors[number].shape[d]
        return count_kept(rows, kept)

    def value(self, r: Relation, kept: dict[int, set[int]], attrs: dict[AttrKey, int]) -> int:
        return r.expr.evaluate(
            lambda a: attrs.get(a, self.trace.attributes.get(a, 0)),
            lambda d: self.dim_size(d, kept),
        )

    def groups_of(self, r: Relation) -> set[int]:
        """Groups the constant follows and groups whose sizes the computation reads."""
        found = set(r.constant.groups)
        for number, d in r.expr.dims():
            node = self.links.get(number)
            rows = self.dg.node_channels(node, d) if node is not None else None
            found.update(g for row in rows or [] for g, _ in row)
        return found


def drive_options(
    c: ShapeConstantUse, kept: dict[int, set[int]]
) -> list[tuple[int, list[int], int]]:
    """Groups whose kept count alone sets this constant: ``(group, its channels here, the
    count of the other factors)``, innermost factor first. The positions must be a product
    (each a combination of one channel of the group with one kept combination of the rest):
    a whole group, a concatenated part of one, or heads x head_dim."""
    rows = c.positions
    if c.per != "size" or not rows or any(not row for row in rows):
        return []
    order: list[int] = []
    for row in rows:
        for g, _ in row:
            if g not in order:
                order.append(g)
    options = []
    for g in sorted(
        order, key=lambda x: -max(i for row in rows for i, (gg, _) in enumerate(row) if gg == x)
    ):
        if any(sum(gg == g for gg, _ in row) != 1 for row in rows):
            continue
        channels = sorted({ch for row in rows for gg, ch in row if gg == g})
        others = {tuple(p for p in row if p[0] != g) for row in rows}
        if len(rows) != len(channels) * len(others):
            continue
        rest = sum(all(ch in kept.get(gg, {ch}) for gg, ch in other) for other in others)
        options.append((g, channels, rest))
    return options


def _solve_one(
    r: Relation,
    attr: AttrKey,
    needed: int,
    value_with: Callable[[int], int],
    original: int,
) -> int | None:
    """An integer value of ``attr`` making the relation hold, nearest to the proportional
    guess ``original * needed / computed-at-original``."""
    base = r.constant.value or 1
    guess = max(1, round(original * needed / base))
    candidates = sorted(range(1, max(2 * original, guess) + 3), key=lambda v: (abs(v - guess), v))
    for v in candidates[:4096]:
        try:
            if value_with(v) == needed:
                return v
        except (ZeroDivisionError, OverflowError):
            continue
    return None


def satisfy(
    relations: list[Relation],
    dg: DependencyGraph,
    trace: ShapeTrace,
    links: dict[int, str],
    kept: dict[int, list[int]],
    scores: Callable[[int], np.ndarray],
    targeted: Iterable[int],
    max_rounds: int = 64,
) -> Solution:
    """Adjust ``kept`` and choose attribute values so every relation holds (see the module
    docstring). ``targeted`` are the groups the plan prunes; other prunable groups may be
    driven by relations; frozen groups never change."""
    sizes = {g.id: g.size for g in dg.groups}
    changeable = {g.id for g in dg.groups if g.prunable}
    targeted = set(targeted)
    state = {g: list(k) for g, k in kept.items()}
    solution = Solution(state)
    ev = _Evaluator(dg, trace, links)

    def sets() -> dict[int, set[int]]:
        return {g: set(k) for g, k in state.items()}

    def set_count(g: int, n: int, channels: list[int]) -> None:
        """Keep the best ``n`` of ``channels`` (the rest of the group as it is)."""
        order = sorted(channels, key=lambda c: (-scores(g)[c], c))
        inside = set(channels)
        others = [c for c in state.get(g, range(sizes[g])) if c not in inside]
        state[g] = sorted([*others, *order[:n]])

    for _ in range(max_rounds):
        kept_sets = sets()
        attrs, problems = _assign_attributes(relations, ev, kept_sets, solution.driven)
        violations = problems + [
            (r, ev.value(r, kept_sets, attrs), r.constant.expected(kept_sets))
            for r in relations
            if r.expr.op != "attr"
            and ev.value(r, kept_sets, attrs) != r.constant.expected(kept_sets)
        ]
        if not violations:
            solution.attributes = {a: v for a, v in attrs.items() if trace.attributes.get(a) != v}
            return solution
        if _repair(
            violations, state, sizes, changeable, targeted, set_count, solution, ev.groups_of
        ):
            continue
        r, computed, needed = violations[0]
        _log.debug("freeze: %s", r.describe(computed, needed))
        involved = [g for g in sorted(ev.groups_of(r)) if g in state and len(state[g]) < sizes[g]]
        if not involved:  # holds at full size too: the relation itself is wrong; ignore it
            relations = [x for x in relations if x is not r]
            continue
        for g in involved:
            state[g] = list(range(sizes[g]))
            solution.frozen.setdefault(g, r.describe(computed, needed))
    kept_sets = sets()
    attrs, _ = _assign_attributes(relations, ev, kept_sets, solution.driven)
    solution.attributes = {a: v for a, v in attrs.items() if trace.attributes.get(a) != v}
    return solution


Violation = tuple[Relation, int, int]  # relation, computed, needed


def _assign_attributes(
    relations: list[Relation],
    ev: _Evaluator,
    kept: dict[int, set[int]],
    driven: Iterable[int] = (),
) -> tuple[dict[AttrKey, int], list[Violation]]:
    """Rules 1 and 2 of the module docstring; returns the values and the unmet bare uses.

    Uses of one attribute that need different values are a tie: the attribute takes the value
    a use in a group another relation has sized needs (that relation is why they differ), or
    else the largest (prune less); the other uses are violations the solver repairs."""
    driven = set(driven)
    wanted: dict[AttrKey, list[tuple[Relation, int]]] = defaultdict(list)
    for r in relations:
        if r.expr.op == "attr":
            wanted[r.expr.args[0]].append((r, r.constant.expected(kept)))
    attrs: dict[AttrKey, int] = {}
    problems: list[Violation] = []
    for a, uses in wanted.items():
        values = {needed for _, needed in uses}
        sized = [needed for r, needed in uses if driven.intersection(r.constant.groups)]
        attrs[a] = sized[0] if sized else max(values)
        if len(values) > 1:  # the uses disagree: each that is not met is a violation
            problems += [(r, attrs[a], needed) for r, needed in uses if needed != attrs[a]]
    for r in relations:
        unknown = [a for a in r.expr.attrs() if a not in attrs]
        if not unknown or r.expr.op == "attr":
            continue
        needed = r.constant.expected(kept)
        if ev.value(r, kept, attrs) == needed:
            continue
        # several attributes (``self.in_channels // self.num_paths``): solve for one, the
        # others as they are; channel counts first (the largest), not branch or head counts
        for a in sorted(unknown, key=lambda k: -ev.trace.attributes.get(k, 0)):

            def value_with(v: int, a: AttrKey = a, r: Relation = r) -> int:
                return ev.value(r, kept, {**attrs, a: v})

            solved = _solve_one(r, a, needed, value_with, ev.trace.attributes.get(a, 1))
            if solved is not None:
                attrs[a] = solved
                break
    return attrs, problems


def _repair(
    violations: list[Violation],
    state: dict[int, list[int]],
    sizes: dict[int, int],
    changeable: set[int],
    targeted: set[int],
    set_count: Callable[[int, int, list[int]], None],
    solution: Solution,
    involved: Callable[[Relation], set[int]],
) -> bool:
    """Rule 3 (and the tie of rule 1): move groups' counts so that constants take the values
    the forward computes -- each group at most once per round (a later round sees the
    effect). True if something changed."""
    kept = {g: set(k) for g, k in state.items()}
    moved: set[int] = set()
    for r, computed, needed in violations:
        if moved.intersection(involved(r)):
            continue  # another relation just moved one of its groups: look again next round
        # a tie (an attribute two uses need differently): computed is the largest need
        for g, channels, rest in drive_options(r.constant, kept):
            if g not in changeable or rest == 0 or computed % rest:
                continue
            want = computed // rest
            current = len(kept.get(g, set(channels)).intersection(channels))
            if not 1 <= want <= len(channels) or want == current:
                continue
            if g in targeted and want < current:  # never prune what the plan prunes more
                continue
            set_count(g, want, channels)
            moved.add(g)
            _log.debug(
                "group %d -> %d of %d: %s", g, want, len(channels), r.describe(computed, needed)
            )
            if g in targeted and want == len(channels):  # the relation allows no pruning there
                solution.frozen.setdefault(g, r.describe(computed, needed))
            else:
                solution.driven[g] = r.describe(computed, needed) + f"; group kept at {want}"
            break
    return bool(moved)

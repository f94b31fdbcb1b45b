"""The per-op rule registry and the context a rule works through.

A rule receives a :class:`RuleContext` for one fx node. It reads the channel layouts of the
node's tensor arguments (:meth:`RuleContext.tensor`), couples dimensions that must be pruned
together (:meth:`RuleContext.couple`), and returns the layout of the node's output: one atom
array per output dimension (or a list of layouts for ops returning several tensors).

An op without a rule freezes every channel it touches; rules are never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from graphprune.analysis.atoms import Atoms, AtomTable

FOLDED_HEADS = "folded_heads"  # a tag: heads folded into the batch dim, (batch x heads)

Layout = list[Atoms]  # one atom array per tensor dimension
Value = Any  # Layout, a list of Values (multi-output ops) or None (not a tensor)
RuleFn = Callable[["RuleContext"], Value]

_RULES: dict[Any, RuleFn] = {}


def rule(*targets: Any) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` for aten overloads or whole overload packets (``aten.add``)."""

    def register(fn: RuleFn) -> RuleFn:
        for target in targets:
            if target in _RULES:
                raise ValueError(f"duplicate channel rule for {target}")
            _RULES[target] = fn
        return fn

    return register


def ops(*names: str) -> list[Any]:
    """The aten overload packets (or ``packet.overload``) that exist in this torch build."""
    found = []
    for name in names:
        packet_name, _, overload = name.partition(".")
        packet = getattr(torch.ops.aten, packet_name, None)
        if packet is not None and overload:
            packet = getattr(packet, overload, None)
        if packet is not None:
            found.append(packet)
    return found


def lookup(target: Any) -> RuleFn | None:
    """The rule of an op; an in-place op (``aten.leaky_relu_``) without its own rule uses its
    out-of-place form's (the result is the mutated input: same layout)."""
    found = _RULES.get(target)
    if found is None and isinstance(target, torch._ops.OpOverload):
        found = _RULES.get(target.overloadpacket)
        name = target.overloadpacket.__name__
        if found is None and name.endswith("_") and not name.endswith("__"):
            functional = getattr(torch.ops.aten, name[:-1], None)
            if functional is not None:
                found = _RULES.get(getattr(functional, target._overloadname, None)) or _RULES.get(
                    functional
                )
    return found


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target.name()).replace("aten::", "aten.")
    return getattr(target, "__name__", str(target))


@dataclass(frozen=True)
class Dim:
    """One dimension of one tensor in the graph, with its atoms."""

    node: str
    index: int
    atoms: Atoms

    @property
    def size(self) -> int:
        return int(self.atoms.shape[0])


@dataclass
class TensorArg:
    """A tensor argument of the node a rule is looking at."""

    node: str
    layout: Layout
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self, index: int) -> Dim:
        index = index % self.ndim if self.ndim else 0
        return Dim(self.node, index, self.layout[index])


@dataclass
class ShapeConstant:
    """An integer in a node's arguments whose right value depends on channel counts."""

    node: str
    op: str
    module: str
    argument: str  # e.g. "size[2]" or "split_size"
    value: int
    atoms: Atoms  # the dimension whose size the constant follows
    per: str = "size"  # "size": constant == len(kept); "start"/"end": position in the dim
    source: str = ""  # "file:line" of the user's code that made the node


@dataclass
class Facts:
    """Everything rules record besides unions, resolved to groups after the walk."""

    edges: list[tuple[tuple[str, int], tuple[str, int], dict[str, str]]] = field(
        default_factory=list
    )
    frozen: list[tuple[Atoms, str]] = field(default_factory=list)  # (atoms, reason)
    structural: list[Atoms] = field(default_factory=list)  # not channels: spatial, kernel ...
    notes: list[tuple[Atoms, str]] = field(default_factory=list)  # inexact pruning, etc.
    shape_constants: list[ShapeConstant] = field(default_factory=list)
    unsupported: list[tuple[str, str, str]] = field(default_factory=list)  # node, op, module
    tags: list[tuple[Atoms, str]] = field(default_factory=list)  # ("heads", "head_dim", ...)


class RuleContext:
    """What a rule sees of one node: its arguments' layouts and the tools to relate them."""

    def __init__(
        self,
        node: fx.Node,
        module: str,
        table: AtomTable,
        values: dict[str, Value],
        facts: Facts,
    ) -> None:
        self.node = node
        self.module = module
        self.table = table
        self._values = values
        self.facts = facts
        self.op = op_name(node.target)

    # -- reading arguments ------------------------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def tensor(self, value: Any) -> TensorArg | None:
        """The layout of an argument that is a tensor node, else None."""
        if not isinstance(value, fx.Node):
            return None
        layout = self._values.get(value.name)
        meta = value.meta.get("val")
        if not isinstance(meta, torch.Tensor) or not is_layout(layout):
            return None
        assert isinstance(layout, list)
        return TensorArg(value.name, layout, tuple(int(s) for s in meta.shape))

    def tensors(self) -> list[TensorArg]:
        """Every tensor among the node's arguments (flattening lists)."""
        found: list[TensorArg] = []
        for value in flatten_args((self.node.args, self.node.kwargs)):
            t = self.tensor(value)
            if t is not None:
                found.append(t)
        return found

    def out_shape(self, index: int | None = None) -> tuple[int, ...]:
        meta: Any = self.node.meta.get("val")
        if index is not None:
            meta = meta[index]
        return tuple(int(s) for s in meta.shape)

    # -- relating dimensions ----------------------------------------------------------------
    def couple(self, a: Dim, b: Dim, relation: str) -> None:
        """``a`` and ``b`` hold the same channels, position by position."""
        self.table.union_arrays(a.atoms, b.atoms)
        self.link(a, b, relation)

    def link(self, a: Dim, b: Dim | int, relation: str) -> None:
        """Record an edge for inspection (``b`` as an int is a dim of this node's output)."""
        target = (self.node.name, b) if isinstance(b, int) else (b.node, b.index)
        attrs = {"op": self.op, "node": self.node.name, "module": self.module, "why": relation}
        self.facts.edges.append(((a.node, a.index), target, attrs))

    def fresh(self, size: int, label: str) -> Atoms:
        """New channels that no parameter produces (spatial positions, factory outputs)."""
        return self.table.new_space(size, f"{self.node.name}:{label}")

    def structural(self, atoms: Atoms) -> Atoms:
        """Mark atoms as not channels at all (spatial positions, kernel taps)."""
        self.facts.structural.append(atoms)
        return atoms

    def freeze(self, atoms: Atoms, reason: str) -> None:
        where = f"{self.op} at node '{self.node.name}'"
        if self.module:
            where += f" in module '{self.module}'"
        self.facts.frozen.append((atoms, f"{reason} ({where})"))

    def note(self, atoms: Atoms, note: str) -> None:
        where = f"'{self.module}'" if self.module else f"node '{self.node.name}'"
        self.facts.notes.append((atoms, f"{note} at {where}"))

    def shape_constant(self, argument: str, value: int, atoms: Atoms, per: str = "size") -> None:
        self.facts.shape_constants.append(
            ShapeConstant(
                self.node.name,
                self.op,
                self.module,
                argument,
                value,
                atoms,
                per,
                source_line(self.node),
            )
        )

    def tag(self, atoms: Atoms, kind: str) -> None:
        """Mark what these channels are (attention heads, head_dim) for plans and passes."""
        self.facts.tags.append((atoms, kind))


def source_line(node: fx.Node) -> str:
    """``file:line: code`` of the innermost user frame in the node's stack trace."""
    trace = str(node.meta.get("stack_trace") or "")
    lines = trace.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i].strip()
        if text.startswith('File "'):
            file = text.split('"')[1]
            lineno = text.split("line ")[1].split(",")[0] if "line " in text else "?"
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{file}:{lineno}: {code}"
    return ""


def is_layout(value: Value) -> bool:
    """A tensor's layout (one atom array per dim), as opposed to a list of layouts or None."""
    return isinstance(value, list) and all(isinstance(a, np.ndarray) for a in value)


def flatten_args(value: Any) -> Iterable[Any]:
    """Leaves of nested lists, tuples and dicts (node args and kwargs), in order."""
    if isinstance(value, list | tuple):
        for item in value:
            yield from flatten_args(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from flatten_args(item)
    else:
        yield value

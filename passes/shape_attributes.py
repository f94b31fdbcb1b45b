"""Update the int attributes of modules that produce shape constants (``self.n_head``, ...).

Each shape constant the analyzer recorded (a view size, a split size, ...) has an expected new
value. The provenance trace (:mod:`graphprune.passes.provenance`) says which constants are a
module attribute *itself* (``view(B, T, self.n_head, self.head_dim)``); those attributes get the
new value. Constants derived from attributes or shapes (``self.n_head * self.head_dim``,
``x.shape[-1] // 2``) follow by themselves. An attribute asked to take two different values is
an error naming both source lines; a constant hard-coded in the forward is caught by the
verification that follows (it re-captures the model and compares every constant).
"""

from __future__ import annotations

from collections import defaultdict

from graphprune.analysis.graph import ShapeConstantUse
from graphprune.passes.base import PassContext, PruneError
from graphprune.passes.provenance import IntUse

# position of an export argument among the eager call's integer arguments
_ARGUMENT_INDEX = {"split_size": 0, "start": 1, "length": 2}


def eager_index(c: ShapeConstantUse) -> int | None:
    if c.argument in _ARGUMENT_INDEX:
        return _ARGUMENT_INDEX[c.argument]
    if c.argument.startswith(("size[", "split_sizes[", "arange[")):
        return int(c.argument.split("[")[1].rstrip("]"))
    if c.argument.startswith("sizes["):  # unflatten(dim, sizes)
        return int(c.argument.split("[")[1].rstrip("]")) + 1
    return None


def _line(source: str) -> str:
    return ":".join(source.split(":")[:2])


def _owns(path: str, module: str) -> bool:
    return path == "" or module == path or module.startswith(path + ".")


def _op_name(op: str) -> str:
    return op.removeprefix("aten.").split(".")[0].lstrip("_")


def matching_uses(c: ShapeConstantUse, uses: list[IntUse]) -> list[IntUse]:
    """Eager uses of a module attribute *itself* that became this constant.

    Matched by source line, op name and argument position; only when the line shows no call of
    that op (the export op came from a different Python function) by value, and then only if no
    other int of that value (derived or another attribute) was passed on that line.
    """
    index = eager_index(c)
    line = _line(c.source)
    # the same line runs once per module instance: keep uses of this module's (or an
    # ancestor's) attributes only
    at_line = [
        u for u in uses if u.line == line and all(_owns(path, c.module) for path, _ in u.src)
    ]
    op = _op_name(c.op)  # "split_with_sizes" comes from Tensor.split, "view" from Tensor.view
    same_call = [u for u in at_line if op.startswith(u.func.lstrip("_"))]
    if same_call and index is not None:
        return [
            u
            for u in same_call
            if u.index == index and u.value == c.value and u.is_attribute and len(u.src) == 1
        ]
    same_value = [u for u in at_line if u.value == c.value]
    if len({(u.src, u.is_attribute) for u in same_value}) != 1:
        return []
    return [u for u in same_value if u.is_attribute and len(u.src) == 1]


def update_shape_attributes(ctx: PassContext) -> None:
    wanted: dict[tuple[str, str], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in ctx.dg.shape_constants:
        for use in matching_uses(c, ctx.int_uses):
            (attr,) = use.src
            wanted[attr][c.expected(ctx.kept)].append(c.source or c.node)
    for (path, name), values in wanted.items():
        if len(values) > 1:
            detail = "; ".join(
                f"{v} at {', '.join(sorted(set(lines)))}" for v, lines in values.items()
            )
            raise PruneError(
                f"attribute {path or '<root>'}.{name} would need several values after pruning "
                f"({detail}); give each use its own attribute, or exclude these groups with "
                f"Plan(ignore=[...])"
            )
        (value,) = values
        module = ctx.model.get_submodule(path) if path else ctx.model
        old = getattr(module, name)
        if old != value:
            setattr(module, name, value)
            ctx.changes.append(f"{path or '<root>'}.{name}: {old} -> {value}")

"""Write the module attributes behind shape constants (``self.num_heads``, split-size lists).

The relation solver (:mod:`graphprune.planning.relations`) decides, from the provenance trace, which
module attributes feed which view/split/slice arguments and what each must become for the kept
channels; this pass writes those values: plain ints, and single elements of tuple, list and
``torch.Size`` attributes (the container is rebuilt, its type kept). Sizes the forward derives
from attributes or tensor shapes follow by themselves; the verification that follows
re-captures the model and compares every constant.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from graphprune.analysis.provenance import AttrKey, resolve_holder
from graphprune.passes.base import PassContext


def _describe(path: str, name: str) -> str:
    return f"{path or '<root>'}.{name}"


def write_attributes(ctx: PassContext, values: dict[AttrKey, int]) -> None:
    """Set each ``(module path, attribute, index)`` to its value (index -1: the attribute
    itself), logging every change in ``ctx.changes``."""
    by_attribute: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for (path, name, index), value in values.items():
        by_attribute[(path, name)][index] = value
    for (path, name), updates in sorted(by_attribute.items()):
        module = resolve_holder(ctx.model, path)
        old: Any = getattr(module, name)
        if -1 in updates:
            new: Any = updates[-1]
        else:
            items = list(old)
            for index, value in updates.items():
                items[index] = value
            new = items if isinstance(old, list) else type(old)(items)
        if new != old:
            setattr(module, name, new)
            ctx.changes.append(f"{_describe(path, name)}: {old} -> {new}")


def update_shape_attributes(ctx: PassContext) -> None:
    write_attributes(ctx, ctx.attributes)

"""Shape-constant arguments as the analyzer names them ("size[2]" of a view, "split_sizes[1]",
"groups"): where each stands in an fx node's arguments, and its value."""

from __future__ import annotations

from typing import Any

from torch import fx


def _argument_slot(node: fx.Node, argument: str) -> tuple[int, int | None] | None:
    """(index into node.args, index inside that list or None) of an argument the analyzer
    named, e.g. "size[2]" of a view -> (1, 2)."""
    name, _, rest = argument.partition("[")
    k = int(rest.rstrip("]")) if rest else 0
    args = list(node.args)
    if name == "size":
        found = next((i for i, a in enumerate(args) if isinstance(a, list | tuple)), None)
        return (found, k) if found is not None else None
    if name in ("split_sizes", "normalized_shape"):
        return 1, k
    if name == "sizes":
        return 2, k
    if name in ("split_size", "num_groups"):
        return 1, None
    if name == "start":
        return 2, None
    if name in ("end", "length"):
        return 3, None
    if name == "groups":
        return (8 if "convolution" in str(node.target) else 6), None
    if name == "arange":
        ints = [i for i, a in enumerate(args) if isinstance(a, int)]
        return (ints[k], None) if k < len(ints) else None
    return None


def argument_value(node: fx.Node, argument: str) -> int | None:
    """The integer at ``argument`` (as the analyzer named it) in ``node``'s arguments."""
    slot = _argument_slot(node, argument)
    if slot is None:
        return None
    i, k = slot
    try:
        value: Any = node.args[i] if k is None else node.args[i][k]  # type: ignore[index]
        return int(value)
    except (IndexError, TypeError, ValueError):
        return None


def argument_position(node: fx.Node, argument: str) -> int | None:
    """Where ``argument`` stands among the node's int arguments, flattened in order."""
    slot = _argument_slot(node, argument)
    if slot is None:
        return None
    i, k = slot
    position = 0
    for j, a in enumerate(node.args):
        values = list(a) if isinstance(a, list | tuple) else [a]
        for m, v in enumerate(values):
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if j == i and (k is None or m == k):
                return position
            position += 1
    return None

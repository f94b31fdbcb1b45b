"""Config fields the modelling code reads with a default: ``head_dim`` is the common one.

Qwen2's attention takes ``getattr(config, "head_dim", None) or hidden_size // heads``: a
config without the field (or with ``None``) derives the width, one that has it states it. A
heads-pruned Qwen2 (4 of 8 query heads, width 32 each) is only expressible with the field
written: derived, ``hidden_size // 4`` would be 64. No table names these fields: they are
found by building the model on the meta device with a config that records every attribute
read that comes back missing or ``None``; a field is *defaulted* when setting it to an int
changes parameter shapes, and its effective value is the one that rebuilds the unpruned
shapes (shapes are linear in it, as in the shape map). The config sync then solves for it
like any int field, and writes it only where the derived default would build other shapes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Shapes = dict[str, tuple[int, ...]]
PROBE = 8  # the trial value a candidate field is set to (and twice it): shapes linear in it


def read_absent(model_class: type, config: Any) -> list[str]:
    """Public attribute names of ``config`` that building ``model_class`` on the meta device
    reads and finds missing or ``None``, in the order read."""
    return [k for k, present in read_fields(model_class, config).items() if not present]


def read_fields(model_class: type, config: Any) -> dict[str, bool]:
    """Public attribute names of ``config`` that building ``model_class`` on the meta device
    reads, in the order first read, each with whether it was there (not missing or None).
    {} where the class cannot be built so."""
    read: dict[str, bool] = {}
    base = type(config)

    class Recording(base):  # type: ignore[misc, valid-type]
        def __getattribute__(self, key: str) -> Any:
            try:
                value = super().__getattribute__(key)
            except AttributeError:
                if not key.startswith("_"):
                    read[key] = False
                raise
            if not key.startswith("_"):
                read[key] = read.get(key, True) and value is not None
            return value

    try:
        recording = copy.deepcopy(config)
        recording.__class__ = Recording  # (a config class with __slots__ refuses: no fields)
        with torch.device("meta"), contextlib.redirect_stdout(None):
            model_class(recording)
    except Exception:
        return {}
    return read


def defaulted_fields(
    model_class: type, config: Any, shapes_of: Callable[[type, Any], Shapes | None]
) -> dict[str, int]:
    """Fields read with a default (:func:`read_absent`) that size parameters, with the value
    each takes in ``config`` (``shapes_of(model_class, config)`` builds on meta)."""
    base = shapes_of(model_class, config)
    if base is None:
        return {}
    found: dict[str, int] = {}
    for name in read_absent(model_class, config):
        low, high = with_values(config, {name: PROBE}), with_values(config, {name: 2 * PROBE})
        at_low = shapes_of(model_class, low) if low is not None else None
        at_high = shapes_of(model_class, high) if high is not None else None
        if at_low is None or at_high is None or at_low == at_high:  # sizes nothing
            continue
        value = _effective(base, at_low, at_high)
        trial = with_values(config, {name: value}) if value is not None else None
        if trial is not None and value is not None and shapes_of(model_class, trial) == base:
            found[name] = value
    return found


def _effective(base: Shapes, low: Shapes, high: Shapes) -> int | None:
    """The field value that gives ``base``, from the shapes at PROBE and 2 x PROBE (each dim
    that changes is linear in the field); None where the dims disagree."""
    values = set()
    for fqn in base.keys() & low.keys() & high.keys():
        if not len(base[fqn]) == len(low[fqn]) == len(high[fqn]):
            continue
        for b, s0, s1 in zip(base[fqn], low[fqn], high[fqn], strict=True):
            if s0 == s1:
                continue
            value = PROBE + (b - s0) * PROBE / (s1 - s0)
            if value <= 0 or value != int(value):
                return None
            values.add(int(value))
    return values.pop() if len(values) == 1 else None


def element(key: str) -> tuple[str, int | None]:
    """``("hidden_sizes", 2)`` for ``"hidden_sizes[2]"`` (one entry of a per-stage or
    per-layer int list), ``(key, None)`` for a plain field."""
    name, bracket, rest = key.partition("[")
    return (name, int(rest[:-1])) if bracket and rest.endswith("]") else (key, None)


def get_field(config: Any, key: str, default: Any = None) -> Any:
    """The value of field ``key`` (``name`` or ``name[i]``) of ``config``."""
    name, index = element(key)
    value = getattr(config, name, default)
    if index is None:
        return value
    return value[index] if isinstance(value, list | tuple) and index < len(value) else default


def set_field(config: Any, key: str, value: Any) -> None:
    """Set field ``key`` (``name`` or ``name[i]``: the list is replaced by a copy)."""
    name, index = element(key)
    if index is None:
        setattr(config, name, value)
        return
    items = list(getattr(config, name))
    items[index] = value
    setattr(config, name, items)


def with_values(config: Any, values: dict[str, Any]) -> Any:
    """A copy of ``config`` with ``values`` set (keys ``name`` or ``name[i]``), or None where
    the config class refuses them (its validators: DINOv2's ``out_features`` must name
    existing stages)."""
    changed = copy.deepcopy(config)
    try:
        for key, value in values.items():
            set_field(changed, key, value)
    except Exception:
        return None
    return changed


def drop_needless(
    model: nn.Module, fields: dict[str, Any], same_build: Callable[[Any, Any], bool]
) -> list[str]:
    """Restore each materialised field of ``model.config`` to how it was (``fields``: name ->
    the original value, or ``ABSENT``) where the config without it builds the same model
    (``same_build(with_it, without_it)``: shapes and module attributes); the names that must
    stay written."""
    config: Any = model.config
    kept = []
    for name, original in fields.items():
        value = getattr(config, name)
        written = copy.deepcopy(config)
        _restore(config, name, original)
        if same_build(written, config):
            continue
        setattr(config, name, value)
        kept.append(name)
    return kept


ABSENT = object()  # a field the config did not have at all


def _restore(config: Any, name: str, original: Any) -> None:
    if original is ABSENT:
        with contextlib.suppress(AttributeError):
            delattr(config, name)
    else:
        setattr(config, name, original)

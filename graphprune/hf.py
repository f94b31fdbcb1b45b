"""Hugging Face ``transformers`` models: the config follows the pruned weights, for any type.

A config class is a function from ints to parameter shapes, and graphprune learns it from the
model class itself instead of a per-family table:

1. **Shape map** (cached per model class and config values). For each int field of the config,
   the model is built on the meta device with that field doubled; the parameter dims that
   change, and by how much, are that field's footprint (``intermediate_size`` -> the MLP's
   ``up/gate`` rows and ``down`` columns in every layer; ``num_key_value_heads`` -> ``k_proj``
   and ``v_proj`` rows). The ``nn.ModuleList`` that grows with ``num_hidden_layers`` is the
   layer list.
2. **Inversion.** After pruning, each footprint dim gives a candidate value of its field
   (linear in the field, the others fixed); the combinations of candidates are tried -- the
   model rebuilt on the meta device from each -- until one reproduces every pruned parameter
   shape. When none does, the fields whose tensors disagree (values that differ between
   layers, say) are reported, and the config keeps the value most of them have.
3. **Exactness.** ``from_pretrained`` is exact only if the rebuilt model also *computes* the
   same: every int/float attribute of every module (an attention ``scaling`` derived from
   ``head_dim``, a ``num_key_value_groups``) is compared with the pruned model's. Otherwise the
   report says which attribute differs and to use ``graphprune.save``/``graphprune.load``.

The attention modules' own counts (``num_heads``, ``head_dim``, ``num_key_value_groups``, ...)
follow the weights through the count relations of :mod:`graphprune.planning.relations` like any
module's; whole layers are removed from the layer list (``layer_idx`` renumbered for the KV
cache, per-layer config lists such as ``layer_types`` sliced). ``transformers`` is optional.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphprune.capture import no_cache, run_eval
from graphprune.dictview import DictView
from graphprune.hf_defaults import (
    ABSENT,
    Shapes,
    defaulted_fields,
    drop_needless,
    element,
    get_field,
    read_fields,
    set_field,
    with_values,
)

LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers")
MAX_CANDIDATES = 64  # config combinations tried when inverting the shape map
REFINE_ROUNDS = 2  # searches around the nearest miss (fields that share a dim)


@dataclass
class ConfigSync(DictView):
    """What :func:`sync_config` found and changed."""

    family: str  # the config's model_type
    changes: dict[str, Any] = field(default_factory=dict)  # config key -> new value
    expressible: bool = True  # save_pretrained/from_pretrained rebuilds the pruned model
    reason: str = ""  # why not
    fields: dict[str, str] = field(default_factory=dict)  # a field that cannot say it -> why
    attributes: list[str] = field(default_factory=list)  # stale module attributes set
    # the plan's config mode: "expressible" (widths were kept to what the config can state)
    # or "free" (any widths; the sync says whether the config happens to state them)
    mode: str = "expressible"

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "mode": self.mode,
            "changes": self.changes,
            "expressible": self.expressible,
            "reason": self.reason,
            "fields": self.fields,
            "attributes": self.attributes,
        }


def is_pretrained(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (duck-typed: transformers is optional)."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and hasattr(config, "to_dict")
        and hasattr(type(model), "config_class")
        and hasattr(model, "base_model")
    )


# -- the shape map ---------------------------------------------------------------------------


@dataclass
class Footprint:
    """How one config field shows in parameter shapes: ``(fqn, dim) -> (size at the original
    value, size at the perturbed value)``."""

    name: str
    value: int
    perturbed: int
    dims: dict[tuple[str, int], tuple[int, int]]

    def infer(self, shapes: Shapes) -> set[int]:
        """The field values the pruned shapes imply (linear in the field, others fixed)."""
        found = set()
        for (fqn, dim), (s0, s1) in self.dims.items():
            if fqn not in shapes or dim >= len(shapes[fqn]):
                continue
            step = (s1 - s0) / (self.perturbed - self.value)
            value = self.value + (shapes[fqn][dim] - s0) / step
            if value > 0 and abs(value - round(value)) < 1e-9:
                found.add(round(value))
        return found


@dataclass
class ShapeMap:
    base: Shapes
    footprints: dict[str, Footprint]
    layer_list: str | None  # FQN of the ModuleList that follows the layer count
    # fields the modelling code reads with a default (hf_defaults), at their effective values:
    # the footprints are measured with them written
    defaults: dict[str, int] = field(default_factory=dict)
    # config lists with one entry per layer that building the model reads (layer_types);
    # a list that is only as long as the layer count by chance (Whisper's
    # begin_suppress_tokens, read by generate) is not one
    layer_lists: list[str] = field(default_factory=list)


def _build(model_class: type, config: Any) -> nn.Module | None:
    """``model_class(config)`` on the meta device, or None for a config the class rejects
    (hidden % heads != 0, say)."""
    try:
        with torch.device("meta"), contextlib.redirect_stdout(None):
            return model_class(copy.deepcopy(config))
    except Exception:
        return None


def _rebuilt(
    model_class: type, config: Any, values: dict[str, Any]
) -> tuple[nn.Module, Shapes] | None:
    """``model_class`` built on meta from ``config`` with ``values`` set, and its shapes (None
    where the config refuses the values or the class the config)."""
    cfg = with_values(config, values)
    fresh = _build(model_class, cfg) if cfg is not None else None
    if fresh is None:
        return None
    return fresh, {k: tuple(v.shape) for k, v in fresh.state_dict().items()}


def meta_shapes(model_class: type, config: Any) -> Shapes | None:
    """Parameter and buffer shapes of ``model_class(config)`` built on the meta device."""
    model = _build(model_class, config)
    return None if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}


def attribute_differences(model: nn.Module, fresh: nn.Module) -> list[tuple[str, str, Any, Any]]:
    """``(module path, attribute, pruned value, rebuilt value)`` for every int/float attribute
    of a module that ``fresh`` (built from a config) sets differently from ``model``."""
    ours = dict(model.named_modules())
    found = []
    for path, rebuilt in fresh.named_modules():
        module = ours.get(path)
        if module is None:
            continue
        for name, value in vars(rebuilt).items():
            if name.startswith("_") or name == "training" or type(value) not in (int, float):
                continue
            current = vars(module).get(name)
            if type(current) in (int, float) and current != value:
                found.append((path, name, current, value))
    return found


def int_fields(config: Any) -> dict[str, int]:
    """The config's own int fields (not token ids: they size nothing), and each entry of its
    int lists as ``name[i]`` (per-stage widths and head counts: ConvNeXt's ``hidden_sizes``,
    Swin's ``num_heads``)."""
    found: dict[str, int] = {}
    for k, v in config.to_dict().items():
        if k.endswith(("token_id", "token_ids", "_tokens")):  # ids size nothing
            continue
        if type(v) is int and v > 0:
            found[k] = v
        elif isinstance(v, list) and v and all(type(i) is int and i > 0 for i in v):
            found.update({f"{k}[{i}]": item for i, item in enumerate(v)})
    return found


_MAPS: dict[tuple[type, str], ShapeMap] = {}


def shape_map(model_class: type, config: Any) -> ShapeMap | None:
    """The shape map of ``model_class`` at ``config`` (rule 1 of the module docstring),
    cached per class and config values."""
    key = (model_class, json.dumps(config.to_dict(), sort_keys=True, default=str))
    if key in _MAPS:
        return _MAPS[key]
    defaults = defaulted_fields(model_class, config, meta_shapes)
    config = with_values(config, defaults) if defaults else config
    base = meta_shapes(model_class, config) if config is not None else None  # (on a copy)
    if base is None:
        return None
    footprints: dict[str, Footprint] = {}
    layer_list = None
    count = next((v for k, v in int_fields(config).items() if k in LAYER_FIELDS), None)
    read = read_fields(model_class, config)
    per_layer = [
        key for key, items in config.to_dict().items()
        if isinstance(items, list) and len(items) == count and key in read
    ]  # fmt: skip
    for name, value in int_fields(config).items():
        changes: dict[str, Any] = {name: 2 * value}
        if name in LAYER_FIELDS:  # per-layer lists (layer_types) must keep the layer count
            for key in per_layer:
                changes[key] = list(getattr(config, key)) * 2
        perturbed = with_values(config, changes)
        shapes = meta_shapes(model_class, perturbed) if perturbed is not None else None
        if shapes is None:
            continue
        dims = {
            (fqn, d): (base[fqn][d], shapes[fqn][d])
            for fqn in sorted(base.keys() & shapes.keys())
            if len(base[fqn]) == len(shapes[fqn])
            for d in range(len(base[fqn]))
            if base[fqn][d] != shapes[fqn][d]
        }
        if dims:
            footprints[name] = Footprint(name, value, 2 * value, dims)
        if name in LAYER_FIELDS and layer_list is None:
            layer_list = _grown_list(base.keys(), shapes.keys())
    found = ShapeMap(base, footprints, layer_list, defaults, per_layer)
    _MAPS[key] = found
    return found


def _grown_list(before: Any, after: Any) -> str | None:
    """The prefix ``X`` of the parameters ``X.<i>.…`` that only the larger model has."""
    new = sorted(set(after) - set(before))
    prefixes = set()
    for fqn in new:
        parts = fqn.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is not None:
            prefixes.add(".".join(parts[:index]))
    return prefixes.pop() if len(prefixes) == 1 else None


# -- the layer list ----------------------------------------------------------------------------
def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """FQN and module of the layer list (the ModuleList that follows the layer count)."""
    if not is_pretrained(model):
        return None
    found = shape_map(type(model), model.config)
    if found is None or found.layer_list is None:
        return None
    try:
        layers = model.get_submodule(found.layer_list)
    except AttributeError:
        return None
    return (found.layer_list, layers) if isinstance(layers, nn.ModuleList) else None


def layer_paths(model: nn.Module) -> list[str]:
    """FQNs of the layer-list entries (the candidates of granularity='layers')."""
    found = layer_list(model)
    return [f"{found[0]}.{i}" for i in range(len(found[1]))] if found else []


def remove_layers(model: nn.Module, paths: list[str]) -> bool:
    """Delete the layers ``paths`` (FQNs of layer-list entries) from an HF model's layer list,
    renumber ``layer_idx`` and set the layer count (and slice per-layer config lists). False
    when ``paths`` are not entries of that list: the caller drops them otherwise."""
    found = layer_list(model)
    if found is None or not paths:
        return False
    path, layers = found
    indices = {p.removeprefix(path + ".") for p in paths}
    if not all(p.startswith(path + ".") for p in paths) or not all(
        i.isdigit() and int(i) < len(layers) for i in indices
    ):
        return False
    drop = {int(i) for i in indices}
    keep = [i for i in range(len(layers)) if i not in drop]
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.ModuleList([layers[i] for i in keep]))
    for new, old in enumerate(keep):
        for module in layers[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new)  # noqa: B010 (the KV cache indexes by position)
    config: Any = model.config
    count = len(layers)
    mapped = shape_map(type(model), config)
    per_layer = mapped.layer_lists if mapped is not None else []
    # a config whose validators refuse the new count stays as it was: sync_config's rebuild
    # check then reports that from_pretrained cannot rebuild the model
    with contextlib.suppress(Exception):
        for key, value in config.to_dict().items():
            if key in per_layer and isinstance(value, list) and len(value) == count:
                setattr(config, key, [value[i] for i in keep])  # layer_types, patterns...
        for key in LAYER_FIELDS:
            if hasattr(config, key):
                setattr(config, key, len(keep))
                break
        _renumber_stages(config, count, keep)
    return True


def _renumber_stages(config: Any, count: int, keep: list[int]) -> None:
    """A backbone config names its outputs by stage (``stem``, ``stage1`` ... one per layer:
    DINOv2, ViT backbones): the stages follow the kept layers, and an output index that
    named a removed layer's stage names the stage of the last kept layer before it."""
    stages = getattr(config, "stage_names", None)
    indices = getattr(config, "out_indices", None)
    if not (isinstance(stages, list) and len(stages) == count + 1 and indices is not None):
        return
    if not hasattr(config, "set_output_features_output_indices"):
        return
    old = [j % (count + 1) for j in indices]
    new = sorted({sum(1 for i in keep if i < j) for j in old})
    config.stage_names = [stages[0], *(f"stage{i}" for i in range(1, len(keep) + 1))]
    config.set_output_features_output_indices(out_features=None, out_indices=new)


# -- config sync -------------------------------------------------------------------------------
def sync_config(
    model: nn.Module, original: Any = None, example_inputs: Any = None, mode: str = "expressible"
) -> ConfigSync | None:
    """Set the config of a pruned HF model from its weights (rules 2 and 3 of the module
    docstring), in place; ``changes`` are relative to ``original`` (the unpruned config) when
    given. None for a model that is not a transformers model."""
    if not is_pretrained(model):
        return None
    config: Any = model.config
    before = original if original is not None else copy.deepcopy(config)
    sync = ConfigSync(str(getattr(config, "model_type", type(config).__name__)), mode=mode)
    found = shape_map(type(model), before)  # footprints are measured on the unpruned config
    if found is None:
        sync.expressible = False
        sync.reason = (
            f"{type(model).__name__} cannot be rebuilt from its config on the meta device, so "
            "its config is not synced (use graphprune.save/load)"
        )
        return sync
    pruned = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # fields read with a default are solved for like the others, then written only where
    # the derived default would build other shapes (a heads-pruned Qwen2's head_dim)
    written = {k: getattr(config, k, ABSENT) for k in found.defaults}
    for name, value in found.defaults.items():
        setattr(config, name, value)
    problems: dict[str, str] = {"config": "the sync did not finish"}
    try:
        values, problems = _invert(found, pruned, int_fields(config), model)
        for name, value in values.items():
            if get_field(config, name) != value:
                try:
                    set_field(config, name, value)
                except Exception as exc:  # the config class's validators refuse it
                    problems[name] = f"the config refuses {value}: {type(exc).__name__}: {exc}"
    finally:  # (with problems the config is not claimed: the defaults go back as they were)
        drop_needless(model, written, lambda a, b: bool(problems) or _same_build(type(model), a, b))
    aliases = {v: k for k, v in getattr(type(config), "attribute_map", {}).items()}
    for key, value in int_fields(config).items():
        if get_field(before, key) != value:
            name, index = element(key)  # a list is reported whole: hidden_sizes=[48, 96]
            whole = value if index is None else getattr(config, name)
            sync.changes[aliases.get(name, name)] = whole
    sync.fields = {aliases.get(k, k): why for k, why in problems.items()}
    if problems:
        sync.expressible = False
        sync.reason = "; ".join(f"{k}: {why}" for k, why in sync.fields.items()) + (
            " (use graphprune.save/load)"
        )
        return sync
    sync.expressible, sync.reason, sync.attributes = _rebuilds(model, before, example_inputs)
    return sync


def _same_build(model_class: type, a: Any, b: Any) -> bool:
    """Configs ``a`` and ``b`` build ``model_class`` with the same shapes and attributes."""
    first, second = _build(model_class, a), _build(model_class, b)
    if first is None or second is None:
        return False
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (first, second)]
    return shapes[0] == shapes[1] and not attribute_differences(first, second)


@dataclass
class _Inferred:
    """What each field's footprint alone says of the pruned shapes."""

    candidates: dict[str, set[int]]  # values to try jointly
    problems: dict[str, str]  # fields whose tensors disagree -> how
    majority: dict[str, int]  # ... and the value most tensors that grow with it have
    single: dict[str, int]  # fields whose tensors all agree on one value


def _infer_fields(found: ShapeMap, pruned: Shapes, fields: dict[str, int]) -> _Inferred:
    """Each field's values from its footprint alone (linear in it, the others fixed)."""
    candidates: dict[str, set[int]] = {}
    problems: dict[str, str] = {}
    majority: dict[str, int] = {}
    single: dict[str, int] = {}  # fields whose tensors all agree on one value
    for name, footprint in found.footprints.items():
        if name in LAYER_FIELDS:
            continue
        by_value: dict[int, list[str]] = {}
        growing: dict[int, list[str]] = {}  # from dims that grow with the field (see below)
        for (fqn, d), (s0, s1) in footprint.dims.items():
            one = Footprint(name, footprint.value, footprint.perturbed, {(fqn, d): (s0, s1)})
            for value in one.infer(pruned):
                by_value.setdefault(value, []).append(fqn)
                if s1 > s0:
                    growing.setdefault(value, []).append(fqn)
        if len(by_value) > 1:  # the layers (or the tensors of one) disagree
            problems[name] = "the pruned weights need several values: " + "; ".join(
                f"{v} ({fqns[0]}{f' and {len(fqns) - 1} more' if len(fqns) > 1 else ''})"
                for v, fqns in sorted(by_value.items())
            )
            # if no config builds it, the config still says what most of the tensors that
            # grow with the field have (not a divisor's: heads in head_dim = hidden / heads)
            if growing:
                majority[name] = max(growing, key=lambda v: (len(growing[v]), v))
        if len(by_value) == 1 and all(s1 > s0 for s0, s1 in footprint.dims.values()):
            single[name] = next(iter(by_value))
        if by_value and set(by_value) != {fields.get(name, footprint.value)}:
            # a value from one field's footprint alone: the fields are solved jointly below
            # (Qwen3's k_norm has head_dim rows while k_proj has kv_heads x head_dim)
            candidates[name] = set(by_value) | {fields.get(name, footprint.value)}
    return _Inferred(candidates, problems, majority, single)


def _invert(
    found: ShapeMap, pruned: Shapes, fields: dict[str, int], model: nn.Module
) -> tuple[dict[str, int], dict[str, str]]:
    """Config values that rebuild ``pruned`` exactly (the model's config, as the relations
    left it, is the starting point), and the fields that cannot say it. Of the configs that
    build the same shapes (``head_dim`` 8 or half the heads), the one whose modules count as
    the pruned model's do wins."""
    model_class, config = type(model), model.config
    inferred = _infer_fields(found, pruned, fields)
    candidates, problems = inferred.candidates, inferred.problems
    majority, single = inferred.majority, inferred.single
    fixed: dict[str, int] = {}
    layers = layer_count(found, pruned)
    key = next((k for k in LAYER_FIELDS if k in fields), None)
    if key is not None and layers is not None:
        fixed[key] = layers
    best: tuple[int, dict[str, int], str] | None = None
    shape_match: tuple[int, dict[str, int]] | None = None  # (attribute differences, values)
    for _ in range(REFINE_ROUNDS + 1):
        names = sorted(candidates)
        combos = itertools.product(*(sorted(candidates[n]) for n in names))
        for combo in itertools.islice(combos, MAX_CANDIDATES):
            trial = {**fixed, **dict(zip(names, combo, strict=True))}
            built = _rebuilt(model_class, config, trial)
            if built is None:
                continue
            fresh, shapes = built
            keys = sorted(pruned.keys() | shapes.keys())
            mismatch = [k for k in keys if pruned.get(k) != shapes.get(k)]
            if not mismatch:
                differences = len(attribute_differences(model, fresh))
                if not differences:
                    return trial, {}
                # an attribute no forward reads may be stale in every candidate (a decoder
                # layer's hidden_size); the candidate that differs in fewest wins (heads halved
                # leaves head_dim and the attention scale as they were, head_dim halved does not)
                if shape_match is None or differences < shape_match[0]:
                    shape_match = (differences, trial)
                continue
            first = mismatch[0]
            why = (
                f"{first} is {_shape(pruned, first)} but the config builds "
                f"{_shape(shapes, first)}"
            )
            if best is None or len(mismatch) < best[0]:
                best = (len(mismatch), trial, why)
        if shape_match is not None or best is None:
            break
        more = _local_candidates(found, pruned, fields, model, best[1])
        grown = {n: candidates.get(n, set()) | v for n, v in more.items()}
        if all(grown[n] <= candidates.get(n, set()) for n in grown):
            break
        for n, values in grown.items():  # (a field new to the search keeps its value too)
            candidates[n] = values | {fields.get(n, found.footprints[n].value)}
    if shape_match is not None:
        return _counted_fields(model, found, shape_match[1], fields), {}
    # no config builds it: the config says what the tensors agree on (most of them, for the
    # fields that disagree, which say why), never a guessed combination
    fallback = {**fixed, **single, **majority}
    if problems:
        return fallback, problems
    if best is None:
        return fallback, {"config": "no candidate config builds this model"}
    return fallback, {"shapes": best[2]}


def _local_candidates(
    found: ShapeMap, pruned: Shapes, fields: dict[str, int], model: nn.Module,
    trial: dict[str, int],
) -> dict[str, set[int]]:
    """Field values the pruned shapes imply around ``trial`` (the nearest miss), each field
    doubled there in turn: where one dim follows several fields, a footprint measured at the
    unpruned config misleads. Phi-3's fused ``qkv_proj`` has (heads + 2 x kv_heads) x head_dim
    rows: with the query heads halved, its rows say kv_heads only once heads is set."""
    model_class, config = type(model), model.config
    built = _rebuilt(model_class, config, trial)
    if built is None:
        return {}
    at_trial = built[1]
    missed = [k for k in pruned if k in at_trial and pruned[k] != at_trial[k]
              and len(pruned[k]) == len(at_trial[k])]  # fmt: skip
    found_values: dict[str, set[int]] = {}
    for name, footprint in found.footprints.items():
        if name in LAYER_FIELDS:
            continue
        value = trial.get(name, fields.get(name, footprint.value))
        doubled = _rebuilt(model_class, config, {**trial, name: 2 * value})
        if doubled is None:
            continue
        for fqn in missed:
            s1 = doubled[1].get(fqn)
            if s1 is None or len(s1) != len(pruned[fqn]):
                continue
            for want, s0, s2 in zip(pruned[fqn], at_trial[fqn], s1, strict=True):
                if s2 == s0:
                    continue
                solved = value + (want - s0) * value / (s2 - s0)
                if solved > 0 and abs(solved - round(solved)) < 1e-9:
                    found_values.setdefault(name, set()).add(round(solved))
    return found_values


def _counted_fields(
    model: nn.Module, found: ShapeMap, trial: dict[str, int], fields: dict[str, int]
) -> dict[str, int]:
    """``trial`` with the int fields no parameter shape shows set to what the pruned modules
    count: BERT's or GPT-2's heads, whose weights are hidden x hidden at any head count (the
    head size is hidden / heads), show only in the attention modules' attributes. A field
    takes an attribute's pruned value where the attribute's rebuilt value is the field's and
    the change leaves fewer attributes differing with the same shapes (greedy, field by
    field)."""
    model_class, config = type(model), model.config
    pruned = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def differences(values: dict[str, int]) -> list[tuple[str, str, Any, Any]] | None:
        built = _rebuilt(model_class, config, values)
        if built is None or built[1] != pruned:
            return None
        return attribute_differences(model, built[0])

    now = differences(trial)
    for name, value in sorted(fields.items()):
        if not now or name in found.footprints or name in trial:
            continue
        proposals = {a for _, _, a, b in now if type(a) is int and type(b) is int and b == value}
        for proposal in sorted(proposals):
            fewer = differences({**trial, name: proposal})
            if fewer is not None and len(fewer) < len(now):
                trial, now = {**trial, name: proposal}, fewer
                break
    return trial


def _shape(shapes: Shapes, key: str) -> str:
    return str(shapes[key]) if key in shapes else "absent"


def layer_count(found: ShapeMap, pruned: Shapes) -> int | None:
    """Entries of the layer list in the pruned model."""
    if found.layer_list is None:
        return None
    prefix = found.layer_list + "."
    indices = {k[len(prefix) :].split(".")[0] for k in pruned if k.startswith(prefix)}
    return len([i for i in indices if i.isdigit()])


def round_trip(config: Any) -> Any:
    """``config`` as save_pretrained then from_pretrained rebuild it (with its validation)."""
    return type(config).from_dict(config.to_dict())


def _rebuilds(model: nn.Module, original: Any, example_inputs: Any) -> tuple[bool, str, list[str]]:
    """Does ``type(model)(config)`` have the pruned model's shapes *and* compute the same (the
    same int and float attributes in every module)? An attribute pruning left at its unpruned
    value while the config now sets it otherwise (``LlamaDecoderLayer.hidden_size``, which no
    forward reads) takes the config's value, if the outputs on ``example_inputs`` stay the
    same; the changes made are returned."""
    config: Any = model.config
    try:  # the round trip save_pretrained/from_pretrained makes, with its validation
        saved = round_trip(config)
    except Exception as exc:  # DINOv2: out_features name a stage the fewer layers lack
        return (
            False,
            (
                f"the synced config does not load: {type(exc).__name__}: {exc} "
                "(use graphprune.save/load)"
            ),
            [],
        )
    fresh = _build(type(model), saved)
    if fresh is None:
        return False, "the config cannot build this model (use graphprune.save/load)", []
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            return (
                False,
                (
                    f"{key}: pruned {_shape(want, key)}, config builds {_shape(have, key)} "
                    "(use graphprune.save/load)"
                ),
                [],
            )
    differences = attribute_differences(model, fresh)
    unpruned = _build(type(model), original) if differences else None
    at_start = (
        {(p, n): v for p, n, _, v in attribute_differences(model, unpruned)}
        if (unpruned is not None)
        else {}
    )
    stale = [(p, n, old, new) for p, n, old, new in differences if (p, n) not in at_start]
    if stale and len(stale) == len(differences) and example_inputs is not None:
        modules = dict(model.named_modules())
        before = _outputs(model, example_inputs)
        for path, name, _, new in stale:
            setattr(modules[path], name, new)
        try:
            after = _outputs(model, example_inputs)
        except Exception:  # the rebuilt value breaks the forward: it was read after all
            after = []
        if _same(before, after):
            why, folded = _differ_unless_folded(model, saved, example_inputs)
            changed = [f"{p or '<root>'}.{n}: {old} -> {new}" for p, n, old, new in stale]
            return not why, why, changed + folded
        for path, name, old, _ in stale:
            setattr(modules[path], name, old)
    if differences:
        path, name, current, value = differences[0]
        return (
            False,
            (
                f"{path or '<root>'}.{name} is {current} in the pruned model but {value} when "
                "rebuilt from the config, so from_pretrained would compute something else "
                "(use graphprune.save/load)"
            ),
            [],
        )
    why, folded = _differ_unless_folded(model, saved, example_inputs)
    return not why, why, folded


def _differ_unless_folded(
    model: nn.Module, config: Any, example_inputs: Any
) -> tuple[str, list[str]]:
    """:func:`_rebuilt_outputs_differ`, after folding derived scales where they differ."""
    why = _rebuilt_outputs_differ(model, config, example_inputs)
    unfolded: list[str] = []
    folded = fold_derived_scales(model, config, example_inputs, unfolded) if why else []
    if folded:
        why = _rebuilt_outputs_differ(model, config, example_inputs)
    if why and unfolded:  # name the derived value that differs
        why = why.replace(" (use graphprune.save/load)", f" ({'; '.join(unfolded)}; use "
                          "graphprune.save/load)")  # fmt: skip
    return why, folded


def fold_derived_scales(
    model: nn.Module, config: Any, example_inputs: Any, unfolded: list[str] | None = None
) -> list[str]:
    """Carry in the weights a scalar buffer the modelling code derives from the config (Gemma's
    embedding scale sqrt(hidden_size), made at construction): where a model built from
    ``config`` holds another value, the buffer takes that value and its module's weight is
    scaled by old / new -- kept only if the pruned model's outputs on ``example_inputs`` stay
    the same (not for an embedding tied to the output head: that one stays reported, and is
    described in ``unfolded``). The changes made are returned."""
    if example_inputs is None:
        return []
    try:
        fresh = _loaded(model, config)
        before = _outputs(model, example_inputs)
    except Exception:
        return []
    theirs = dict(fresh.named_buffers())
    done = []
    for name, ours in list(model.named_buffers()):
        other = theirs.get(name)
        if other is None or ours.numel() != 1 or other.numel() != 1:
            continue
        if not ours.is_floating_point() or float(ours) == float(other) or float(other) == 0:
            continue
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name)
        weight = getattr(owner, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        old_value, old_weight = ours.detach().clone(), weight.detach().clone()
        factor = float(ours) / float(other)
        with torch.no_grad():
            weight.mul_(factor)
            ours.copy_(other.to(ours.dtype))
        try:
            same = _same(before, _outputs(model, example_inputs))
        except Exception:
            same = False
        if same:
            done.append(f"{owner_name}.weight x {factor:.6g}, {name}: {float(old_value):.6g} -> "
                        f"{float(other):.6g} (folded)")  # fmt: skip
            continue
        with torch.no_grad():
            weight.copy_(old_weight)
            ours.copy_(old_value)
        if unfolded is not None:
            unfolded.append(
                f"{name} is {float(ours):.6g} here but {float(other):.6g} when built from the "
                f"config, and folding it into {owner_name}.weight changes the outputs (a weight "
                "tied to another layer)"
            )
    return done


REBUILD_CHECK_BYTES = 4 << 30  # larger models: shapes and attributes checked, outputs not


def _rebuilt_outputs_differ(model: nn.Module, config: Any, example_inputs: Any) -> str:
    """'' when ``from_pretrained`` of the pruned weights and ``config`` (in memory: no files;
    module construction derives values from the config, as on load: scale buffers, rotary
    tables) gives the pruned model's outputs on ``example_inputs``; else why not."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if example_inputs is None or weights > REBUILD_CHECK_BYTES:
        return ""
    try:
        fresh = _loaded(model, config)
        expected, found = _outputs(model, example_inputs), _outputs(fresh, example_inputs)
    except Exception as exc:
        return (
            f"a model built from the synced config does not take the pruned weights "
            f"({type(exc).__name__}: {str(exc).strip()[:200]}) (use graphprune.save/load)"
        )
    if _same(expected, found):
        return ""
    gap = max(
        (float((a.double() - b.double()).abs().max()) for a, b in zip(expected, found, strict=False)
         if a.shape == b.shape),
        default=float("inf"),
    )  # fmt: skip
    return (
        "a model built from the synced config and loaded with the pruned weights computes "
        f"other outputs (largest difference {gap:.3g}): a value the modelling code derives "
        "from the config when it builds the model differs from the pruned model's (use "
        "graphprune.save/load)"
    )


def _loaded(model: nn.Module, config: Any) -> nn.Module:
    """``type(model).from_pretrained`` of ``config`` and the pruned model's state dict, in the
    model's dtype: built on the meta device and given the weights, no random init (a 1.1 B
    model in 0.1 s, not 16 s). Buffers outside the state dict (rotary tables, embedding
    scales: the values the config derives) are the loader's own, in the dtype the pruned
    model holds them in (a model cast with ``.bfloat16()`` holds its rotary table in bf16;
    that is no difference of the config's)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with contextlib.redirect_stdout(None), contextlib.redirect_stderr(io.StringIO()):
        fresh, info = type(model).from_pretrained(  # type: ignore[attr-defined]
            None, config=copy.deepcopy(config), state_dict=model.state_dict(), dtype=dtype,
            output_loading_info=True,
        )  # fmt: skip
    unloaded = sorted(
        {*info.get("missing_keys", ()), *info.get("unexpected_keys", ()),
         *(str(k) for k in info.get("mismatched_keys", ()))}
    )  # fmt: skip
    if unloaded:
        raise ValueError(f"from_pretrained leaves {len(unloaded)} unloaded, e.g. {unloaded[0]}")
    # in the dtypes the pruned model holds them in (its _keep_in_fp32_modules or a wholesale
    # .bfloat16() are the user's choice, not the config's)
    held = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, tensor in [*fresh.named_parameters(), *fresh.named_buffers()]:
            if name in held and tensor.is_floating_point() and tensor.dtype != held[name].dtype:
                owner, _, leaf = name.rpartition(".")
                module = fresh.get_submodule(owner)
                cast = tensor.to(held[name].dtype)
                setattr(module, leaf, nn.Parameter(cast, tensor.requires_grad)
                        if isinstance(tensor, nn.Parameter) else cast)  # fmt: skip
    return fresh.train(model.training)


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    with no_cache(model):
        out = run_eval(model, example_inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6)
        for x, y in zip(a, b, strict=True)
    )

"""Hugging Face ``transformers`` models: configs and attention attributes kept in sync.

graphprune prunes a ``PreTrainedModel`` like any module (the analyzer needs no model-specific
rules); this module knows the four families' conventions so that afterwards

* every attention module's own counts (``num_heads``, ``num_attention_heads``,
  ``all_head_size``, ``num_key_value_groups``, ``embed_dim``) match its pruned projections,
* the config says ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
  ``head_dim``, ``intermediate_size`` (GPT-2: ``n_inner``) and ``num_hidden_layers`` of the
  pruned model when they are the same in every layer, and
* whether ``save_pretrained``/``from_pretrained`` can rebuild it is *checked*, not assumed: a
  fresh model is built from the updated config on the meta device and its state_dict shapes are
  compared with the pruned model's. Per-layer sizes a config cannot express (or BERT/GPT-2/ViT
  attention narrower than the hidden size, which their configs tie together) need
  ``graphprune.save`` / ``graphprune.load``.

Whole layers are removed from the layer list (not replaced by an identity), with ``layer_idx``
renumbered for the KV cache, so ``generate()`` keeps working. ``transformers`` is optional.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Family:
    """Where a family keeps things, relative to ``model.base_model`` and to one layer."""

    layers: str  # the nn.ModuleList of encoder/decoder layers
    attention: str  # the module computing attention in a layer
    query: str  # q projection (GPT-2: the fused qkv Conv1D)
    key: str | None  # k projection (None: fused with q)
    mlp_up: str  # first MLP projection: its width is the intermediate size
    heads_attr: str | None  # the attention module's head count attribute
    head_dim_attr: str
    intermediate_key: str = "intermediate_size"


FAMILIES = {
    "gpt2": Family(
        "h", "attn", "attn.c_attn", None, "mlp.c_fc", "num_heads", "head_dim", "n_inner"
    ),
    "llama": Family(
        "layers",
        "self_attn",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "mlp.gate_proj",
        None,
        "head_dim",
    ),
    "bert": Family(
        "encoder.layer",
        "attention.self",
        "attention.self.query",
        "attention.self.key",
        "intermediate.dense",
        "num_attention_heads",
        "attention_head_size",
    ),
    "vit": Family(
        "layers",
        "attention",
        "attention.q_proj",
        "attention.k_proj",
        "mlp.fc1",
        "num_attention_heads",
        "head_dim",
    ),
}


@dataclass
class LayerSizes:
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


@dataclass
class ConfigSync:
    """What :func:`sync_config` found and changed."""

    family: str
    changes: dict[str, Any] = field(default_factory=dict)  # config key -> new value
    layers: list[LayerSizes] = field(default_factory=list)
    expressible: bool = True  # save_pretrained/from_pretrained rebuilds the pruned model
    reason: str = ""  # why not

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "changes": self.changes,
            "layers": [vars(x) for x in self.layers],
            "expressible": self.expressible,
            "reason": self.reason,
        }


def family_of(model: nn.Module) -> Family | None:
    """The family of a transformers model, or None for anything else."""
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    if config is None or base is None or not hasattr(config, "to_dict"):
        return None
    return FAMILIES.get(getattr(config, "model_type", ""))


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """FQN and module of the encoder/decoder layer list of a supported HF model."""
    family = family_of(model)
    if family is None:
        return None
    base_name = next(n for n, m in model.named_modules() if m is model.base_model)
    path = f"{base_name}.{family.layers}" if base_name else family.layers
    try:
        layers = model.get_submodule(path)
    except AttributeError:  # another transformers version's layout: not synced, not guessed
        return None
    return (path, layers) if isinstance(layers, nn.ModuleList) else None


@contextlib.contextmanager
def no_cache(model: nn.Module | None) -> Iterator[None]:
    """``config.use_cache=False`` while capturing or exporting: a KV cache is an output object
    torch.export cannot flatten, and pruning does not need it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    saved = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = saved


def without_cache(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn(model, ..., baseline=...)`` with both models' KV cache off (see no_cache)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0] if args else kwargs.get("model")
        with no_cache(model), no_cache(kwargs.get("baseline")):  # type: ignore[arg-type]
            return fn(*args, **kwargs)

    return wrapper


def _width(module: nn.Module) -> int:
    """Output width of a Linear or of transformers' Conv1D (weight (in, out))."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])


def _sizes(layer: nn.Module, family: Family) -> LayerSizes:
    attention = layer.get_submodule(family.attention)
    head_dim = int(getattr(attention, family.head_dim_attr))
    q_width = _width(layer.get_submodule(family.query))
    if family.key is None:  # fused qkv of equal widths
        q_width //= 3
        kv_width = q_width
    else:
        kv_width = _width(layer.get_submodule(family.key))
    return LayerSizes(
        q_width // head_dim,
        kv_width // head_dim,
        head_dim,
        _width(layer.get_submodule(family.mlp_up)),
    )


def _hidden_size(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    projection = getattr(embeddings, "projection", None)  # ViT patch embeddings
    assert isinstance(projection, nn.Conv2d), type(embeddings)
    return projection.out_channels


def sync_config(model: nn.Module, original: Any = None) -> ConfigSync | None:
    """Update the attention modules' counts and the config of a pruned HF model in place.
    ``changes`` are relative to ``original`` (the unpruned model's config) when given."""
    family = family_of(model)
    if family is None:
        return None
    config: Any = model.config
    sync = ConfigSync(str(config.model_type))
    found = layer_list(model)
    if found is None:  # say so rather than guess
        sync.expressible = False
        sync.reason = (
            f"no layer list at {family.layers!r}: this transformers version lays "
            f"{type(model).__name__} out differently; config not synced (use graphprune.save)"
        )
        return sync
    _, layers = found
    sync.layers = [_sizes(layer, family) for layer in layers]
    for layer, sizes in zip(layers, sync.layers, strict=True):
        attention: Any = layer.get_submodule(family.attention)
        if family.heads_attr:
            setattr(attention, family.heads_attr, sizes.heads)
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = sizes.heads * sizes.head_dim
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = sizes.heads // max(sizes.kv_heads, 1)
        if hasattr(attention, "embed_dim"):
            attention.embed_dim = _hidden_size(model)
    wanted: dict[str, Any] = {"hidden_size": _hidden_size(model), "num_hidden_layers": len(layers)}
    for key, values in [
        ("num_attention_heads", {s.heads for s in sync.layers}),
        ("num_key_value_heads", {s.kv_heads for s in sync.layers}),
        ("head_dim", {s.head_dim for s in sync.layers}),
        (family.intermediate_key, {s.intermediate for s in sync.layers}),
    ]:
        if len(values) == 1 and (hasattr(config, key) or key == family.intermediate_key):
            wanted[key] = values.pop()
        elif len(values) > 1:
            sync.expressible, sync.reason = False, f"per-layer {key}: {sorted(values)}"
    if family.key is None or not hasattr(config, "num_key_value_heads"):
        wanted.pop("num_key_value_heads", None)
    if not hasattr(config, "head_dim"):
        wanted.pop("head_dim", None)
    gpt2_default = family.intermediate_key == "n_inner" and config.n_inner is None
    if gpt2_default and wanted.get("n_inner") == 4 * wanted["hidden_size"]:
        wanted.pop("n_inner")  # GPT-2's default (None = 4 x hidden) still holds
    before = original if original is not None else copy.deepcopy(config)
    for key, value in wanted.items():
        if getattr(before, key, None) != value:
            sync.changes[key] = value
        setattr(config, key, value)
    if sync.expressible:
        sync.expressible, sync.reason = _rebuilds(model)
    return sync


def _rebuilds(model: nn.Module) -> tuple[bool, str]:
    """Does ``type(model)(config)`` have the pruned model's parameter shapes?"""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as exc:  # a config the family rejects (e.g. hidden % heads != 0)
        return False, f"the config cannot build this model: {type(exc).__name__}: {exc}"
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            return False, (
                f"{key}: pruned {want.get(key)}, config builds {have.get(key)} "
                "(use graphprune.save/load)"
            )
    return True, ""


def remove_layers(model: nn.Module, paths: list[str]) -> bool:
    """Delete the layers ``paths`` (FQNs of layer-list entries) from an HF model's layer list,
    renumber ``layer_idx`` and set ``num_hidden_layers`` (and ``layer_types``). False when
    ``paths`` are not entries of that list (not an HF model): the caller drops them otherwise."""
    found = layer_list(model)
    if found is None:
        return False
    path, layers = found
    indices = {p.removeprefix(path + ".") for p in paths}
    if not paths or not all(p.startswith(path + ".") for p in paths):
        return False
    if not all(i.isdigit() and int(i) < len(layers) for i in indices):
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
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    return True


def layer_paths(model: nn.Module) -> list[str]:
    """FQNs of the layer-list entries (the candidates of granularity='layers')."""
    found = layer_list(model)
    return [f"{found[0]}.{i}" for i in range(len(found[1]))] if found else []

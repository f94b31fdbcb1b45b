"""Bring module attributes (in_channels, num_features, num_heads, ...) in line with the
sliced tensors, and replace modules that cannot express the new shapes.

1. Conv: ``groups`` from the pruned group count; in/out_channels from the weight.
2. Linear, Embedding, PReLU, BatchNorm/InstanceNorm, GroupNorm, LayerNorm, RMSNorm: from
   their tensors (and GroupNorm ``num_groups`` / LayerNorm ``normalized_shape`` from the
   analyzer's shape constants).
3. MultiheadAttention: embed_dim/num_heads/head_dim; when heads x head_dim no longer equals the
   input width, the module is replaced by :class:`PrunedMultiheadAttention` (same parameters).
4. Any attention module's head count that its forward does not read (BERT's
   ``num_attention_heads``: the forward reshapes with ``-1``), so no count relation sets it: in
   the modules that hold a pruned head group's projections, the one unread int attribute equal
   to the group's original head count takes the kept count, and one equal to the heads' total
   width (``all_head_size``) the kept width (read ones follow their relations). Where another
   size of the attention has the same value (2 kv heads and 2 q heads per kv head; a width
   equal to the hidden size) or several attributes do, nothing is set and the report says
   so -- never guessed. An attribute whose value differs between the instances of its class
   is an index, not a count (``layer_idx`` = 4 in the fifth decoder layer, whose KV-cache
   slot it is), and never a candidate.
"""

from __future__ import annotations

from torch import nn

from graphprune.modules import PrunedMultiheadAttention
from graphprune.passes.base import PassContext


def _constant(ctx: PassContext, module: str, argument: str) -> int | None:
    for c in ctx.dg.shape_constants:
        if c.module == module and c.argument == argument:
            return c.expected(ctx.kept)
    return None


def _set(ctx: PassContext, path: str, module: nn.Module, attr: str, value: object) -> None:
    old = getattr(module, attr)
    if old != value:
        setattr(module, attr, value)
        ctx.changes.append(f"{path or '<root>'}.{attr}: {old} -> {value}")


def _heads(ctx: PassContext, path: str, module: nn.MultiheadAttention) -> int:
    fqn = f"{path}.in_proj_weight" if path else "in_proj_weight"
    for g in ctx.dg.groups:
        if g.kind == "heads" and any(m.fqn == fqn and m.dim == 0 for m in g.members):
            return len(ctx.kept.get(g.id, range(g.size)))
    return module.num_heads


def update_module_attributes(ctx: PassContext) -> None:
    model = ctx.model
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.modules.conv._ConvNd):
            w = module.weight
            groups = _constant(ctx, path, "groups") or module.groups
            _set(ctx, path, module, "groups", groups)
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                _set(ctx, path, module, "in_channels", w.shape[0])
                _set(ctx, path, module, "out_channels", w.shape[1] * groups)
            else:
                _set(ctx, path, module, "in_channels", w.shape[1] * groups)
                _set(ctx, path, module, "out_channels", w.shape[0])
        elif isinstance(module, nn.Linear):
            _set(ctx, path, module, "in_features", module.weight.shape[1])
            _set(ctx, path, module, "out_features", module.weight.shape[0])
        elif isinstance(module, nn.Embedding):
            _set(ctx, path, module, "num_embeddings", module.weight.shape[0])
            _set(ctx, path, module, "embedding_dim", module.weight.shape[1])
        elif isinstance(module, nn.PReLU):
            _set(ctx, path, module, "num_parameters", module.weight.numel())
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            stats = module.weight if module.weight is not None else module.running_mean
            if stats is not None:
                _set(ctx, path, module, "num_features", stats.shape[0])
        elif isinstance(module, nn.GroupNorm):
            if module.weight is not None:
                _set(ctx, path, module, "num_channels", module.weight.shape[0])
            _set(
                ctx,
                path,
                module,
                "num_groups",
                _constant(ctx, path, "num_groups") or module.num_groups,
            )
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            shape = list(module.normalized_shape)
            for i in range(len(shape)):
                shape[i] = _constant(ctx, path, f"normalized_shape[{i}]") or shape[i]
            _set(ctx, path, module, "normalized_shape", tuple(shape))
        elif isinstance(module, nn.MultiheadAttention):
            _update_mha(ctx, path, module)
    _update_head_counts(ctx)


def _update_head_counts(ctx: PassContext) -> None:
    """Rule 4 of the module docstring."""
    if ctx.read_attributes is None:  # no shape trace: what the forward reads is unknown
        return
    driven = {(path, name) for path, name, _ in ctx.attributes} | ctx.read_attributes
    indices = _indices(ctx.model)
    for g in ctx.dg.groups:
        kept = ctx.kept.get(g.id)
        if g.kind not in ("heads", "kv_heads") or kept is None or len(kept) == g.size:
            continue
        root = _common_module([m.module for m in g.members])
        if any(isinstance(m, nn.MultiheadAttention) for _, m in _named_under(ctx, root)):
            continue  # rule 3
        ours = {(m.fqn, m.dim) for m in g.members}
        width = g.members[0].index_map.shape[0]  # heads x head_dim: the projections' width
        others = [  # (kind, original size) of every other dim in this attention
            (h.kind, m.index_map.shape[0] if h.kind == "channels" else h.size)
            for h in ctx.dg.groups if h is not g
            for m in h.members if m.module.startswith(root)
            and (h.kind != "channels" or (m.fqn, m.dim) not in ours)
        ]  # fmt: skip
        for label, old, new in [
            ("head count", g.size, len(kept)),
            ("head width", width, width // g.size * len(kept)),
        ]:
            clash = next((kind for kind, size in others if size == old), None)
            found = [
                (path, name)
                for path, module in _named_under(ctx, root)
                if not type(module).__module__.startswith("torch.nn")  # rules 1-3 did those
                for name, value in vars(module).items()
                if type(value) is int and value == old and not name.startswith("_")
                and (path, name) not in driven and (type(module), name) not in indices
            ]  # fmt: skip
            if len(found) == 1 and clash is None:
                path, name = found[0]
                _set(ctx, path, ctx.model.get_submodule(path), name, new)
            elif found:  # ambiguous: report, never guess
                why = f"{clash} is also {old}" if clash else f"{len(found)} attributes are {old}"
                ctx.changes.append(
                    f"{root or '<root>'}: {label} not updated ({why}): "
                    + ", ".join(f"{p}.{n}" for p, n in found)
                )


def _indices(model: nn.Module) -> set[tuple[type, str]]:
    """(module class, int attribute) pairs whose value differs between the class's
    instances: an index (a decoder layer's ``layer_idx`` for its KV-cache slot), not a size
    -- the repeated attention modules of a model hold the same head count."""
    values: dict[tuple[type, str], set[int]] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if type(value) is int and not name.startswith("_"):
                values.setdefault((type(module), name), set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1}


def _common_module(paths: list[str]) -> str:
    """The innermost module containing every path ("" = the root)."""
    common: list[str] = []
    for parts in zip(*(p.split(".") for p in paths), strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _named_under(ctx: PassContext, root: str) -> list[tuple[str, nn.Module]]:
    module = ctx.model.get_submodule(root) if root else ctx.model
    return [(f"{root}.{p}" if root and p else root or p, m) for p, m in module.named_modules()]


def _update_mha(ctx: PassContext, path: str, module: nn.MultiheadAttention) -> None:
    if not module._qkv_same_embed_dim:
        return
    embed = module.in_proj_weight.shape[1]
    inner = module.in_proj_weight.shape[0] // 3
    heads = _heads(ctx, path, module)
    if isinstance(module, PrunedMultiheadAttention) or inner != embed:
        if not isinstance(module, PrunedMultiheadAttention):
            replacement = PrunedMultiheadAttention(module, heads)
            replacement.train(module.training)
            parent, _, name = path.rpartition(".")
            setattr(ctx.model.get_submodule(parent) if parent else ctx.model, name, replacement)
            ctx.changes.append(
                f"{path}: nn.MultiheadAttention -> PrunedMultiheadAttention "
                f"(embed {embed}, {heads} heads x {inner // heads})"
            )
            return
        _set(ctx, path, module, "embed_dim", embed)
        _set(ctx, path, module, "kdim", embed)
        _set(ctx, path, module, "vdim", embed)
        _set(ctx, path, module, "num_heads", heads)
        _set(ctx, path, module, "head_dim", inner // heads)
        return
    for attr, value in [
        ("embed_dim", embed),
        ("kdim", embed),
        ("vdim", embed),
        ("num_heads", heads),
        ("head_dim", inner // heads),
    ]:
        _set(ctx, path, module, attr, value)

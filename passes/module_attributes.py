"""Bring module attributes (in_channels, num_features, num_heads, ...) in line with the
sliced tensors, and replace modules that cannot express the new shapes.

1. Conv: ``groups`` from the pruned group count; in/out_channels from the weight.
2. Linear, Embedding, PReLU, BatchNorm/InstanceNorm, GroupNorm, LayerNorm, RMSNorm: from
   their tensors (and GroupNorm ``num_groups`` / LayerNorm ``normalized_shape`` from the
   analyzer's shape constants).
3. MultiheadAttention: embed_dim/num_heads/head_dim; when heads x head_dim no longer equals the
   input width, the module is replaced by :class:`PrunedMultiheadAttention` (same parameters).
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

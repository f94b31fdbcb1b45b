"""Channel rules for element-wise ops, broadcasting, normalising ops and reductions.

1. Unary element-wise ops keep every dimension (identity).
2. Binary/ternary element-wise ops broadcast: dimensions aligned from the right with equal
   sizes hold the same channels (a residual add couples the two streams); a size-1 dimension
   broadcast against a larger one couples nothing (the squeeze-excitation scale (B, C, 1, 1)
   couples C only).
3. softmax normalises along one dimension: identity, with a note that removing positions
   along that dimension changes the remaining values.
4. Reductions drop (or keep as size 1) the reduced dimensions; mean/var/std over a channel
   dimension are noted as inexact under pruning (the divisor changes).
"""

from __future__ import annotations

import torch

from graphprune.analysis.registry import Layout, RuleContext, TensorArg, ops, rule

aten = torch.ops.aten

_UNARY = ops(
    "relu",
    "relu_",
    "gelu",
    "silu",
    "silu_",
    "sigmoid",
    "tanh",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "hardtanh",
    "hardtanh_",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "mish",
    "softplus",
    "neg",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "cos",
    "sin",
    "erf",
    "reciprocal",
    "square",
    "sign",
    "floor",
    "ceil",
    "round",
    "log1p",
    "expm1",
    "logical_not",
    "bitwise_not",
    "isnan",
    "clone",
    "contiguous",
    "dropout",
    "alpha_dropout",
    "feature_dropout",
    "alias",
    "detach",
    "lift_fresh_copy",
    "to",
    "_to_copy",
    "clamp",
    "clamp_min",
    "clamp_max",
    "nan_to_num",
    "tril",
    "triu",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "rand_like",
    "randn_like",
    "fill",
    "fill_",
    "zero",
    "zero_",
    "type_as",
    "float",
    "half",
    "bfloat16",
    "dequantize",
)


@rule(*_UNARY)
def unary(ctx: RuleContext) -> Layout:
    """y has x's shape and channels."""
    x = ctx.tensor(ctx.arg(0))
    assert x is not None, f"{ctx.op}: first argument is not a tensor"
    return list(x.layout)


def broadcast(ctx: RuleContext, inputs: list[TensorArg], out_shape: tuple[int, ...]) -> Layout:
    """Couple right-aligned dims of equal size; size-1 dims broadcast and couple nothing."""
    out: Layout = []
    rank = len(out_shape)
    for d, size in enumerate(out_shape):
        matching = []
        for t in inputs:
            k = d - (rank - t.ndim)
            if k >= 0 and t.shape[k] == size:
                matching.append(t.dim(k))
        if not matching:
            out.append(ctx.fresh(size, f"broadcast{d}"))
            continue
        first = matching[0]
        for other in matching[1:]:
            ctx.couple(first, other, "element-wise")
        out.append(first.atoms)
    return out


_BINARY = ops(
    "add",
    "add_",
    "sub",
    "sub_",
    "rsub",
    "mul",
    "mul_",
    "div",
    "div_",
    "true_divide",
    "floor_divide",
    "remainder",
    "fmod",
    "pow",
    "maximum",
    "minimum",
    "max.other",  # torch.max(a, b) / torch.min(a, b): elementwise (xIELU in Apertus)
    "min.other",
    "atan2",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_xor",
    "bitwise_and",
    "bitwise_or",
    "where",
    "masked_fill",
    "masked_fill_",
    "addcmul",
    "addcdiv",
    "lerp",
    "copy",
    "copy_",
    "hardshrink",
)


@rule(*_BINARY)
def elementwise(ctx: RuleContext) -> Layout:
    """Broadcasting element-wise op: residual add/sub/mul couple their operands."""
    return broadcast(ctx, ctx.tensors(), ctx.out_shape())


@rule(*ops("softmax", "_softmax", "log_softmax", "_log_softmax"))
def softmax(ctx: RuleContext) -> Layout:
    x = ctx.tensor(ctx.arg(0))
    assert x is not None
    dim = int(ctx.arg(1, "dim"))
    ctx.note(x.dim(dim).atoms, "softmax normalises over this dimension")
    return list(x.layout)


def _reduced_dims(ctx: RuleContext, x: TensorArg, dims: object) -> list[int]:
    if dims is None or (isinstance(dims, list | tuple) and len(dims) == 0):
        return list(range(x.ndim))
    if isinstance(dims, int):
        dims = [dims]
    assert isinstance(dims, list | tuple)
    return sorted({int(d) % x.ndim for d in dims})


def reduce(ctx: RuleContext, dims_arg: object, keepdim: bool, exact: bool) -> Layout:
    x = ctx.tensor(ctx.arg(0))
    assert x is not None
    reduced = _reduced_dims(ctx, x, dims_arg)
    out: Layout = []
    for d in range(x.ndim):
        if d not in reduced:
            out.append(x.layout[d])
            continue
        if not exact:
            ctx.note(x.layout[d], f"{ctx.op} averages over this dimension")
        if keepdim:
            out.append(ctx.fresh(1, f"reduced{d}"))
    return out


@rule(*ops("sum", "amax", "amin", "any", "all", "logsumexp", "prod"))
def sum_like(ctx: RuleContext) -> Layout:
    """Sums and maxima over a dimension are unchanged by removing all-zero channels."""
    return reduce(ctx, ctx.arg(1, "dim"), bool(ctx.arg(2, "keepdim", False)), exact=True)


@rule(*ops("mean", "var", "std", "norm", "linalg_vector_norm"))
def mean_like(ctx: RuleContext) -> Layout:
    if ctx.node.target in (aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default):
        dims, keep = ctx.arg(2, "dim"), bool(ctx.arg(3, "keepdim", False))
    elif ctx.node.target in (aten.var.correction, aten.std.correction):
        dims, keep = ctx.arg(1, "dim"), bool(ctx.node.kwargs.get("keepdim", False))
    else:
        dims, keep = ctx.arg(1, "dim"), bool(ctx.arg(2, "keepdim", False))
    return reduce(ctx, dims, keep, exact=False)


@rule(*ops("max.dim", "min.dim"))
def max_dim(ctx: RuleContext) -> list[Layout]:
    """(values, indices) of a max over one dimension."""
    layout = reduce(ctx, int(ctx.arg(1, "dim")), bool(ctx.arg(2, "keepdim", False)), exact=True)
    return [layout, list(layout)]


@rule(*ops("argmax", "argmin"))
def argmax(ctx: RuleContext) -> Layout:
    x = ctx.tensor(ctx.arg(0))
    assert x is not None
    dim = ctx.arg(1, "dim")
    if dim is not None:
        ctx.freeze(x.dim(int(dim)).atoms, "argmax returns positions along this dimension")
    return reduce(ctx, dim, bool(ctx.arg(2, "keepdim", False)), exact=True)


@rule(*ops("cumsum", "cumprod", "flip", "roll", "sort", "topk"))
def positional(ctx: RuleContext) -> Layout | list[Layout]:
    """Ops whose result along a dimension depends on positions: that dimension is frozen."""
    x = ctx.tensor(ctx.arg(0))
    assert x is not None
    if ctx.node.target in (aten.topk.default,):
        dims: list[int] = [int(ctx.arg(2, "dim", -1))]
    elif ctx.node.target in (aten.flip.default,):
        dims = [int(d) for d in ctx.arg(1, "dims")]
    elif ctx.node.target in (aten.roll.default,):
        dims = [int(d) for d in ctx.arg(2, "dims", [])] or list(range(x.ndim))
    else:
        dims = [int(ctx.arg(1, "dim", -1))]
    for d in dims:
        ctx.freeze(x.dim(d).atoms, f"{ctx.op} depends on positions along this dimension")
    if ctx.node.target in (aten.sort.default, aten.sort.stable, aten.topk.default):
        out = [
            x.layout[d] if d not in dims else ctx.fresh(s, "k")
            for d, s in enumerate(ctx.out_shape(0))
        ]
        return [out, list(out)]
    return list(x.layout)

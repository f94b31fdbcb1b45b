"""Channel rules for ops that own parameters: conv, linear, norms, embedding, attention.

1. conv: weight (C_out, C_in/g, k...). With g = 1 the input channels are the weight's dim 1
   and the output channels its dim 0 (and the bias). With g > 1 input channels factor as
   (group, j) and output channels as (group, k): the group index is shared by input and
   output (depthwise: C_in/g = 1, so input channel c *is* group c), j is the weight's dim 1.
   Transposed conv: weight (C_in, C_out/g, k...), the mirror image.
2. linear / matmul / einsum: the contracted dimension couples both operands (a linear's
   input features are the weight's dim 1); output features are the weight's dim 0.
3. batch/instance norm: weight, bias and running stats follow channel dim 1. group norm
   factors channels into (groups, C/groups). layer/RMS norm: the affine params follow the
   normalised trailing dims, noted as inexact (statistics over channels change).
4. embedding: rows are selected by index values (frozen); columns are output channels.
5. scaled_dot_product_attention: q·k contract over head_dim; k and v share key positions;
   heads are shared by q, k, v, and with GQA a query head factors as (kv_head, repeat).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphprune.analysis.registry import FOLDED_HEADS, Layout, RuleContext, TensorArg, ops, rule
from graphprune.analysis.rules_pointwise import broadcast

aten = torch.ops.aten


def _required(ctx: RuleContext, index: int, name: str) -> TensorArg:
    t = ctx.tensor(ctx.arg(index, name))
    assert t is not None, f"{ctx.op}: argument '{name}' is not a tensor"
    return t


def _optional(ctx: RuleContext, index: int, name: str) -> TensorArg | None:
    return ctx.tensor(ctx.arg(index, name))


def _spatial_out(
    ctx: RuleContext,
    x: TensorArg,
    out_shape: tuple[int, ...],
    first: int,
    pointwise: list[bool] | None = None,
) -> Layout:
    """Spatial output positions are made by the op, not by a parameter: structural. A window
    that slides over a dim mixes its positions, so an input dim that carries channels (a conv
    run over what is a channel dim elsewhere: timm CoaT's aggregate conv1d over stacked class
    tokens) is frozen; a pointwise dim (kernel 1, stride 1, no padding) maps position to
    position and keeps its atoms."""
    out: Layout = []
    for d in range(first, len(out_shape)):
        k = d - first
        if pointwise is not None and pointwise[k] and x.shape[d] == out_shape[d]:
            out.append(x.layout[d])
            continue
        ctx.freeze(x.layout[d], f"{ctx.op} slides a window over this dimension")
        out.append(ctx.structural(ctx.fresh(out_shape[d], f"spatial{d}")))
    return out


def _pointwise(ctx: RuleContext, w: TensorArg, stride_at: int, padding_at: int) -> list[bool]:
    """Per spatial dim of a conv: kernel 1, stride 1, no padding."""
    spatial = w.shape[2:]

    def per_dim(value: object, default: int) -> list[object]:
        if isinstance(value, list | tuple):
            return list(value) if len(value) == len(spatial) else [value[0]] * len(spatial)
        return [default if value is None else value] * len(spatial)

    strides = per_dim(ctx.arg(stride_at, "stride"), 1)
    paddings = per_dim(ctx.arg(padding_at, "padding"), 0)
    return [
        k == 1 and s == 1 and p in (0, "valid", "same")
        for k, s, p in zip(spatial, strides, paddings, strict=True)
    ]


def _conv(ctx: RuleContext, transposed: bool, groups: int) -> Layout:
    x, w = _required(ctx, 0, "input"), _required(ctx, 1, "weight")
    bias = _optional(ctx, 2, "bias")
    out_shape = ctx.out_shape()
    batched = x.ndim == w.ndim
    c = 1 if batched else 0
    for d in range(2, w.ndim):
        ctx.structural(w.layout[d])
    if not transposed:
        out_ch = w.dim(0)
        if groups == 1:
            ctx.couple(x.dim(c), w.dim(1), "conv input channels")
        else:
            g_in, j = ctx.table.factor(
                x.layout[c], [groups, x.shape[c] // groups], f"{ctx.node.name}.in"
            )
            g_out, _k = ctx.table.factor(
                w.layout[0], [groups, w.shape[0] // groups], f"{ctx.node.name}.out"
            )
            ctx.table.union_arrays(g_in, g_out)
            ctx.table.union_arrays(j, w.layout[1])
            ctx.link(
                x.dim(c), w.dim(0), f"grouped conv: input and output share the {groups} groups"
            )
            ctx.link(x.dim(c), w.dim(1), "grouped conv: channel within group")
            ctx.shape_constant("groups", groups, g_in)
        out_atoms = out_ch.atoms
    else:
        ctx.couple(x.dim(c), w.dim(0), "transposed conv input channels")
        if groups == 1:
            out_atoms = w.layout[1]
        else:
            g_in, _j = ctx.table.factor(
                x.layout[c], [groups, x.shape[c] // groups], f"{ctx.node.name}.in"
            )
            out_atoms = ctx.table.merge([g_in, w.layout[1]], f"{ctx.node.name}.out")
            ctx.link(x.dim(c), w.dim(1), f"grouped transposed conv: {groups} groups")
            ctx.shape_constant("groups", groups, g_in)
    if bias is not None:
        ctx.table.union_arrays(bias.layout[0], out_atoms)
        ctx.link(bias.dim(0), w.dim(1 if transposed else 0), "bias of the output channels")
    ctx.link(w.dim(1 if transposed else 0), c, "conv output channels")
    out: Layout = [x.layout[0]] if batched else []
    out.append(out_atoms)
    out.extend(_spatial_out(ctx, x, out_shape, c + 1, _pointwise(ctx, w, 3, 4)))
    return out


@rule(*ops("conv1d", "conv2d", "conv3d"))
def conv(ctx: RuleContext) -> Layout:
    return _conv(ctx, transposed=False, groups=int(ctx.arg(6, "groups", 1)))


@rule(*ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
def conv_transpose(ctx: RuleContext) -> Layout:
    return _conv(ctx, transposed=True, groups=int(ctx.arg(6, "groups", 1)))


@rule(*ops("convolution", "_convolution"))
def convolution(ctx: RuleContext) -> Layout:
    return _conv(ctx, transposed=bool(ctx.arg(6, "transposed")), groups=int(ctx.arg(8, "groups")))


@rule(*ops("linear"))
def linear(ctx: RuleContext) -> Layout:
    x, w = _required(ctx, 0, "input"), _required(ctx, 1, "weight")
    bias = _optional(ctx, 2, "bias")
    ctx.couple(x.dim(-1), w.dim(1), "linear input features")
    if bias is not None:
        ctx.couple(bias.dim(0), w.dim(0), "bias of the output features")
    ctx.link(w.dim(0), x.ndim - 1, "linear output features")
    return [*x.layout[:-1], w.layout[0]]


def matmul_layout(ctx: RuleContext, a: TensorArg, b: TensorArg) -> Layout:
    """a (..., n, k) @ b (..., k, m) -> (..., n, m); 1-D operands as in torch.matmul."""
    ka = a.dim(-1)
    kb = b.dim(0) if b.ndim == 1 else b.dim(-2)
    ctx.couple(ka, kb, "matmul contraction")
    out_shape = ctx.out_shape()
    batch_rank = max(a.ndim - 2, b.ndim - 2, 0)
    batch_a = TensorArg(a.node, a.layout[: max(a.ndim - 2, 0)], a.shape[: max(a.ndim - 2, 0)])
    batch_b = TensorArg(b.node, b.layout[: max(b.ndim - 2, 0)], b.shape[: max(b.ndim - 2, 0)])
    out = broadcast(ctx, [batch_a, batch_b], tuple(out_shape[:batch_rank]))
    if a.ndim >= 2:
        out.append(a.layout[-2])
    if b.ndim >= 2:
        out.append(b.layout[-1])
    return out


@rule(*ops("matmul", "mm", "bmm"))
def matmul(ctx: RuleContext) -> Layout:
    a, b = _required(ctx, 0, "self"), _required(ctx, 1, "mat2")
    out = matmul_layout(ctx, a, b)
    _tag_eager_attention(ctx, a, b)
    return out


# ops between the attention matmuls and the softmax: scaling, masking, dropout, dtype casts
_PASS_THROUGH = {
    "add", "sub", "mul", "div", "masked_fill", "where", "dropout", "to", "_to_copy", "clone",
    "contiguous", "type_as", "float", "alias", "detach", "tanh",  # tanh: logit soft-capping
    # heads folded into the batch dim and back (DeBERTa-v2: bmm on (B x heads, T, T), the
    # softmax on (B, heads, T, T))
    "view", "reshape", "_unsafe_view",
    # in place (MPNet adds its relative-position bias with add_)
    "add_", "sub_", "mul_", "div_", "masked_fill_",
}  # fmt: skip


def _walk_back(node: Any, wanted: set[str], depth: int = 6) -> Any:
    """The nearest producer of ``node`` (through _PASS_THROUGH ops, first tensor argument
    first) whose op is one of ``wanted``, or None."""
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name in wanted:
            return node
        if name not in _PASS_THROUGH:
            return None
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        node = inputs[0] if name != "where" else (inputs[1] if len(inputs) > 1 else None)
    return None


def _tag_eager_attention(ctx: RuleContext, probs: TensorArg, v: TensorArg) -> None:
    """Attention written out (``softmax(q @ k^T * scale + mask) @ v``, eager implementations)
    gets the same tags as scaled_dot_product_attention: heads (dim -3 of the probabilities,
    kv heads under GQA) and head_dim (the last dim of q and of v)."""
    softmax = _walk_back(ctx.arg(0, "self"), {"softmax", "_softmax", "_safe_softmax"})
    if softmax is None:
        return
    scores = _walk_back(softmax.args[0], {"matmul", "bmm"})
    if scores is None:
        return
    q = ctx.tensor(scores.args[0])
    ctx.tag(v.layout[-1], "head_dim")
    if q is not None:
        ctx.tag(q.layout[-1], "head_dim")
    if probs.ndim >= 4:  # (..., heads, queries, keys)
        ctx.tag(probs.layout[-3], "heads")
    elif probs.ndim == 3:  # (batch x heads, queries, keys): heads folded into the batch dim
        ctx.tag(probs.layout[0], FOLDED_HEADS)


@rule(*ops("outer", "ger"))
def outer(ctx: RuleContext) -> Layout:
    """a (n,) outer b (m,) -> (n, m): each operand keeps its channels."""
    a, b = _required(ctx, 0, "self"), _required(ctx, 1, "vec2")
    return [a.layout[0], b.layout[0]]


@rule(*ops("addmm", "baddbmm", "addbmm"))
def addmm(ctx: RuleContext) -> Layout:
    bias = _required(ctx, 0, "self")
    out = matmul_layout(ctx, _required(ctx, 1, "mat1"), _required(ctx, 2, "mat2"))
    product = TensorArg(ctx.node.name + ".product", out, ctx.out_shape())
    return broadcast(ctx, [product, bias], ctx.out_shape())


@rule(*ops("einsum"))
def einsum(ctx: RuleContext) -> Layout:
    """Each subscript letter is one set of channels across every operand that has it."""
    equation = str(ctx.arg(0)).replace(" ", "")
    operands = [ctx.tensor(v) for v in ctx.arg(1)]
    lhs, _, rhs = equation.partition("->")
    specs = lhs.split(",")
    if "..." in equation or not rhs or any(t is None for t in operands):
        for t in ctx.tensors():
            for atoms in t.layout:
                ctx.freeze(
                    atoms, f"einsum '{equation}' is not analysed (ellipsis or implicit output)"
                )
        return [ctx.fresh(s, f"einsum{d}") for d, s in enumerate(ctx.out_shape())]
    seen: dict[str, tuple[TensorArg, int]] = {}
    for spec, operand in zip(specs, operands, strict=True):
        assert operand is not None
        t = operand
        for d, letter in enumerate(spec):
            if t.shape[d] == 1:
                continue
            if letter in seen:
                other, od = seen[letter]
                ctx.couple(other.dim(od), t.dim(d), f"einsum index '{letter}'")
            else:
                seen[letter] = (t, d)
    out: Layout = []
    for d, letter in enumerate(rhs):
        if letter in seen:
            t, od = seen[letter]
            out.append(t.layout[od])
        else:
            out.append(ctx.fresh(ctx.out_shape()[d], f"einsum{d}"))
    return out


def _with_stats(ctx: RuleContext, layout: Layout) -> Layout | list[Layout]:
    """Norm ops returning (out, mean, rstd, ...): the statistics get fresh positions."""
    meta = ctx.node.meta.get("val")
    if not isinstance(meta, tuple | list):
        return layout
    stats = [
        [ctx.fresh(s, f"stat{d}") for d, s in enumerate(ctx.out_shape(i))]
        for i in range(1, len(meta))
    ]
    return [layout, *stats]


def _per_channel_params(
    ctx: RuleContext, x: TensorArg, names: list[tuple[int, str]], why: str
) -> None:
    for index, name in names:
        p = _optional(ctx, index, name)
        if p is not None and p.ndim == 1 and p.shape[0] == x.shape[1]:
            ctx.couple(x.dim(1), p.dim(0), why)


@rule(
    *ops(
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "instance_norm",
    )
)
def batch_norm(ctx: RuleContext) -> Layout | list[Layout]:
    x = _required(ctx, 0, "input")
    names = [(1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")]
    _per_channel_params(ctx, x, names, "per-channel norm parameter")
    return _with_stats(ctx, list(x.layout))


@rule(*ops("group_norm"))
def group_norm(ctx: RuleContext) -> Layout:
    x = _required(ctx, 0, "input")
    groups = int(ctx.arg(1, "num_groups"))
    _per_channel_params(ctx, x, [(2, "weight"), (3, "bias")], "per-channel norm parameter")
    if groups > 1:
        g, _within = ctx.table.factor(
            x.layout[1], [groups, x.shape[1] // groups], f"{ctx.node.name}.groups"
        )
        ctx.shape_constant("num_groups", groups, g)
    ctx.note(x.layout[1], "GroupNorm statistics span channels")
    return list(x.layout)


def _trailing_norm(
    ctx: RuleContext, weight_index: int, bias_index: int | None, kind: str
) -> Layout | list[Layout]:
    x = _required(ctx, 0, "input")
    shape = [int(s) for s in ctx.arg(1, "normalized_shape")]
    k = len(shape)
    for i in range(k):
        d = x.ndim - k + i
        ctx.note(x.layout[d], f"{kind} statistics span this dimension")
        ctx.shape_constant(f"normalized_shape[{i}]", shape[i], x.layout[d])
        for index, name in [(weight_index, "weight"), (bias_index, "bias")]:
            p = _optional(ctx, index, name) if index is not None else None
            if p is not None:
                ctx.couple(x.dim(d), p.dim(i), f"{kind} affine parameter")
    return _with_stats(ctx, list(x.layout))


@rule(*ops("layer_norm", "native_layer_norm"))
def layer_norm(ctx: RuleContext) -> Layout | list[Layout]:
    return _trailing_norm(ctx, 2, 3, "LayerNorm")


@rule(*ops("rms_norm"))
def rms_norm(ctx: RuleContext) -> Layout | list[Layout]:
    return _trailing_norm(ctx, 2, None, "RMSNorm")


@rule(*ops("prelu", "_prelu_kernel"))
def prelu(ctx: RuleContext) -> Layout:
    x, w = _required(ctx, 0, "self"), _required(ctx, 1, "weight")
    if w.shape[0] > 1:
        ctx.couple(x.dim(1 if x.ndim >= 2 else 0), w.dim(0), "PReLU per-channel slope")
    return list(x.layout)


@rule(*ops("embedding"))
def embedding(ctx: RuleContext) -> Layout:
    w, idx = _required(ctx, 0, "weight"), _required(ctx, 1, "indices")
    ctx.freeze(w.layout[0], "embedding rows are selected by index values")
    ctx.link(w.dim(1), idx.ndim, "embedding columns")
    return [*idx.layout, w.layout[1]]


DEFAULT_SCALE_NOTE = "default attention scale 1/sqrt(head_dim) follows head_dim"


@rule(*ops("scaled_dot_product_attention"))
def sdpa(ctx: RuleContext) -> Layout:
    q, k, v = (_required(ctx, i, n) for i, n in enumerate(["query", "key", "value"]))
    ctx.couple(q.dim(-1), k.dim(-1), "query·key contraction over head_dim")
    ctx.couple(k.dim(-2), v.dim(-2), "keys and values share positions")
    if ctx.arg(6, "scale") is None:
        ctx.note(q.layout[-1], DEFAULT_SCALE_NOTE)
    ctx.tag(q.layout[-1], "head_dim")
    ctx.tag(v.layout[-1], "head_dim")
    out: Layout = []
    if q.ndim >= 3:
        hq, hk = q.shape[-3], k.shape[-3]
        ctx.tag(q.layout[-3], "heads")
        if hq != hk:
            ctx.tag(k.layout[-3], "kv_heads")
        if hq == hk:
            ctx.couple(q.dim(-3), k.dim(-3), "attention heads")
            ctx.couple(k.dim(-3), v.dim(-3), "attention heads")
        else:  # GQA: query head h uses kv head h // (hq // hk)
            kv, _rep = ctx.table.factor(q.layout[-3], [hk, hq // hk], f"{ctx.node.name}.gqa")
            ctx.table.union_arrays(kv, k.layout[-3])
            ctx.couple(k.dim(-3), v.dim(-3), "attention heads")
            ctx.link(
                q.dim(-3), k.dim(-3), f"grouped-query attention: {hq // hk} query heads per kv head"
            )
        batch = [TensorArg(t.node, t.layout[:-3], t.shape[:-3]) for t in (q, k, v)]
        out = broadcast(ctx, batch, ctx.out_shape()[:-3])
        out.append(q.layout[-3])
    mask = _optional(ctx, 3, "attn_mask")
    if mask is not None:
        scores = TensorArg(
            ctx.node.name + ".scores",
            [*out, q.layout[-2], k.layout[-2]],
            (*ctx.out_shape()[:-2], q.shape[-2], k.shape[-2]),
        )
        broadcast(ctx, [scores, mask], scores.shape)
    return [*out, q.layout[-2], v.layout[-1]]


_POOL_SPATIAL_DIMS = {
    "max_pool1d": 1,
    "max_pool2d": 2,
    "max_pool3d": 3,
    "avg_pool1d": 1,
    "avg_pool2d": 2,
    "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1,
    "adaptive_avg_pool2d": 2,
    "adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2,
    "adaptive_max_pool3d": 3,
    "max_pool2d_with_indices": 2,
    "max_pool3d_with_indices": 3,
    "upsample_nearest1d": 1,
    "upsample_nearest2d": 2,
    "upsample_nearest3d": 3,
    "upsample_bilinear2d": 2,
    "upsample_bicubic2d": 2,
    "upsample_linear1d": 1,
    "upsample_trilinear3d": 3,
    "_upsample_nearest_exact1d": 1,
    "_upsample_nearest_exact2d": 2,
    "_upsample_nearest_exact3d": 3,
    "_upsample_bilinear2d_aa": 2,
    "_upsample_bicubic2d_aa": 2,
}
_POOLS = {op: _POOL_SPATIAL_DIMS[name] for name in _POOL_SPATIAL_DIMS for op in ops(name)}


@rule(*_POOLS)
def pool(ctx: RuleContext) -> Layout | list[Layout]:
    """Pooling/resampling acts on the trailing spatial dims; channels pass through."""
    x = _required(ctx, 0, "input")
    spatial = _POOLS[getattr(ctx.node.target, "overloadpacket", None)]
    multi = isinstance(ctx.node.meta.get("val"), tuple | list)
    out_shape = ctx.out_shape(0) if multi else ctx.out_shape()
    keep = x.ndim - spatial
    # an adaptive pool to the input's own size is the identity on that dim
    same = [ctx.op.startswith("aten.adaptive")] * spatial
    out = list(x.layout[:keep]) + _spatial_out(ctx, x, out_shape, keep, same)
    return [out, list(out)] if multi else out

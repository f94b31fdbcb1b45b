"""Channel rules for ops that move, split, join or reshape dimensions.

1. view/reshape/flatten/unflatten/squeeze/unsqueeze: the input and output shapes are cut into
   their common refinement (the sizes between all cumulative-product boundaries of both);
   input dims are factored into refined pieces and output dims merged from them, so
   ``(B, T, C) -> (B, T, nh, hd)`` makes every channel of C the composite ``(head, d)``.
   Shapes with no common refinement (``(6, 4) -> (4, 6)``) freeze the dims involved.
2. transpose/permute move layouts; expand gives broadcast dims fresh positions.
3. cat lays its inputs' atoms end to end along the cat dim (the offsets are the index map)
   and couples the other dims; stack adds a dim of fresh positions.
4. split/chunk slice the layout; equal-size splits (one int size) couple the chunks position
   by position so that every chunk keeps the same size after pruning. unbind/select pick
   fixed positions: that dim is frozen.
5. Every integer argument whose value follows a pruned dim's size is recorded as a shape
   constant (view sizes, split sizes, slice bounds, factory sizes) for the rewriting passes.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from graphprune.analysis.atoms import Atoms
from graphprune.analysis.registry import Layout, RuleContext, TensorArg, ops, rule
from graphprune.analysis.rules_pointwise import broadcast

aten = torch.ops.aten


def _first(ctx: RuleContext) -> TensorArg:
    x = ctx.tensor(ctx.arg(0))
    assert x is not None, f"{ctx.op}: first argument is not a tensor"
    return x


def _boundaries(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for s in shape:
        acc *= s
        out.append(acc)
    return out


def refine(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int] | None:
    """Cumulative-product cut points shared by both shapes, or None if they do not nest."""
    cuts = sorted(set(_boundaries(in_shape)) | set(_boundaries(out_shape)) | {1})
    for a, b in itertools.pairwise(cuts):
        if b % a:
            return None
    return cuts


def reshape_layout(ctx: RuleContext, x: TensorArg, out_shape: tuple[int, ...]) -> Layout:
    """The layout of ``x.reshape(out_shape)`` (see rule 1 of the module docstring)."""
    if x.shape == out_shape:
        return list(x.layout)
    cuts = refine(x.shape, out_shape)
    if cuts is None or math.prod(x.shape) == 0:
        for d in range(x.ndim):
            ctx.freeze(x.layout[d], f"reshape {x.shape} -> {out_shape} mixes dimensions")
        return [ctx.fresh(s, f"reshape{d}") for d, s in enumerate(out_shape)]
    # refined pieces, each identified by its (start, end) cumulative products
    pieces: list[Atoms] = []
    for d, (lo, hi) in enumerate(_spans(x.shape)):
        sizes = [b // a for a, b in itertools.pairwise(cuts) if lo <= a and b <= hi]
        if hi == lo:  # size-1 input dim: carries no channels
            continue
        parts = ctx.table.factor(x.layout[d], sizes, f"{ctx.node.name}.in{d}")
        pieces.extend(parts)
        if len(sizes) > 1:
            for k in range(len(out_shape)):
                ctx.link(x.dim(d), k, "reshape (factored)")
    refined = [b // a for a, b in itertools.pairwise(cuts)]
    assert len(pieces) == len(refined), (pieces, refined)
    out: Layout = []
    cursor = 0
    for d, (lo, hi) in enumerate(_spans(out_shape)):
        n = sum(1 for a, b in itertools.pairwise(cuts) if lo <= a and b <= hi)
        if n == 0:
            out.append(ctx.fresh(1, f"unit{d}"))
            continue
        merged = ctx.table.merge(pieces[cursor : cursor + n], f"{ctx.node.name}.out{d}")
        cursor += n
        out.append(merged)
    _link_reshape(ctx, x, out)
    return out


def _spans(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    spans, acc = [], 1
    for s in shape:
        spans.append((acc, acc * s))
        acc *= s
    return spans


def _link_reshape(ctx: RuleContext, x: TensorArg, out: Layout) -> None:
    for d in range(x.ndim):
        for k, atoms in enumerate(out):
            if x.layout[d] is atoms or (x.shape[d] > 1 and atoms.shape[0] > 1):
                ctx.link(x.dim(d), k, "reshape")


def _record_sizes(ctx: RuleContext, name: str, sizes: object, layout: Layout) -> None:
    if not isinstance(sizes, list | tuple):
        return
    for k, s in enumerate(sizes):
        if isinstance(s, int) and s > 1 and k < len(layout):
            ctx.shape_constant(f"{name}[{k}]", s, layout[k])


@rule(*ops("view", "reshape", "_unsafe_view", "view_copy"))
def view(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    out = reshape_layout(ctx, x, ctx.out_shape())
    _record_sizes(ctx, "size", ctx.arg(1, "size"), out)
    return out


@rule(*ops("flatten", "squeeze", "unsqueeze", "squeeze_copy", "unsqueeze_copy"))
def flatten(ctx: RuleContext) -> Layout:
    return reshape_layout(ctx, _first(ctx), ctx.out_shape())


def _follow(ctx: RuleContext, out: Layout, other: TensorArg | None, why: str) -> Layout:
    """The output takes its sizes from ``other``: each output dim is coupled with ``other``'s
    dim (same count after pruning, so the same channels)."""
    if other is None:
        return out
    for d, atoms in enumerate(out):
        if other.shape[d] > 1:
            ctx.table.union_arrays(atoms, other.layout[d])
            ctx.link(other.dim(d), d, why)
    return out


@rule(*ops("view_as", "reshape_as"))
def view_as(ctx: RuleContext) -> Layout:
    """``x.view_as(other)``: a reshape whose sizes are ``other``'s, so they follow it."""
    out = reshape_layout(ctx, _first(ctx), ctx.out_shape())
    return _follow(ctx, out, ctx.tensor(ctx.arg(1, "other")), "shaped like this tensor")


@rule(*ops("unflatten"))
def unflatten(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    out = reshape_layout(ctx, x, ctx.out_shape())
    dim = int(ctx.arg(1, "dim")) % x.ndim
    sizes = ctx.arg(2, "sizes")
    for k, s in enumerate(sizes):
        if isinstance(s, int) and s > 1:
            ctx.shape_constant(f"sizes[{k}]", s, out[dim + k])
    return out


@rule(*ops("transpose", "swapaxes", "t", "transpose_copy"))
def transpose(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    if ctx.node.target == aten.t.default:
        a, b = 0, x.ndim - 1
    else:
        a, b = int(ctx.arg(1)) % x.ndim, int(ctx.arg(2)) % x.ndim
    out = list(x.layout)
    out[a], out[b] = out[b], out[a]
    return out


@rule(*ops("numpy_T"))
def numpy_transpose(ctx: RuleContext) -> Layout:
    """``x.T``: every dim reversed."""
    return list(reversed(_first(ctx).layout))


@rule(*ops("mT", "mH", "adjoint"))
def matrix_transpose(ctx: RuleContext) -> Layout:
    """``x.mT``: the last two dims swapped."""
    out = list(_first(ctx).layout)
    out[-1], out[-2] = out[-2], out[-1]
    return out


@rule(*ops("permute", "permute_copy"))
def permute(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    return [x.layout[int(d) % x.ndim] for d in ctx.arg(1, "dims")]


@rule(*ops("movedim"))
def movedim(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    n = x.ndim
    src = [int(d) % n for d in np.atleast_1d(ctx.arg(1))]
    dst = [int(d) % n for d in np.atleast_1d(ctx.arg(2))]
    order: list[int | None] = [None] * n
    for s, d in zip(src, dst, strict=True):
        order[d] = s
    rest = iter(d for d in range(n) if d not in src)
    return [x.layout[o if o is not None else next(rest)] for o in order]


@rule(*ops("expand", "expand_copy", "expand_as", "broadcast_to"))
def expand(ctx: RuleContext) -> Layout:
    """Dims of size 1 that grow get fresh positions; the others keep their channels."""
    x = _first(ctx)
    out_shape = ctx.out_shape()
    lead = len(out_shape) - x.ndim
    out: Layout = []
    for d, size in enumerate(out_shape):
        k = d - lead
        if k >= 0 and x.shape[k] == size:
            out.append(x.layout[k])
        else:
            out.append(ctx.fresh(size, f"expand{d}"))
    if ctx.node.target == aten.expand_as.default:  # the grown dims take other's sizes
        other = ctx.tensor(ctx.arg(1, "other"))
        grown = [d for d in range(len(out_shape)) if d < lead or x.shape[d - lead] != out_shape[d]]
        if other is not None:
            for d in grown:
                ctx.table.union_arrays(out[d], other.layout[d])
                ctx.link(other.dim(d), d, "expanded to this tensor's size")
    else:
        sizes = ctx.arg(1, "size")
        if isinstance(sizes, list | tuple):
            for k, s in enumerate(sizes):
                if isinstance(s, int) and s > 1:
                    ctx.shape_constant(f"size[{k}]", s, out[k])
    return out


@rule(*ops("repeat"))
def repeat(ctx: RuleContext) -> Layout:
    """Tiling repeats a dim's channels; pruning a channel removes every copy."""
    x = _first(ctx)
    reps = [int(r) for r in ctx.arg(1, "repeats")]
    lead = len(reps) - x.ndim
    out: Layout = []
    for d, r in enumerate(reps):
        k = d - lead
        base = x.layout[k] if k >= 0 else ctx.fresh(1, f"repeat{d}")
        out.append(np.tile(base, r))
    return out


@rule(*ops("repeat_interleave.self_int"))
def repeat_interleave(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    reps, dim = int(ctx.arg(1, "repeats")), ctx.arg(2, "dim")
    if dim is None:
        for atoms in x.layout:
            ctx.freeze(atoms, "repeat_interleave without dim flattens the tensor")
        return [ctx.fresh(s, "flat") for s in ctx.out_shape()]
    out = list(x.layout)
    d = int(dim) % x.ndim
    out[d] = np.repeat(x.layout[d], reps)
    return out


@rule(*ops("cat", "concat", "concatenate"))
def cat(ctx: RuleContext) -> Layout:
    """Output channels along dim = the inputs' channels end to end (offsets = index map)."""
    inputs = [t for t in (ctx.tensor(v) for v in ctx.arg(0, "tensors")) if t is not None]
    inputs = [t for t in inputs if t.shape != (0,)]  # legacy empty-tensor inputs
    dim = int(ctx.arg(1, "dim", 0)) % inputs[0].ndim
    first = inputs[0]
    out: Layout = []
    for d in range(first.ndim):
        if d == dim:
            out.append(np.concatenate([t.layout[d] for t in inputs]))
            offset = 0
            for t in inputs:
                ctx.link(t.dim(d), d, f"concatenated at offset {offset}")
                offset += t.shape[d]
        else:
            for t in inputs[1:]:
                ctx.couple(first.dim(d), t.dim(d), "concatenated side by side")
            out.append(first.layout[d])
    return out


@rule(*ops("stack"))
def stack(ctx: RuleContext) -> Layout:
    inputs = [t for t in (ctx.tensor(v) for v in ctx.arg(0, "tensors")) if t is not None]
    dim = int(ctx.arg(1, "dim", 0)) % (inputs[0].ndim + 1)
    first = inputs[0]
    for t in inputs[1:]:
        for d in range(first.ndim):
            ctx.couple(first.dim(d), t.dim(d), "stacked")
    out = list(first.layout)
    out.insert(dim, ctx.fresh(len(inputs), "stacked"))
    return out


def _split_layouts(
    ctx: RuleContext, x: TensorArg, dim: int, sizes: list[int], equal: bool
) -> list[Layout]:
    atoms = x.layout[dim]
    chunks, start = [], 0
    for s in sizes:
        chunks.append(atoms[start : start + s])
        start += s
    if equal and len(set(sizes)) > 1:
        ctx.freeze(atoms, "uneven split by a single size cannot follow pruning")
    elif equal:
        # one int split size: every chunk must keep the same channels (q, k, v of a fused qkv)
        for k, chunk in enumerate(chunks[1:], start=1):
            ctx.table.union_arrays(chunks[0], chunk)
            ctx.link(x.dim(dim), dim, f"equal split: chunk {k} matches chunk 0")
    out = []
    for chunk in chunks:
        layout = list(x.layout)
        layout[dim] = chunk
        out.append(layout)
    return out


@rule(*ops("split.Tensor", "split_copy.Tensor"))
def split(ctx: RuleContext) -> list[Layout]:
    x = _first(ctx)
    size, dim = int(ctx.arg(1, "split_size")), int(ctx.arg(2, "dim", 0)) % x.ndim
    sizes = [size] * (x.shape[dim] // size) + ([x.shape[dim] % size] if x.shape[dim] % size else [])
    out = _split_layouts(ctx, x, dim, sizes, equal=True)
    ctx.shape_constant("split_size", size, out[0][dim])
    return out


@rule(*ops("split_with_sizes", "split.sizes", "split_with_sizes_copy"))
def split_with_sizes(ctx: RuleContext) -> list[Layout]:
    x = _first(ctx)
    sizes, dim = [int(s) for s in ctx.arg(1, "split_sizes")], int(ctx.arg(2, "dim", 0)) % x.ndim
    out = _split_layouts(ctx, x, dim, sizes, equal=False)
    for k, layout in enumerate(out):
        ctx.shape_constant(f"split_sizes[{k}]", sizes[k], layout[dim])
    return out


@rule(*ops("chunk"))
def chunk(ctx: RuleContext) -> list[Layout]:
    x = _first(ctx)
    n, dim = int(ctx.arg(1, "chunks")), int(ctx.arg(2, "dim", 0)) % x.ndim
    size = -(-x.shape[dim] // n)
    sizes = [size] * (x.shape[dim] // size) + ([x.shape[dim] % size] if x.shape[dim] % size else [])
    return _split_layouts(ctx, x, dim, sizes, equal=True)


@rule(*ops("unbind"))
def unbind(ctx: RuleContext) -> list[Layout]:
    x = _first(ctx)
    dim = int(ctx.arg(1, "dim", 0)) % x.ndim
    ctx.freeze(x.layout[dim], "unbind returns one tensor per position of this dimension")
    rest = [a for d, a in enumerate(x.layout) if d != dim]
    return [list(rest) for _ in range(x.shape[dim])]


@rule(*ops("select"))
def select(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    dim = int(ctx.arg(1, "dim")) % x.ndim
    ctx.freeze(x.layout[dim], f"select picks the fixed index {ctx.arg(2)} of this dimension")
    return [a for d, a in enumerate(x.layout) if d != dim]


@rule(*ops("slice", "slice_copy"))
def slice_(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    dim = int(ctx.arg(1, "dim", 0)) % x.ndim
    start, end, step = ctx.arg(2, "start"), ctx.arg(3, "end"), int(ctx.arg(4, "step", 1))
    out = list(x.layout)
    out[dim] = x.layout[dim][slice(start, end, step)]
    if out[dim].shape[0] != x.shape[dim]:
        if step != 1:
            ctx.freeze(x.layout[dim], f"strided slice (step {step}) of this dimension")
        if any(isinstance(b, int) and b < 0 for b in (start, end)):
            # "all but the last k" selects different channels once channels are removed
            ctx.freeze(x.layout[dim], f"slice [{start}:{end}] counts from the end")
            return out
        if isinstance(start, int) and start not in (0,):
            ctx.shape_constant("start", start, x.layout[dim][: max(start, 0)], per="start")
        if isinstance(end, int) and end < x.shape[dim]:
            ctx.shape_constant("end", end, x.layout[dim][: max(end, 0)], per="end")
    return out


@rule(*ops("narrow"))
def narrow(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    dim, start, length = int(ctx.arg(1)) % x.ndim, int(ctx.arg(2)), int(ctx.arg(3))
    out = list(x.layout)
    out[dim] = x.layout[dim][start : start + length]
    ctx.shape_constant("start", start, x.layout[dim][:start], per="start")
    ctx.shape_constant("length", length, out[dim])
    return out


@rule(*ops("index_select", "gather", "take_along_dim", "scatter", "scatter_add"))
def index_along(ctx: RuleContext) -> Layout:
    """Positions chosen by index tensors: the indexed dim is frozen, others identity."""
    x = _first(ctx)
    dim = int(ctx.arg(1, "dim")) % x.ndim
    ctx.freeze(x.layout[dim], f"{ctx.op} indexes this dimension by value")
    out = list(x.layout)
    out[dim] = ctx.fresh(ctx.out_shape()[dim], "indexed")
    return out


@rule(*ops("index.Tensor", "_unsafe_index.Tensor"))
def advanced_index(ctx: RuleContext) -> Layout:
    """``x[..., idx, ...]`` with index tensors: the indexed dims are chosen by value (frozen)
    and replaced by the index's dims (new positions); the other dims keep their channels.
    Non-adjacent index tensors move the result dims first (numpy rules): all frozen then."""
    x = _first(ctx)
    indices = list(ctx.arg(1, "indices"))
    picked = [d for d, i in enumerate(indices) if i is not None]
    out_shape = ctx.out_shape()
    for d in picked:
        ctx.freeze(x.layout[d], f"{ctx.op} picks positions of this dimension by value")
    adjacent = picked == list(range(picked[0], picked[-1] + 1)) if picked else True
    n_new = len(out_shape) - (x.ndim - len(picked))
    if not picked or not adjacent or n_new < 0:
        for d in range(x.ndim):
            ctx.freeze(x.layout[d], f"{ctx.op} with non-adjacent index tensors")
        return [ctx.fresh(s, f"indexed{d}") for d, s in enumerate(out_shape)]
    first = picked[0]
    # the new dims are the index tensors' dims (broadcast): positions of the index values
    index_tensors = [t for t in (ctx.tensor(indices[d]) for d in picked) if t is not None]
    new = broadcast(ctx, index_tensors, tuple(out_shape[first : first + n_new]))
    return [*x.layout[:first], *new, *x.layout[picked[-1] + 1 :]]


@rule(*ops("constant_pad_nd", "pad"))
def pad(ctx: RuleContext) -> Layout:
    x = _first(ctx)
    padding = [int(p) for p in ctx.arg(1, "pad")]
    out = list(x.layout)
    for i in range(0, len(padding), 2):
        d = x.ndim - 1 - i // 2
        if padding[i] or padding[i + 1]:
            ctx.freeze(x.layout[d], "padded dimension")
            out[d] = ctx.fresh(ctx.out_shape()[d], f"padded{d}")
    return out


_FACTORIES = ops(
    "zeros",
    "ones",
    "empty",
    "full",
    "rand",
    "randn",
    "arange",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "scalar_tensor",
    "eye",
    "linspace",
    "randint",
    "empty_strided",
)


@rule(*_FACTORIES)
def factory(ctx: RuleContext) -> Layout:
    """New tensors: fresh positions; their size arguments are shape constants."""
    out = [ctx.fresh(s, f"new{d}") for d, s in enumerate(ctx.out_shape())]
    sizes = ctx.arg(1 if ctx.op.startswith("aten.new_") else 0, "size")
    _record_sizes(ctx, "size", sizes, out)
    if ctx.op.startswith("aten.arange") and out:
        ints = [a for a in ctx.node.args if isinstance(a, int)]
        if len(ints) == 1 or (len(ints) == 2 and ints[0] == 0):
            ctx.shape_constant(f"arange[{len(ints) - 1}]", ints[-1], out[0])  # arange(n)
        elif ints:  # arange(1, 1 + n), arange(0, n, 2): the length is (end - start) / step
            ctx.freeze(out[0], "arange with a start or step: its length is not a plain count")
    return out

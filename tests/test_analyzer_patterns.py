"""Focused coupling patterns: each test builds the smallest module showing one pattern and
checks the groups, index maps, frozen reasons and shape constants it must produce."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import graphprune as gp


def member(dg: gp.DependencyGraph, fqn: str, dim: int, group_size: int | None = None) -> gp.Member:
    for g in dg.groups:
        if group_size is not None and g.size != group_size:
            continue
        for m in g.members:
            if m.fqn == fqn and m.dim == dim:
                return m
    raise AssertionError(f"{fqn}[{dim}] is in no group of size {group_size}")


def group_with(dg: gp.DependencyGraph, fqn: str, dim: int, size: int | None = None) -> gp.Group:
    for g in dg.groups:
        if any(m.fqn == fqn and m.dim == dim for m in g.members) and size in (None, g.size):
            return g
    raise AssertionError(f"{fqn}[{dim}] is in no group")


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def test_cat_offsets_are_the_index_map() -> None:
    dg = gp.analyze(Concat(), torch.randn(1, 3, 4, 4))
    g = group_with(dg, "head.weight", 1)
    assert g.size == 10 and g.prunable
    head_in = member(dg, "head.weight", 1)
    a_out, b_out = member(dg, "a.weight", 0), member(dg, "b.weight", 0)
    # head's input position p is a's channel p for p < 4, b's channel p - 4 after
    assert head_in.index_map.tolist() == a_out.index_map.tolist() + b_out.index_map.tolist()
    assert head_in.describe_map() == "identity"
    assert a_out.describe_map().startswith("identity") or a_out.index_map.tolist() == [0, 1, 2, 3]


class FusedQKV(nn.Module):
    """nanoGPT's c_attn(x).split(n_embd): q, k, v must keep equal sizes."""

    def __init__(self, c: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.n_head, self.n_embd = heads, c

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def test_fused_qkv_split_gives_head_and_head_dim_groups() -> None:
    dg = gp.analyze(FusedQKV(), torch.randn(2, 5, 8))
    heads = group_with(dg, "c_attn.weight", 0, size=2)
    head_dim = group_with(dg, "c_attn.weight", 0, size=4)
    rows_h = member(dg, "c_attn.weight", 0, group_size=2).index_map
    rows_d = member(dg, "c_attn.weight", 0, group_size=4).index_map
    # rows are [q | k | v], each (head, d) row-major: head = (r % 8) // 4, d = r % 4
    assert rows_h.tolist() == [(r % 8) // 4 for r in range(24)]
    assert rows_d.tolist() == [r % 4 for r in range(24)]
    assert member(dg, "proj.weight", 1, group_size=2).index_map.tolist() == [
        r // 4 for r in range(8)
    ]
    assert heads.prunable and head_dim.prunable
    # the split size and the view sizes follow these groups
    args = {(c.op, c.argument, c.value) for c in dg.shape_constants}
    assert ("aten.split.Tensor", "split_size", 8) in args
    assert ("aten.view", "size[2]", 2) in args and ("aten.view", "size[3]", 4) in args


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)  # (B, 8, H, W)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))  # (B, 8, 1, 1)
        return self.out(y * s)


def test_broadcast_mul_couples_channels_only() -> None:
    dg = gp.analyze(SqueezeExcite(), torch.randn(2, 3, 6, 6))
    g = group_with(dg, "conv.weight", 0)
    assert g.compact() == "8 prunable: conv[0] fc1[1] fc2[0] out[1]"
    assert group_with(dg, "fc1.weight", 0).compact() == "2 prunable: fc1[0] fc2[1]"


class Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 3, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_flatten_maps_each_channel_to_a_block_of_positions() -> None:
    dg = gp.analyze(Flatten(), torch.randn(1, 3, 2, 3))
    fc_in = member(dg, "fc.weight", 1)
    assert fc_in.index_map.tolist() == [c for c in range(4) for _ in range(6)]
    assert fc_in.describe_map() == "each channel x6 (blocks)"
    kept = dg.kept_positions("fc.weight", 1, {group_with(dg, "fc.weight", 1).id: [1, 3]})
    assert kept.tolist() == list(range(6, 12)) + list(range(18, 24))


class GQA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 4 * 4)
        self.kv = nn.Linear(16, 2 * 2 * 4)
        self.o = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, 4, 4).transpose(1, 2)  # (B, 4 heads, T, 4)
        k, v = self.kv(x).view(B, T, 2, 2, 4).unbind(2)  # 2 x (B, T, 2 kv heads, 4)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, 16))


def test_gqa_query_heads_factor_over_kv_heads() -> None:
    dg = gp.analyze(GQA(), torch.randn(2, 3, 16))
    kv_heads = next(g for g in dg.groups if g.size == 2 and "q[0]" in g.compact())
    assert kv_heads.compact() == "2 prunable: kv[0] o[1] q[0]"
    # query head h belongs to kv head h // 2
    q_rows = next(m for m in kv_heads.members if m.fqn == "q.weight").index_map
    assert q_rows.tolist() == [(r // 4) // 2 for r in range(16)]
    # kv.weight rows are (k|v, kv head, d): the k|v index is frozen by unbind
    frozen = [g for g in dg.groups if not g.prunable and "kv[0]" in g.compact()]
    assert frozen and any("unbind" in r for r in frozen[0].frozen_reasons)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)  # 4 groups: 2 in, 3 out each
        self.b = nn.Conv2d(12, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.g(self.a(x)))


def test_grouped_conv_groups_stay_consistent() -> None:
    dg = gp.analyze(GroupedConv(), torch.randn(1, 3, 5, 5))
    groups = group_with(dg, "a.weight", 0, size=4)
    assert groups.compact() == "4 prunable: a[0] b[1] g[0]"
    assert member(dg, "a.weight", 0, 4).index_map.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert member(dg, "g.weight", 0, 4).index_map.tolist() == [c // 3 for c in range(12)]
    assert group_with(dg, "g.weight", 1).compact() == "2 prunable: a[0] g[1]"
    assert group_with(dg, "g.weight", 0, size=3).compact() == "3 prunable: b[1] g[0]"
    assert any(c.argument == "groups" and c.value == 4 for c in dg.shape_constants)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(self.mid(self.emb(idx)))


def test_tied_weights_are_one_tensor() -> None:
    dg = gp.analyze(Tied(), torch.randint(0, 10, (2, 3)))
    g = group_with(dg, "emb.weight", 1)
    # emb's columns feed mid; out (the same tensor) reads mid's output: all one group
    assert g.compact() == "6 prunable: emb[1] mid[0] mid[1] out[1]"
    rows = group_with(dg, "emb.weight", 0)
    assert not rows.prunable


class Mystery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h = torch.special.i0(h)  # an op with no channel rule
        return self.c(self.b(h))


def test_unsupported_op_freezes_its_channels_and_is_reported() -> None:
    dg = gp.analyze(Mystery(), torch.randn(2, 4))
    assert [(d.node, d.op) for d in dg.diagnostics] == [("special_i0", "aten.special_i0")]
    frozen = group_with(dg, "a.weight", 0)
    assert not frozen.prunable
    assert "no channel rule" in frozen.frozen_reasons[0]
    assert "special_i0" in frozen.frozen_reasons[0]
    assert group_with(dg, "b.weight", 0).prunable  # downstream of the op is still free
    assert "unsupported: special_i0" in str(dg)


class Rotary(nn.Module):
    """Slicing halves of a dim and concatenating them swapped pairs position i with i + d/2."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q(x)
        half = q.shape[-1] // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        return self.o(q + rotated)


def test_slices_and_cat_pair_positions() -> None:
    dg = gp.analyze(Rotary(), torch.randn(2, 8))
    g = group_with(dg, "q.weight", 0)
    assert g.size == 4
    assert member(dg, "q.weight", 0).index_map.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    kinds = {(c.argument, c.per) for c in dg.shape_constants}
    assert ("end", "end") in kinds and ("start", "start") in kinds


def test_reshape_that_mixes_dims_freezes() -> None:
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 24)
            self.b = nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.a(x).view(-1, 6, 4).transpose(1, 2))  # 24 -> (6, 4)

    class Swap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn(6, 4))
            self.b = nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(x + self.a.view(4, 6))  # (6, 4) -> (4, 6) does not nest

    dg = gp.analyze(Mix(), torch.randn(2, 3))
    assert {g.size for g in dg.groups if "a[0]" in g.compact()} == {6, 4}
    dg = gp.analyze(Swap(), torch.randn(4, 6))
    g = group_with(dg, "a", 0)
    assert not g.prunable and any("mixes dimensions" in r for r in g.frozen_reasons)


def test_norms_couple_their_parameters() -> None:
    class Norms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.gn = nn.GroupNorm(2, 8)
            self.inorm = nn.InstanceNorm2d(8, affine=True)
            self.prelu = nn.PReLU(8)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.prelu(self.inorm(self.gn(self.conv(x)))))

    dg = gp.analyze(Norms(), torch.randn(1, 3, 4, 4))
    groups = {g.compact() for g in dg.groups}
    # GroupNorm(2, 8): channels factor into (2 groups, 4 per group)
    assert "2 prunable: conv[0] gn[0] inorm[0] out[1] prelu[0]" in groups
    assert "4 prunable: conv[0] gn[0] inorm[0] out[1] prelu[0]" in groups
    g = group_with(dg, "gn.weight", 0, size=4)
    assert any("GroupNorm" in n for n in g.notes)


def test_layernorm_and_standalone_parameters() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.scale = nn.Parameter(torch.ones(6))
            self.norm = nn.LayerNorm(6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.inp(x)
            return self.out(self.norm(h + self.scale * h))

    dg = gp.analyze(Block(), torch.randn(3, 4))
    g = group_with(dg, "scale", 0)
    assert g.compact() == "6 prunable: inp[0] norm[0] out[1] scale[0]"
    assert any("LayerNorm" in n for n in g.notes)
    assert any(c.argument == "normalized_shape[0]" for c in dg.shape_constants)


def test_position_channels_expand_composites() -> None:
    dg = gp.analyze(FusedQKV(), torch.randn(2, 5, 8))
    rows = dg.position_channels("c_attn.weight", 0)
    heads = group_with(dg, "c_attn.weight", 0, size=2).id
    dims = group_with(dg, "c_attn.weight", 0, size=4).id
    assert rows[13] == ((heads, 1), (dims, 1)) or rows[13] == ((dims, 1), (heads, 1))
    kept = dg.kept_positions("c_attn.weight", 0, {heads: [1], dims: [0, 1, 2, 3]})
    assert kept.tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert np.all(np.diff(kept) > 0)


def test_slice_from_the_end_freezes() -> None:
    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.b = nn.Linear(5, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.a(x)[:, :-1])

    dg = gp.analyze(Tail(), torch.randn(2, 3))
    g = group_with(dg, "a.weight", 0)
    assert not g.prunable and any("counts from the end" in r for r in g.frozen_reasons)


class ElementwiseMinMax(nn.Module):
    """torch.min(a, b)/torch.max(a, b) of two tensors (Apertus' xIELU): elementwise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.min(self.a(x), torch.tensor(1.0)) + torch.max(self.b(x), self.a(x))
        return self.out(h)


def test_elementwise_min_max_couple_like_any_binary_op() -> None:
    dg = gp.analyze(ElementwiseMinMax(), torch.randn(2, 4))
    assert group_with(dg, "a.weight", 0).compact() == "8 prunable: a[0] b[0] out[1]"

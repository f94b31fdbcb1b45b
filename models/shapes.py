"""Small models whose forwards compute sizes the way real architectures do.

Each reproduces one class of shape arithmetic that a rewrite has to follow (the timm/
torchvision model it comes from in brackets). They are the fixtures of the count-relation
tests; see :mod:`graphprune.planning.relations`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShapeAttention(nn.Module):
    """``C // self.num_heads`` from ``x.shape`` and ``reshape(B, N, C)`` (timm convit, twins,
    pvt_v2, crossvit): head_dim follows the residual width."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5  # fixed at init, as timm does
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class ShapeViT(nn.Module):
    """Patch conv -> blocks of pre-norm ShapeAttention and MLP -> mean pool -> head."""

    def __init__(self, dim: int = 32, depth: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))
        self.attn = nn.ModuleList(ShapeAttention(dim, num_heads) for _ in range(depth))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, C)
        for k, (attn, mlp) in enumerate(zip(self.attn, self.mlp, strict=True)):
            x = x + attn(self.norms[2 * k](x))
            x = x + mlp(self.norms[2 * k + 1](x))
        return self.head(x.mean(1))


class ListSplit(nn.Module):
    """``torch.split(x, self.split_indexes)`` with a tuple attribute, parts through depthwise
    convs and concatenated back (timm inception_next, mambaout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        branch = dim // 4
        self.split_indexes = (dim - 2 * branch, branch, branch)
        self.dw_a = nn.Conv2d(branch, branch, 3, padding=1, groups=branch)
        self.dw_b = nn.Conv2d(branch, branch, 5, padding=2, groups=branch)

    def forward(self, x: Tensor) -> Tensor:
        x_id, x_a, x_b = torch.split(x, self.split_indexes, dim=1)  # type: ignore[arg-type]
        return torch.cat((x_id, self.dw_a(x_a), self.dw_b(x_b)), dim=1)


class PartialConv(nn.Module):
    """``torch.split(x, [self.dim_conv3, self.dim_untouched])`` (timm fasternet)."""

    def __init__(self, dim: int, n_div: int = 4) -> None:
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


class HalfSplit(nn.Module):
    """``x.split(self.expand_chs // 2)``: an attribute inside arithmetic (timm cspnet)."""

    def __init__(self, dim: int, expand: int) -> None:
        super().__init__()
        self.expand_chs = expand
        self.conv_exp = nn.Sequential(nn.Conv2d(dim, expand, 1), nn.BatchNorm2d(expand), nn.ReLU())
        half = expand // 2
        self.blocks = nn.Sequential(nn.Conv2d(half, half, 3, padding=1), nn.ReLU())
        self.conv_down = nn.Conv2d(expand, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        return self.conv_down(torch.cat([xs, self.blocks(xb)], dim=1))


class SliceBound(nn.Module):
    """``out[:, 0:self.in_channels] += x``: a slice bound stored on the module (timm rexnet)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return torch.cat([out[:, 0 : self.in_channels] + x, out[:, self.in_channels :]], dim=1)


class ScaleView(nn.Module):
    """``self.scale.view(self.shape)`` with a tuple shape attribute (timm poolformer)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(self.shape)


class SharedWidth(nn.Module):
    """One attribute feeding two groups (timm efficientvit ``key_dim``, efficientformerv2
    ``num_heads``): two projections, each viewed as ``(parts, self.width)`` and summed over
    parts. Their widths are different groups, so a plan may prune them differently -- but the
    single attribute then needs two values: the groups are tied to one count."""

    def __init__(self, dim: int, parts: int, width: int) -> None:
        super().__init__()
        self.parts, self.width = parts, width
        self.fa = nn.Linear(dim, parts * width)
        self.fb = nn.Linear(dim, parts * width)
        self.out = nn.Linear(2 * width, dim)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        a = self.fa(x).view(B, self.parts, self.width).sum(1)  # (B, width)
        b = self.fb(x).view(B, self.parts, self.width).amax(1)  # (B, width)
        return self.out(torch.cat([a, b], dim=1))


class RootReshape(nn.Module):
    """Root-module attributes in a method of the root (torchvision VisionTransformer
    ``_process_input``: ``x.reshape(n, self.hidden_dim, n_h * n_w)``)."""

    def __init__(self, hidden_dim: int = 24, patch_size: int = 4) -> None:
        super().__init__()
        self.hidden_dim, self.patch_size = hidden_dim, patch_size
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, 2 * hidden_dim), nn.GELU())
        self.head = nn.Linear(2 * hidden_dim, 10)

    def _process_input(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // self.patch_size) * (w // self.patch_size))
        return x.permute(0, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mlp(self._process_input(x)).mean(1))


class HardCoded(nn.Module):
    """A literal size in the forward: ``view(B, 16, -1)`` cannot follow pruning, so the group it
    touches is frozen (with the line) and the rest of the model is still pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv1d(16, 16, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        s = self.stem(x)
        s = self.mix(s.view(B, 16, -1)).view_as(s)
        return self.head(self.body(s).mean((2, 3)))


class Stage(nn.Module):
    """A CNN stage around one of the blocks above: stem conv -> block -> pool -> head."""

    def __init__(self, block: nn.Module, dim: int, out: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.block = block
        self.head = nn.Linear(out or dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def shape_models() -> dict[str, tuple[nn.Module, tuple[Tensor]]]:
    """Every fixture as (model, example inputs), freshly built (seed 0)."""
    torch.manual_seed(0)
    image = (torch.randn(2, 3, 16, 16),)
    return {
        "shape_vit": (ShapeViT().eval(), image),
        "list_split": (Stage(ListSplit(32), 32).eval(), image),
        "partial_conv": (Stage(PartialConv(32), 32).eval(), image),
        "half_split": (Stage(HalfSplit(32, 64), 32).eval(), image),
        "slice_bound": (Stage(SliceBound(16, 48), 16, 48).eval(), image),
        "scale_view": (Stage(ScaleView(32), 32).eval(), image),
        "shared_width": (
            nn.Sequential(nn.Linear(8, 32), SharedWidth(32, 2, 16), nn.Linear(32, 10)).eval(),
            (torch.randn(2, 8),),
        ),
        "root_reshape": (RootReshape().eval(), image),
        "hard_coded": (HardCoded().eval(), image),
    }

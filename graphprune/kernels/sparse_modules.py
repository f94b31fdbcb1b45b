"""Inference modules that multiply by a sparse weight (CSR, BSR, or 2:4 on CUDA).

They replace ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers whose weight is mostly zeros (see
``graphprune.passes.sparsify``). Each computes W @ X with X the layer input laid out as
(in, rows): torch's CPU sparse kernels (MKL) are fastest as sparse @ dense. They hold no
trainable weight; :meth:`to_dense` gives back the equivalent dense layer (for export).
"""

from __future__ import annotations

import warnings
from typing import TypeVar

import torch
from torch import Tensor, nn

LAYOUTS = ("csr", "bsr", "semi_structured")


def to_sparse(weight: Tensor, layout: str, blocksize: int | None = None) -> Tensor:
    """``weight`` (out, in), dense, as a sparse tensor in ``layout``."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we measure, not trust
        warnings.simplefilter("ignore", UserWarning)
        if layout == "csr":
            return weight.to_sparse_csr()
        if layout == "bsr":
            if blocksize is None:
                raise ValueError("bsr needs a blocksize")
            return weight.to_sparse_bsr((blocksize, blocksize))
        if layout == "semi_structured":
            from torch.sparse import to_sparse_semi_structured

            return to_sparse_semi_structured(weight)
    raise ValueError(f"unknown sparse layout {layout!r}; use one of {LAYOUTS}")


def sparse_matmul(weight: Tensor, rows: Tensor, layout: str) -> Tensor:
    """(R, in) rows times the sparse (out, in) weight -> (R, out)."""
    if layout == "semi_structured":  # CUTLASS kernels take the dense operand second, as F.linear
        return torch.nn.functional.linear(rows, weight)
    return (weight @ rows.T).T  # (out, in) @ (in, R) -> (out, R) -> (R, out)


class _SparseProduct(nn.Module):
    """A sparse (out, in) weight and optional bias: ``rows (R, in) -> (R, out)``."""

    weight: Tensor
    bias: Tensor | None

    def __init__(
        self, weight: Tensor, bias: Tensor | None, layout: str, blocksize: int | None
    ) -> None:
        super().__init__()
        self.layout, self.blocksize = layout, blocksize
        self.register_buffer("weight", to_sparse(weight.detach(), layout, blocksize))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def product(self, rows: Tensor) -> Tensor:
        y = sparse_matmul(self.weight, rows, self.layout)  # (R, out)
        return y + self.bias if self.bias is not None else y


class SparseLinear(_SparseProduct):
    """``nn.Linear`` with its weight in a sparse layout: (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, layout: str, blocksize: int | None = None) -> None:
        super().__init__(linear.weight, linear.bias, layout, blocksize)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.product(x.reshape(-1, self.in_features))  # (R, in) -> (R, out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _filled(layer, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, layout={self.layout}"


class SparseConv1x1(_SparseProduct):
    """A 1x1, stride-1, ungrouped ``nn.Conv2d`` as sparse W @ X: (N, in, H, W) -> (N, out, H, W)."""

    def __init__(self, conv: nn.Conv2d, layout: str, blocksize: int | None = None) -> None:
        if not is_pointwise(conv):
            raise ValueError("SparseConv1x1 takes a 1x1 conv with stride 1, no padding, groups 1")
        weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
        super().__init__(weight, conv.bias, layout, blocksize)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        y = self.product(x.permute(0, 2, 3, 1).reshape(-1, self.in_channels))  # (N*H*W, out)
        return y.reshape(n, h, w, self.out_channels).permute(0, 3, 1, 2)

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=self.bias is not None)
        return _filled(conv, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=1, layout={self.layout}"


SPARSE_MODULES = (SparseLinear, SparseConv1x1)

Dense = TypeVar("Dense", nn.Linear, nn.Conv2d)


def _filled(layer: Dense, sparse_weight: Tensor, bias: Tensor | None) -> Dense:
    """``layer`` with the densified weight (reshaped to its own) and ``bias`` copied in."""
    weight = sparse_weight.to_dense()
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias)
    return layer


def is_pointwise(module: nn.Module) -> bool:
    """A conv that is a per-pixel matrix multiply."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse module of ``model`` by its dense layer, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SPARSE_MODULES):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.to_dense())
    return model

"""Modules the rewriting passes put in place of ones that cannot express a pruned shape, and
the weight a layer stores (masked or not), which every stage that touches weights reads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SkipBlock(nn.Module):
    """Stands in for a dropped residual block ``x + f(x)``: returns ``x`` (extra args ignored),
    or ``(x, None, ...)`` where the block returned a tuple of ``arity`` (attention weights)."""

    def __init__(self, replaced: str = "", arity: int = 0) -> None:
        super().__init__()
        self.replaced = replaced  # class name of the block it replaces, for repr and reports
        self.arity = arity

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return (x, *[None] * (self.arity - 1)) if self.arity else x

    def extra_repr(self) -> str:
        return f"replaces={self.replaced}"


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention width (heads x head_dim) may differ from
    ``embed_dim``, the width of its input and output, as it does after pruning heads or the
    residual stream. Parameters keep their names, so ``state_dict`` keys are unchanged.
    """

    def __init__(self, source: nn.MultiheadAttention, num_heads: int) -> None:
        nn.Module.__init__(self)
        if not source._qkv_same_embed_dim or source.bias_k is not None or source.add_zero_attn:
            raise NotImplementedError(
                "only packed q/k/v projections without bias_k/add_zero_attn can be pruned"
            )
        weight = source.in_proj_weight  # (3 * inner, embed)
        inner = weight.shape[0] // 3
        self.embed_dim = self.kdim = self.vdim = weight.shape[1]
        self._qkv_same_embed_dim = True
        self.num_heads = num_heads
        self.head_dim = inner // num_heads
        self.dropout = source.dropout
        self.batch_first = source.batch_first
        self.in_proj_weight = weight
        self.in_proj_bias = source.in_proj_bias
        self.out_proj = source.out_proj  # Linear(inner -> embed)
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, _ = query.shape
        S = key.shape[1]
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)  # 3 x (B, L, nh * hd)
        else:
            w_q, w_k, w_v = w.chunk(3)
            b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        q = q.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        v = v.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, B, L, S, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5  # (B, nh, L, S)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(
                    torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            weights = scores.softmax(-1)
            y = F.dropout(weights, dropout, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
        y = y.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)  # (B, L, nh * hd)
        out = self.out_proj(y)  # (B, L, E)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        B: int,
        L: int,
        S: int,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """Merge MHA's masks (bool True = masked out, or additive float) into (B, nh|1, L, S)."""
        mask: Tensor | None = None
        for m in (attn_mask, key_padding_mask):
            if m is None:
                continue
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            if m is key_padding_mask:
                m = m.view(B, 1, 1, S)
            elif m.dim() == 3:
                m = m.view(B, self.num_heads, L, S)
            mask = m if mask is None else mask + m
        return mask


def weight_of(module: nn.Module) -> Tensor:
    """``module.weight`` (typed; masked layers return the masked weight)."""
    weight = module.weight
    assert isinstance(weight, Tensor), type(weight)
    return weight


def stored_weight(module: nn.Module) -> Tensor:
    """The weight tensor ``module`` stores: the parametrization's original when masked
    (what an in-place update writes to), else ``module.weight``."""
    plist: Any = getattr(module, "parametrizations", None)
    if plist is not None and "weight" in plist:
        original: Tensor = plist["weight"].original
        return original
    return weight_of(module)

"""Parameter and MAC counts: MACs = FLOPs / 2 of conv, matmul and attention ops, counted by
torch's FlopCounterMode. nn.MultiheadAttention's fused fast path (which the counter cannot see
into) is disabled while counting, and the CPU flash-attention kernel gets the standard SDPA
formula, so attention is counted the same way before and after pruning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode, sdpa_flop_count

from graphprune.capture import normalize_inputs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query, key, value))


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


class _TotalFlops(FlopCounterMode):
    """torch's FlopCounterMode (its op formulas, decompositions and custom mapping) without
    the per-module breakdown, which graphprune does not read: the module tracker it enters
    hooks every module's forward and costs as much as the counting itself (MobileNetV3-L:
    19 ms of a 36 ms counted forward). Counts land in the tracker's initial "Global" entry,
    so :meth:`get_total_flops` is unchanged."""

    def __enter__(self) -> _TotalFlops:
        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: Any) -> Any:
        mode, self.mode = self.mode, None
        assert mode is not None
        return mode.__exit__(*args)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``example_inputs`` (eval mode, no grad)."""
    return forward_counting_macs(model, example_inputs)[1]


def forward_counting_macs(model: nn.Module, example_inputs: Any) -> tuple[Any, int]:
    """One forward on ``example_inputs`` (eval mode, no grad; the modes are restored): its
    output and its multiply-accumulates. Compile's checks of the original and of the
    rewritten model run this, so counting MACs costs no forward of its own."""
    args, kwargs = normalize_inputs(example_inputs)
    training = {m: m.training for m in model.modules()}
    # nothing may require grad: the counter's module tracker hooks tensors that do, and a view
    # of a parameter made under no_grad (timm cait's cls_token.expand) has no grad_fn to hook
    requires = {p: p.requires_grad for p in model.parameters()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for p in requires:
            p.requires_grad_(False)
        with torch.no_grad(), _TotalFlops(display=False, custom_mapping=_CUSTOM) as counter:
            output = model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p, flag in requires.items():
            p.requires_grad_(flag)
        for m, t in training.items():
            m.train(t)
    return output, int(counter.get_total_flops() // 2)


def si(n: int) -> str:
    """``11.7 M``, ``4.44 G``: a count in three significant digits."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)

"""A channel plan narrows the attention with the residual width (``Plan.attention``).

``ratio=0.5`` on a transformer means what it means on a CNN: every layer keeps half its
width, q/k/v and the attention output included, so MACs fall to about a quarter (the issue's
bar: at most 0.30), like Torch-Pruning's and like the published width-pruned models. Where
nothing depends on head_dim's size the plan prunes head_dim channel by channel; where
something does -- attention's default scale 1/sqrt(head_dim) (these three ViTs), a rotary
table, a config (tests/test_hf.py) -- whole heads go. Dead channels and heads are pruned
exactly (the equivalence oracle) and ``attention="keep"`` is the earlier behaviour.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.models import MODELS
from tests.equivalence import check_dead_channels, outputs


def _timm_vit() -> tuple[nn.Module, tuple[torch.Tensor]]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=64, depth=4).eval()
    return model, (torch.randn(1, 3, 64, 64),)


def _torchvision_vit() -> tuple[nn.Module, tuple[torch.Tensor]]:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=64, patch_size=16, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=512
    ).eval()
    return model, (torch.randn(1, 3, 64, 64),)


def _zoo_vit() -> tuple[nn.Module, Any]:
    spec = MODELS["vit"]
    return spec.build(), spec.example_inputs()


CASES = {"zoo vit": _zoo_vit, "timm vit": _timm_vit, "torchvision vit": _torchvision_vit}


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_the_channels_keeps_a_quarter_of_the_macs(name: str) -> None:
    model, x = CASES[name]()
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)
    report = gp.report(pruned)
    assert report.macs_ratio <= 0.30, report.table()
    assert not report.frozen, [f.reason for f in report.frozen]
    # the default scale depends on head_dim: whole heads go, half of them
    assert any(g.kind == "heads" and g.kept * 2 == g.total for g in report.groups)
    assert not any(g.kind == "head_dim" for g in report.groups)
    assert outputs(pruned, x).shape == outputs(model, x).shape

    kept = gp.compile(model, gp.Plan(ratio=0.5, round_to=1, attention="keep"), x)
    assert gp.report(kept).macs_ratio > report.macs_ratio + 0.05  # the attention stayed whole
    assert not any(g.kind in ("heads", "head_dim") for g in gp.report(kept).groups)


def test_head_dim_goes_channel_by_channel_where_nothing_depends_on_its_size() -> None:
    """timm's Attention without the fused kernel scales by ``self.scale``, a number: head_dim
    is pruned by importance, the scale kept (the original's scores minus removed channels)."""
    model, x = _timm_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)
    report = gp.report(pruned)
    assert any(g.kind == "head_dim" and g.kept * 2 == g.total for g in report.groups)
    assert report.macs_ratio <= 0.30, report.table()
    assert pruned.blocks[0].attn.scale == model.blocks[0].attn.scale
    check_dead_channels(model, x, {"channels"}, "channels", seed=2)


def test_timm_vit_attention_width_prunes_dead_channels_exactly() -> None:
    model, x = _timm_vit()
    report = check_dead_channels(model, x, {"channels"}, "channels", seed=2)
    assert any(g.kind == "heads" for g in report.groups)


def test_attention_heads_on_request() -> None:
    """``attention="heads"``: whole heads go with the residual width, head_dim stays."""
    model, x = _zoo_vit()
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1, attention="heads"), x)
    report = gp.report(pruned)
    kinds = {g.kind for g in report.groups}
    assert "heads" in kinds and "head_dim" not in kinds
    assert report.macs_ratio <= 0.30, report.table()
    assert outputs(pruned, x).shape == outputs(model, x).shape


def test_attention_must_be_a_known_mode() -> None:
    with pytest.raises(gp.PlanError, match=r"attention='width'.*auto"):
        gp.Plan(ratio=0.5, attention="width")

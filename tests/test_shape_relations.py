"""Count relations: sizes the forward computes follow the kept channels, or freeze with why.

One fixture per class of shape arithmetic found in timm/torchvision (``graphprune.models.
shapes``): each compiles at ratio 0.5, the relation it needs is asserted (attribute values,
driven or frozen groups), and pruning dead channels leaves the output unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import graphprune as gp
from graphprune.analysis.provenance import trace_shapes
from graphprune.models.shapes import shape_models
from tests.equivalence import check_dead_channels, outputs

PLAN = gp.Plan(ratio=0.5, round_to=1)


def compiled(name: str, plan: gp.Plan = PLAN) -> tuple[torch.nn.Module, gp.CompileReport]:
    model, x = shape_models()[name]
    pruned = gp.compile(model, plan, x)
    assert outputs(pruned, x).shape == outputs(model, x).shape
    return pruned, gp.report(pruned)


def test_head_dim_follows_the_residual_width_computed_from_x_shape() -> None:
    """With the attention inner width left to the relations (``attention="keep"``), head_dim
    is driven by ``C // self.num_heads``; by default the plan prunes head_dim itself, to the
    same count."""
    kept = gp.Plan(ratio=0.5, round_to=1, attention="keep")
    for plan in (kept, PLAN):
        pruned, report = compiled("shape_vit", plan)
        attn = pruned.attn[0]
        assert (attn.qkv.in_features, attn.qkv.out_features, attn.num_heads) == (16, 48, 4)
        assert not report.frozen
        driven = report.resolution["driven"]
        if plan is kept:
            assert driven and all("C // self.num_heads" in why for why in driven.values())
            assert all("kept at 4" in why for why in driven.values())  # 8 -> 16 / 4 heads
        else:
            assert not driven and any(g.kind == "head_dim" for g in report.groups)


@pytest.mark.parametrize(
    ("name", "attribute", "value"),
    [
        ("list_split", "split_indexes", (8, 4, 4)),
        ("half_split", "expand_chs", 32),  # solved from split(self.expand_chs // 2)
        ("slice_bound", "in_channels", 8),
        ("scale_view", "shape", (16, 1, 1)),
    ],
)
def test_module_attributes_take_the_values_the_kept_channels_need(
    name: str, attribute: str, value: object
) -> None:
    pruned, report = compiled(name)
    assert getattr(pruned.block, attribute) == value
    assert type(getattr(pruned.block, attribute)) is type(value)  # a tuple stays a tuple
    assert report.macs_ratio < 0.6 and not report.frozen


def test_split_sizes_from_two_attributes_add_up() -> None:
    pruned, _ = compiled("partial_conv")
    block = pruned.block
    assert block.dim_conv3 + block.dim_untouched == 16
    assert block.partial_conv3.in_channels == block.dim_conv3


def test_root_module_attributes_follow() -> None:
    pruned, _ = compiled("root_reshape")
    assert pruned.hidden_dim == pruned.conv_proj.out_channels == 12


def test_one_attribute_for_two_groups_ties_their_counts() -> None:
    plan = gp.Plan(ratio=0.5, round_to=1, overrides={"1.fb": 0.75})
    pruned, report = compiled("shared_width", plan)
    block = pruned[1]
    assert block.width == 8 and block.fa.out_features == block.fb.out_features == 16
    assert any(
        "self.width" in why or "1.width" in why for why in report.resolution["driven"].values()
    )


def test_hard_coded_size_freezes_its_group_and_the_rest_is_pruned() -> None:
    pruned, report = compiled("hard_coded")
    assert len(report.frozen) == 1
    frozen = report.frozen[0]
    assert "shapes.py" in frozen.reason and "hard-coded as 16" in frozen.reason
    assert pruned.stem[0].out_channels == 16 and pruned.body[0].out_channels == 16
    assert report.macs_ratio < 0.7


class Picky(nn.Module):
    """A forward that rejects traced ints (so the trace sees nothing) and hard-codes
    ``self.width`` in a view: only the verification after the rewrite can catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 16
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        assert type(self.width) is int
        s = self.stem(x)
        s = s.view(s.shape[0], self.width, -1).softmax(-1).view_as(s)
        return self.head(self.body(s).mean((2, 3)))


def test_a_failed_rewrite_freezes_its_groups_and_retries() -> None:
    x = torch.randn(2, 3, 8, 8)
    pruned = gp.compile(Picky().eval(), PLAN, x)
    report = gp.report(pruned)
    assert [f.name for f in report.frozen] == ["stem.0.weight[0]"]
    assert "the rewrite failed" in report.frozen[0].reason and "view" in report.frozen[0].reason
    assert pruned.body[0].out_channels == 16 and pruned.stem[0].out_channels == 16
    assert any("shape trace" in note for note in report.notes)
    with pytest.raises(gp.PruneError, match="view"):
        gp.compile(Picky().eval(), PLAN, x, strict=True)


@pytest.mark.parametrize("name", sorted(set(shape_models()) - {"shared_width"}))
def test_dead_channels_prune_exactly(name: str) -> None:
    model, x = shape_models()[name]
    report = check_dead_channels(model, x, {"channels", "head_dim"}, "channels")
    assert report.macs_after < report.macs_before


def test_trace_records_shape_reads_and_attributes() -> None:
    model, x = shape_models()["shape_vit"]
    trace = trace_shapes(model, x)
    assert not trace.error
    reshape = next(u for u in trace.uses if u.func == "reshape" and u.module == "attn.0")
    described = [e.describe() for e in reshape.exprs]
    assert "attn.0.num_heads" in described[3]
    assert "attn.0.num_heads" in described[4] and ".shape[2]" in described[4]
    assert trace.attributes[("attn.0", "num_heads", -1)] == 4
    assert model.attn[0].num_heads == 4 and type(model.attn[0].num_heads) is int  # restored

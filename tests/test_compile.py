from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import graphprune as gp
from graphprune.models import MODELS
from graphprune.modules import PrunedMultiheadAttention, SkipBlock
from tests.equivalence import outputs


@pytest.mark.slow
@pytest.mark.parametrize("importance", ["l2", "taylor"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_compiles_at_three_ratios(name: str, importance: str) -> None:
    spec = MODELS[name]
    model, x = spec.build(), spec.example_inputs()
    shape = outputs(model, x).shape
    previous = None
    for ratio in (0.3, 0.5, 0.7):  # exact counts: every step removes more
        pruned = gp.compile(model, gp.Plan(ratio=ratio, importance=importance, round_to=1), x)
        assert outputs(pruned, x).shape == shape
        report = gp.report(pruned)
        assert report.params_after < report.params_before
        if previous is not None:
            assert report.macs_after < previous  # more pruning, fewer MACs
        previous = report.macs_after
    # the default (widths rounded to the SIMD block) never removes more than asked, per layer
    pruned = gp.compile(model, gp.Plan(ratio=0.7, importance=importance), x)
    assert outputs(pruned, x).shape == shape
    assert all(u.kept >= u.total - int(0.7 * u.total) for u in gp.report(pruned).units)
    assert gp.report(pruned).macs_after >= previous


def test_original_untouched_and_mode_kept() -> None:
    spec = MODELS["resnet18"]
    model, x = spec.build().train(), spec.example_inputs()
    before = copy.deepcopy(model.state_dict())
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)
    assert pruned.training and all(m.training for m in pruned.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.layer1[0].conv1.out_channels == 16
    assert pruned.layer1[0].conv1.out_channels == 8
    assert pruned.layer1[0].bn1.num_features == 8
    assert pruned.fc.in_features == 64
    # usable for further training
    loss = pruned(*x).pow(2).mean()
    loss.backward()
    assert pruned.conv1.weight.grad is not None


def test_inplace_mutates_the_given_model() -> None:
    spec = MODELS["vgg"]
    model, x = spec.build(), spec.example_inputs()
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x, inplace=True)
    assert pruned is model and model.features[0].out_channels == 8


def test_report_table_and_changes() -> None:
    spec = MODELS["resnext"]
    pruned = gp.compile(spec.build(), gp.Plan(ratio=0.5, round_to=1), spec.example_inputs())
    report = gp.report(pruned)
    text = report.table()
    assert "params" in text and "MACs" in text and "groups pruned" in text
    assert "layers pruned" in text and "layer1.0.conv2" in text
    # the grouped conv keeps its 4 groups and loses half the channels inside each
    assert "layer1.0.conv2.out_channels: 16 -> 8" in report.changes
    assert pruned.layer1[0].conv2.groups == 4
    assert all(u.kept / u.total == 0.5 for u in report.units)
    assert report.to_dict()["macs_ratio"] == pytest.approx(report.macs_ratio)
    kept = gp.Resolution.from_dict(json.loads(json.dumps(report.to_dict()["resolution"]))).kept
    assert all(len(kept[g.id]) == g.kept for g in report.groups)  # indices are plain data
    assert {"capture", "analyze", "score", "resolve"} <= set(report.seconds)


def test_round_to_and_min_channels() -> None:
    spec = MODELS["resnet18"]
    pruned = gp.compile(spec.build(), gp.Plan(ratio=0.7, round_to=8), spec.example_inputs())
    for module in pruned.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels > 3:
            assert module.out_channels % 8 == 0
    tiny = gp.compile(spec.build(), gp.Plan(ratio=0.95, min_channels=4), spec.example_inputs())
    assert min(m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)) >= 4


def test_ignore_keeps_output_channels_and_overrides() -> None:
    spec = MODELS["resnet18"]
    plan = gp.Plan(ratio=0.5, ignore=["layer4.*"], overrides={"layer1.0.conv1": 0.25}, round_to=1)
    pruned = gp.compile(spec.build(), plan, spec.example_inputs())
    assert pruned.layer4[0].conv1.out_channels == 128 and pruned.fc.in_features == 128
    assert pruned.layer1[0].conv1.out_channels == 12  # 16 - floor(0.25 * 16)
    assert pruned.layer1[1].conv1.out_channels == 8


def test_global_scope_varies_per_group_and_respects_max_ratio() -> None:
    spec = MODELS["vgg"]
    model, x = spec.build(), spec.example_inputs()
    with torch.no_grad():  # 14 of the first conv's 16 channels clearly unimportant
        model.features[0].weight[:14].mul_(1e-3)
        model.features[1].weight[:14].mul_(1e-3)
        model.features[4].weight[:, :14].mul_(1e-3)
    pruned = gp.compile(model, gp.Plan(ratio=0.4, scope="global", max_ratio=0.75, round_to=1), x)
    report = gp.report(pruned)
    kept = {g.name: (g.kept, g.total) for g in report.groups}
    assert kept["features.0.weight[0]"] == (4, 16)  # capped at 75 % removed
    total_kept = sum(k for k, _ in kept.values())
    total = sum(t for _, t in kept.values())
    assert total - total_kept == int(0.4 * total)
    assert len({k / t for k, t in kept.values()}) > 1


def test_target_macs() -> None:
    spec = MODELS["mobilenet_v2"]
    pruned = gp.compile(spec.build(), gp.Plan(target_macs=0.5), spec.example_inputs())
    ratio = gp.report(pruned).macs_ratio
    assert 0.4 < ratio <= 0.5


def test_heads_on_transformers_keep_attributes_in_sync() -> None:
    x = MODELS["gpt"].example_inputs()
    gpt = gp.compile(MODELS["gpt"].build(), gp.Plan(ratio=0.5, granularity="heads"), x)
    attn = gpt.transformer.h[0].attn
    assert (attn.n_head, attn.head_dim) == (2, 16) and attn.c_attn.out_features == 96
    assert attn.c_proj.in_features == 32 and gpt.lm_head.in_features == 64

    x = MODELS["llama"].example_inputs()
    llama = gp.compile(MODELS["llama"].build(), gp.Plan(ratio=0.5, granularity="heads"), x)
    attn = llama.layers[0].self_attn
    # GQA: one of two kv heads removed with its two query heads; the ratio 4:2 stays 2:1
    assert (attn.n_heads, attn.n_kv_heads, attn.n_rep, attn.head_dim) == (2, 1, 2, 16)
    assert attn.k_proj.out_features == 16 and attn.q_proj.out_features == 32

    x = MODELS["vit"].example_inputs()
    vit = gp.compile(MODELS["vit"].build(), gp.Plan(ratio=0.5, granularity="heads"), x)
    mha = vit.blocks[0].attn
    assert isinstance(mha, PrunedMultiheadAttention)
    assert (mha.num_heads, mha.head_dim, mha.embed_dim) == (2, 16, 64)
    assert outputs(vit, x).shape == (2, 10)


def test_heads_ratio_must_remove_whole_heads() -> None:
    spec = MODELS["gpt"]
    with pytest.raises(gp.PlanError, match=r"removes 1\.2 of the 4 heads"):
        gp.compile(spec.build(), gp.Plan(ratio=0.3, granularity="heads"), spec.example_inputs())


def test_layers_drop_residual_blocks() -> None:
    spec = MODELS["llama"]
    model, x = spec.build(), spec.example_inputs()
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="layers"), x)
    assert sum(isinstance(m, SkipBlock) for m in pruned.layers) == 1
    assert gp.report(pruned).dropped in (["layers.0"], ["layers.1"])
    resnet = MODELS["resnet18"]
    with pytest.raises(gp.PlanError, match="no residual block"):  # relu(x + f(x)): not droppable
        gp.compile(
            resnet.build(), gp.Plan(ratio=0.5, granularity="layers"), resnet.example_inputs()
        )


class LiteralNanoGPTAttention(nn.Module):
    """nanoGPT's own attention: head_dim = C // n_head and view(B, T, C) tie widths together."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(32, 96)
        self.c_proj = nn.Linear(32, 32)
        self.n_head, self.n_embd = 4, 32

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def test_hard_coded_constant_is_refused_with_its_line() -> None:
    with pytest.raises(gp.PruneError) as info:
        gp.compile(
            LiteralNanoGPTAttention(),
            gp.Plan(ratio=0.5, granularity="heads"),
            torch.randn(2, 5, 32),
        )
    message = str(info.value)
    assert "test_compile.py" in message and "view" in message
    assert "module attribute" in message


def test_bad_plan_patterns_are_reported() -> None:
    spec = MODELS["resnet18"]
    with pytest.raises(gp.PlanError, match=r"'layer9\.\*' matches no module"):
        gp.compile(spec.build(), gp.Plan(ratio=0.5, ignore=["layer9.*"]), spec.example_inputs())


def test_a_plan_that_prunes_nothing_says_why() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=16), torch.randn(1, 3, 8, 8))
    (note,) = [n for n in gp.report(pruned).notes if n.startswith("nothing was pruned")]
    assert "narrower than round_to=16" in note
    assert "the analysis froze 2 groups" in note and "model output" in note

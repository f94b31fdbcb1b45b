"""Sparse plans: exact zero patterns, masked training keeps zeros, finalize, save/load."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import graphprune as gp
from graphprune.models import MODELS
from graphprune.models.transformers import GPT
from graphprune.sparsity import compute_masks, masked_layers
from tests.equivalence import outputs


def _gpt() -> tuple[nn.Module, tuple[torch.Tensor]]:
    spec = MODELS["gpt"]
    return spec.build(seed=0), spec.example_inputs()


def _nm_view(mask: torch.Tensor) -> torch.Tensor:
    """(out, k * in) with input channels last, as n:m groups are formed."""
    if mask.dim() > 2:
        mask = mask.movedim(1, -1)
    return mask.reshape(mask.shape[0], -1)


def test_unstructured_local_zeroes_exactly_the_ratio_of_every_layer() -> None:
    model, x = _gpt()
    pruned = gp.compile(model, gp.Plan(granularity="unstructured", ratio=0.9), x)
    masks = masked_layers(pruned)
    assert len(masks) == 8  # every Linear but the lm_head, whose weight is tied to wte
    for name, mask in masks.items():
        zeros = int((~mask).sum())
        assert zeros == math.floor(0.9 * mask.numel()), name
        weight = pruned.get_submodule(name).weight
        assert torch.equal(weight != 0, mask)  # the smallest |w| went (no exact zeros before)
        original = model.get_submodule(name).weight.detach().abs()
        assert original[~mask].max() <= original[mask].min()  # magnitude order
    skipped = {s.module: s.skipped for s in gp.report(pruned).sparsity if s.skipped}
    assert "tied with transformer.wte.weight" in skipped["lm_head"]
    assert torch.count_nonzero(model.transformer.h[0].mlp.c_fc.weight) == 64 * 256  # untouched


def test_global_threshold_hits_the_total_and_respects_max_ratio() -> None:
    model, x = _gpt()
    plan = gp.Plan(granularity="unstructured", ratio=0.8, scope="global", max_ratio=0.95)
    pruned = gp.compile(model, plan, x)
    masks = masked_layers(pruned)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == math.floor(0.8 * total)
    per_layer = [1 - m.float().mean().item() for m in masks.values()]
    assert max(per_layer) <= 0.95 + 1e-9 and max(per_layer) - min(per_layer) > 0.01
    # one threshold: every zeroed weight is below every kept one, except protected ones
    kept = torch.cat([pruned.get_submodule(n).weight[m].abs() for n, m in masks.items()])
    cut = torch.cat([model.get_submodule(n).weight[~m].abs() for n, m in masks.items()])
    assert cut.max() <= kept.min() or max(per_layer) >= 0.95 - 1e-3


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_n_m_has_exactly_n_of_every_m_along_the_input_dim(n: int, m: int) -> None:
    spec = MODELS["resnet18"]  # convs: groups of m input channels at each kernel position
    model, x = spec.build(), spec.example_inputs()
    pruned = gp.compile(model, gp.Plan(granularity="n:m", nm=[n, m]), x)
    masks = masked_layers(pruned)
    assert len(masks) >= 10
    for name, mask in masks.items():
        groups = _nm_view(mask).reshape(mask.shape[0], -1, m).sum(-1)
        assert bool((groups == n).all()), name
        assert torch.equal(pruned.get_submodule(name).weight != 0, mask)
    report = gp.report(pruned)
    stem = next(s for s in report.sparsity if s.module == "conv1")
    assert f"3 input channels are not a multiple of m={m}" in stem.skipped  # RGB stem cannot be n:m


@pytest.mark.parametrize("block", [[1, 4], [4, 4], [16, 16]])
def test_block_masks_are_aligned_tiles(block: list[int]) -> None:
    model = GPT(n_embd=64)
    x = (torch.randint(0, 96, (1, 8)),)
    pruned = gp.compile(model, gp.Plan(granularity="block", ratio=0.75, block=block), x)
    r, c = block
    for name, mask in masked_layers(pruned).items():
        tiles = mask.reshape(mask.shape[0] // r, r, -1, c).float().mean(dim=(1, 3))
        assert bool(((tiles == 0) | (tiles == 1)).all()), name  # each tile all kept or all cut
        assert int((tiles == 0).sum()) == math.floor(0.75 * tiles.numel())


@given(
    out=st.integers(1, 24),
    inp=st.sampled_from([4, 8, 12, 16, 32]),
    ratio=st.floats(0.0, 0.95, allow_subnormal=False),  # export_onnx flushes denormals
    seed=st.integers(0, 1000),
)
def test_counts_are_exact_for_any_shape(out: int, inp: int, ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(inp, out))
    for plan in [
        gp.Plan(granularity="unstructured", ratio=ratio, importance="random", seed=seed),
        gp.Plan(granularity="n:m", nm=[1, 4]),
        gp.Plan(granularity="block", ratio=ratio, block=[1, 4]),
    ]:
        mask = compute_masks(layer, plan).layers["0"].mask
        if plan.granularity == "n:m":
            assert bool((mask.reshape(out, -1, 4).sum(-1) == 1).all())
        elif plan.granularity == "block":
            tiles = mask.reshape(out, -1, 4)
            assert bool((tiles.all(-1) | ~tiles.any(-1)).all())
            assert int((~tiles.any(-1)).sum()) == math.floor(  # 1/3 of 21 tiles is 7, not 6
                ratio * tiles.shape[0] * tiles.shape[1] + 1e-9
            )
        else:
            assert int((~mask).sum()) == math.floor(ratio * mask.numel() + 1e-9)


def test_taylor_cuts_the_weights_the_loss_does_not_see() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    batches = [torch.randn(4, 16) for _ in range(3)]

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out[:, :4].pow(2).sum()  # rows 4..7 of the weight get no gradient

    for criterion in ("taylor", "fisher"):
        plan = gp.Plan(granularity="unstructured", ratio=0.5, importance=criterion)
        mask = compute_masks(model, plan, batches=batches, loss_fn=loss).layers["0"].mask
        assert not mask[4:].any() and mask[:4].all(), criterion
    magnitude = compute_masks(model, gp.Plan(granularity="unstructured", ratio=0.5))
    assert magnitude.layers["0"].mask[4:].any()  # magnitude alone would keep some of them


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_fine_tuning_keeps_zeros(optimizer: str) -> None:
    model, x = _gpt()
    pruned = gp.compile(model, gp.Plan(granularity="unstructured", ratio=0.8), x)
    pruned.train()
    masks = {n: m.clone() for n, m in masked_layers(pruned).items()}
    before = {n: pruned.get_submodule(n).weight.detach().clone() for n in masks}
    params = list(pruned.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    )
    tokens = torch.randint(0, 96, (4, 16))
    for _ in range(5):
        opt.zero_grad()
        logits = pruned(tokens)
        nn.functional.cross_entropy(logits.reshape(-1, 96), tokens.reshape(-1)).backward()
        opt.step()
    for name, mask in masks.items():
        weight = pruned.get_submodule(name).weight.detach()
        assert bool((weight[~mask] == 0).all()), name  # still exactly zero
        assert not torch.allclose(weight[mask], before[name][mask])  # but it did train

    gp.finalize(pruned)
    keys = set(pruned.state_dict())
    assert "transformer.h.0.mlp.c_fc.weight" in keys
    assert not any("parametrizations" in k for k in keys)
    assert not masked_layers(pruned)
    for name, mask in masks.items():
        assert bool((pruned.get_submodule(name).weight.detach()[~mask] == 0).all())


def test_finalizing_a_copy_leaves_the_original_masked() -> None:
    # a deepcopy shares torch's Parametrized* class: removing the property must not leak
    model, x = _gpt()
    pruned = gp.compile(model, gp.Plan(granularity="unstructured", ratio=0.5), x)
    baked = gp.finalize(copy.deepcopy(pruned))
    assert masked_layers(pruned) and not masked_layers(baked)
    assert torch.equal(outputs(pruned, x), outputs(baked, x))


def test_channels_then_two_four_on_the_remaining_mlp(tmp_path: Path) -> None:
    model, x = _gpt()
    plan = gp.Plan(ratio=0.5, sparsity=gp.Plan(granularity="n:m", include=["*.mlp.*"]))
    assert gp.Plan.from_json(plan.to_json()) == plan
    pruned = gp.compile(model, plan, x)
    fc = pruned.transformer.h[0].mlp.c_fc
    assert fc.weight.shape == (128, 32)  # channels first (50 % of 64 and 256)...
    masks = masked_layers(pruned)
    assert sorted(masks) == [
        f"transformer.h.{i}.mlp.{n}" for i in (0, 1) for n in ("c_fc", "c_proj")
    ]
    for mask in masks.values():  # ...then 2:4 on what is left
        assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())

    gp.save(pruned, tmp_path / "masked.pt")  # masks travel in the state_dict
    loaded = gp.load(MODELS["gpt"].build(seed=1), tmp_path / "masked.pt", x)
    assert torch.equal(outputs(loaded, x), outputs(pruned, x))
    assert sorted(masked_layers(loaded)) == sorted(masks)
    gp.save(gp.finalize(pruned), tmp_path / "baked.pt")  # and once baked, plain weights
    loaded = gp.load(MODELS["gpt"].build(seed=2), tmp_path / "baked.pt", x)
    assert not masked_layers(loaded) and torch.equal(outputs(loaded, x), outputs(pruned, x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "unstructured", "target_macs": 0.5}, "keep the dense MACs"),
        ({"granularity": "unstructured"}, "needs ratio="),
        ({"granularity": "n:m", "nm": [4, 2]}, "0 < n < m"),
        ({"granularity": "n:m", "ratio": 0.3}, "drop ratio="),
        ({"granularity": "block", "ratio": 0.5, "block": [0, 4]}, "[rows, cols]"),
        ({"granularity": "unstructured", "ratio": 0.5, "importance": "fpgm"}, "single weights"),
        (
            {"granularity": "unstructured", "ratio": 0.95, "scope": "global"},
            "max_ratio=0.99",
        ),
        ({"ratio": 0.5, "sparsity": {"ratio": 0.5}}, "sparsity= takes a sparse plan"),
        ({"ratio": 0.5, "include": ["x"]}, "include= selects the layers"),
    ],
)
def test_bad_sparse_plans_say_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(gp.PlanError, match=message.replace("[", r"\[").replace("(", r"\(")):
        gp.Plan(**kwargs)


def test_sparse_plan_keeps_dense_macs_and_says_so() -> None:
    model, x = _gpt()
    report = gp.report(gp.compile(model, gp.Plan(granularity="unstructured", ratio=0.9), x))
    assert report.macs_after == report.macs_before and report.params_after == report.params_before
    assert np.isclose(report.weight_sparsity, 0.9, atol=1e-3)
    assert "dense MACs unchanged" in report.table()


def test_channel_pruning_a_masked_model_slices_the_masks_too(tmp_path: Path) -> None:
    spec = MODELS["resnet18"]
    x = spec.example_inputs()
    masked = gp.compile(spec.build(), gp.Plan(granularity="unstructured", ratio=0.5), x)
    pruned = gp.compile(masked, gp.Plan(ratio=0.5), x)  # masks are buffers the analyzer slices
    baked_first = gp.compile(gp.finalize(copy.deepcopy(masked)), gp.Plan(ratio=0.5), x)
    torch.testing.assert_close(outputs(pruned, x), outputs(baked_first, x), atol=1e-6, rtol=0)
    masks = gp.masked_layers(pruned)
    assert len(masks) == len(gp.masked_layers(masked))
    for name, mask in masks.items():
        assert mask.shape == pruned.get_submodule(name).weight.shape
    gp.save(pruned, tmp_path / "m.pt")  # the record chain: masks, then channels
    loaded = gp.load(spec.build(seed=4), tmp_path / "m.pt", x)
    assert torch.equal(outputs(loaded, x), outputs(pruned, x))

"""The prune -> fine-tune pipeline: schedules, Pruner, BN recalibration, rewind, group lasso,
plots. Real data where accuracy matters: scikit-learn's bundled digits (no download)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.finetune import schedule_ratios
from graphprune.finetune.plots import plot_accuracy_vs_speedup, plot_kept_channels
from graphprune.models import MODELS
from tests.digits import digits_cnn
from tests.equivalence import outputs


# -- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine", "cubic"])
def test_schedules_end_exactly_at_the_target_and_rise(kind: str) -> None:
    ratios = schedule_ratios(0.7, 5, kind)
    assert ratios[-1] == 0.7 and len(ratios) == 5
    assert all(a < b for a, b in itertools.pairwise(ratios))
    if kind == "cubic":  # AGP: most of the pruning early
        assert ratios[0] > 0.7 * 0.4
    if kind == "linear":
        assert ratios == pytest.approx([0.14, 0.28, 0.42, 0.56, 0.7])


# -- Pruner ------------------------------------------------------------------------------------
def test_iterative_channels_end_at_the_one_shot_sizes() -> None:
    spec = MODELS["resnet18"]
    model, x = spec.build(), spec.example_inputs()
    plan = gp.Plan(ratio=0.6, round_to=4)
    seen: list[int] = []

    def finetune(m: nn.Module, step: int) -> dict[str, float]:
        seen.append(step)
        return {"params": float(sum(p.numel() for p in m.parameters()))}

    pruner = gp.Pruner(model, plan, x, steps=3, schedule="linear", progress=False)
    final = pruner.run(finetune)
    one_shot = gp.compile(model, plan, x)
    shapes = {n: tuple(p.shape) for n, p in final.state_dict().items()}
    assert shapes == {n: tuple(p.shape) for n, p in one_shot.state_dict().items()}
    assert seen == [0, 1, 2]
    assert [h.ratio for h in pruner.history] == pytest.approx([0.2, 0.4, 0.6])
    macs = [h.macs for h in pruner.history]
    assert macs[0] > macs[1] > macs[2] == gp.report(one_shot).macs_after
    assert pruner.history[-1].metrics["params"] == pruner.history[-1].params
    assert type(final) is type(model) and final(*x).shape == model(*x).shape


def test_iterative_heads_keep_whole_heads_to_the_target() -> None:
    spec = MODELS["gpt"]
    model, x = spec.build(), spec.example_inputs()
    pruner = gp.Pruner(model, gp.Plan(ratio=0.5, granularity="heads"), x, steps=2, progress=False)
    heads = [m.transformer.h[0].attn.n_head for _ in pruner for m in [pruner.model]]
    assert heads == [3, 2]  # cubic: 0.4375 of 4 heads -> 1 removed, then 2


def test_iterative_unstructured_masks_are_nested_and_exact() -> None:
    spec = MODELS["gpt"]
    model, x = spec.build(), spec.example_inputs()
    plan = gp.Plan(granularity="unstructured", ratio=0.9)
    pruner = gp.Pruner(model, plan, x, steps=3, progress=False)
    history: list[dict[str, torch.Tensor]] = []
    for _ in pruner:
        history.append({n: m.clone() for n, m in gp.masked_layers(pruner.model).items()})
    for before, after in itertools.pairwise(history):
        for name in before:
            assert not bool((after[name] & ~before[name]).any())  # cut weights stay cut
    for step, masks in enumerate(history):
        for mask in masks.values():
            zeros = int((~mask).sum())
            assert zeros == math.floor(pruner.ratios[step] * mask.numel() + 1e-9)
    assert pruner.history[-1].weight_sparsity == pytest.approx(0.9, abs=1e-3)


def test_iterative_layers_drop_the_scheduled_number_of_blocks() -> None:
    from graphprune.models.transformers import GPT

    model, x = GPT(n_layer=4), (torch.randint(0, 96, (2, 16)),)
    pruner = gp.Pruner(model, gp.Plan(ratio=0.5, granularity="layers"), x, steps=2)
    final = pruner.run()
    records = [*final._graphprune_record["previous"], final._graphprune_record]
    per_step = [len(r["dropped"]) for r in records]
    assert per_step == [1, 1]  # cubic: 0.4375 of 4 blocks -> 1, then 2 in all
    assert len({d for r in records for d in r["dropped"]}) == 2
    assert final(*x).shape == model(*x).shape


def test_taylor_on_labelled_dataloader_batches(tmp_path: Path) -> None:
    spec = MODELS["vgg"]
    model, x = spec.build(), spec.example_inputs()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    plan = gp.Plan(ratio=0.5, importance="taylor")
    pruner = gp.Pruner(
        model, plan, x, calibration=loader, loss_fn=nn.functional.cross_entropy, progress=False
    )
    assert all(isinstance(b, gp.LabelledBatch) for b in pruner._batches)
    final = pruner.run()
    unlabelled = gp.compile(model, plan, x)  # mean-squared-output loss: other channels
    assert gp.report(final).resolution != gp.report(unlabelled).resolution
    gp.save(final, tmp_path / "m.pt")
    loaded = gp.load(spec.build(seed=3), tmp_path / "m.pt", x)
    assert torch.equal(outputs(loaded, x), outputs(final, x))


def test_pruner_chains_records_so_load_replays_every_step(tmp_path: Path) -> None:
    spec = MODELS["mobilenet_v2"]
    model, x = spec.build(), spec.example_inputs()
    final = gp.Pruner(model, gp.Plan(ratio=0.5), x, steps=3, progress=False).run()
    assert len(final._graphprune_record["previous"]) == 2
    gp.save(final, tmp_path / "m.pt")
    loaded = gp.load(spec.build(seed=1), tmp_path / "m.pt", x)
    assert torch.equal(outputs(loaded, x), outputs(final, x))


# -- BatchNorm recalibration on real data -----------------------------------------------------
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean()) * 100


def test_recalibration_restores_accuracy_after_pruning() -> None:
    model, images, labels, test = digits_cnn()
    assert _accuracy(model, images[test], labels[test]) > 95.0
    pruned = gp.compile(model, gp.Plan(ratio=0.5, importance="l1"), (images[:2],))
    stale = _accuracy(pruned, images[test], labels[test])
    bn = pruned[1][1]
    before = bn.running_mean.clone()
    train = [i for i in range(len(images)) if i not in set(test.tolist())]
    batches = [(images[train[i : i + 64]], labels[train[i : i + 64]]) for i in range(0, 1400, 64)]
    used = gp.recalibrate_norms(pruned, batches, inputs=lambda b: b[0])
    assert used == len(batches) and not pruned.training
    assert not torch.allclose(bn.running_mean, before)
    assert bn.momentum == 0.1  # restored
    fresh = _accuracy(pruned, images[test], labels[test])
    assert fresh > stale + 10.0, (stale, fresh)


def test_recalibration_without_batchnorm_says_so() -> None:
    with pytest.raises(gp.InputError, match="no BatchNorm"):
        gp.recalibrate_norms(nn.Linear(2, 2), [torch.randn(1, 2)])


# -- lottery-ticket rewind ----------------------------------------------------------------------
def test_rewind_gives_kept_channels_their_early_values() -> None:
    spec = MODELS["resnet18"]
    early, x = spec.build(seed=0), spec.example_inputs()
    late = spec.build(seed=0)
    with torch.no_grad():  # "training": every parameter moves by exactly +1
        for p in late.parameters():
            p.add_(1.0)
    pruned = gp.Pruner(late, gp.Plan(ratio=0.5), x, steps=2, progress=False).run()
    rewound = gp.rewind(pruned, early, x)
    late_params, early_params = dict(pruned.named_parameters()), dict(rewound.named_parameters())
    assert late_params.keys() == early_params.keys()
    for name, p in late_params.items():  # same positions, early values
        torch.testing.assert_close(p - early_params[name], torch.ones_like(p))
    assert torch.count_nonzero(early.conv1.weight) == early.conv1.weight.numel()  # untouched


def test_rewind_keeps_masks_and_early_values_of_surviving_weights() -> None:
    spec = MODELS["gpt"]
    early, x = spec.build(seed=0), spec.example_inputs()
    late = spec.build(seed=5)
    pruned = gp.compile(late, gp.Plan(granularity="unstructured", ratio=0.8), x)
    for baked in (False, True):
        source = gp.finalize(pruned) if baked else pruned
        rewound = gp.rewind(source, early, x)
        masks = gp.masked_layers(rewound)
        assert sorted(masks) == sorted(gp.report(pruned).sparsity[i].module for i in range(8))
        for name, mask in masks.items():
            w = rewound.get_submodule(name).weight.detach()
            original = early.get_submodule(name).weight.detach()
            assert torch.equal(w[mask], original[mask]) and bool((w[~mask] == 0).all())


# -- group lasso ---------------------------------------------------------------------------------
def test_group_lasso_is_the_sum_of_coupled_channel_norms() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = (torch.randn(1, 3, 8, 8),)
    reg = gp.GroupLasso(model, x, strength=0.5)
    conv, bn, out = model[0], model[1], model[3]
    squares = (
        conv.weight.pow(2).sum((1, 2, 3))
        + conv.bias.pow(2)
        + bn.weight.pow(2)
        + bn.bias.pow(2)
        + out.weight.pow(2).sum((0, 2, 3))
    )  # channel c of the group: conv row c, its bias, BN scale/shift, the next conv's column c
    expected = 0.5 * squares.sqrt().sum()
    torch.testing.assert_close(reg(model), expected)
    reg(model).backward()
    assert conv.weight.grad is not None and out.weight.grad is not None
    assert [n.shape[0] for n in reg.channel_norms(model)] == [4]


def test_group_lasso_training_shrinks_whole_channels() -> None:
    model, images, labels, test = digits_cnn()
    x = (images[:2],)
    reg = gp.GroupLasso(model, x, strength=5e-3)
    before = torch.cat(reg.channel_norms(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for i in range(0, 1400, 64):
        idx = torch.arange(i, i + 64) % len(images)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx]) + reg(model)
        loss.backward()
        opt.step()
    after = torch.cat(reg.channel_norms(model))
    assert float(after.sum()) < float(before.sum())
    assert _accuracy(model, images[test], labels[test]) > 90.0


# -- plots ---------------------------------------------------------------------------------------
def test_plots_are_written(tmp_path: Path) -> None:
    spec = MODELS["resnet18"]
    pruned = gp.compile(spec.build(), gp.Plan(ratio=0.5), spec.example_inputs())
    kept = plot_kept_channels(gp.report(pruned), tmp_path / "kept.png")
    points = [
        ("one-shot @0.3", 1.5, 90.0),
        ("one-shot @0.5", 2.2, 80.0),
        ("fine-tuned @0.5", 2.2, 97.0),
    ]
    curve = plot_accuracy_vs_speedup(points, tmp_path / "acc.png", baseline_accuracy=98.0)
    for path in (kept, curve):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

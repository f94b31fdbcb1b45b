from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.planning.importance import CRITERIA, score_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.b = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


@pytest.fixture
def tiny() -> tuple[Tiny, torch.Tensor, gp.DependencyGraph, gp.Group]:
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(5, 3)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.1, -2.0, 0.5, 1.0]))
    dg = gp.analyze(model, x)
    group = next(g for g in dg.groups if g.size == 4)
    return model, x, dg, group


def _normalised(v: np.ndarray) -> np.ndarray:
    return v / v.mean()


def test_l1_l2_aggregate_every_member(tiny: tuple) -> None:
    model, _, dg, group = tiny
    a, w, b = (
        model.a.weight.detach().double().numpy(),
        model.bn.weight.detach().double().numpy(),
        model.b.weight.detach().double().numpy(),
    )
    l1 = _normalised(np.abs(a).sum(1)) + _normalised(np.abs(w)) + _normalised(np.abs(b).sum(0))
    # bn.bias is zero: it contributes nothing (its mean is 0, so it is not rescaled)
    got = score_groups(model, dg, [group], "l1")[group.id]
    np.testing.assert_allclose(got, l1, rtol=1e-6)
    l2 = _normalised((a**2).sum(1)) + _normalised(w**2) + _normalised((b**2).sum(0))
    np.testing.assert_allclose(score_groups(model, dg, [group], "l2")[group.id], l2, rtol=1e-6)


def test_bn_scale_and_random(tiny: tuple) -> None:
    model, _, dg, group = tiny
    got = score_groups(model, dg, [group], "bn_scale")[group.id]
    np.testing.assert_allclose(got, _normalised(np.array([0.1, 2.0, 0.5, 1.0])), rtol=1e-6)
    r1 = score_groups(model, dg, [group], "random", seed=3)[group.id]
    r2 = score_groups(model, dg, [group], "random", seed=3)[group.id]
    assert np.array_equal(r1, r2)
    assert not np.array_equal(r1, score_groups(model, dg, [group], "random", seed=4)[group.id])


def test_taylor_and_fisher_match_autograd(tiny: tuple) -> None:
    model, x, dg, group = tiny
    before = copy.deepcopy(model.state_dict())
    batches = [x[:2], x[2:]]
    grads = []
    for batch in batches:
        model.zero_grad()
        model(batch).pow(2).mean().backward()
        grads.append(model.a.weight.grad.detach().clone().double())
    model.zero_grad()
    a = model.a.weight.detach().double()
    taylor_a = sum((a * g).abs().sum(1) for g in grads).numpy()
    fisher_a = (0.5 * (a**2 * sum(g**2 for g in grads) / 2).sum(1)).numpy()

    def only_a(criterion: str) -> np.ndarray:
        sub = gp.Group(group.id, group.size, [m for m in group.members if m.fqn == "a.weight"])
        return score_groups(model, dg, [sub], criterion, batches=batches)[group.id]

    np.testing.assert_allclose(only_a("taylor"), _normalised(taylor_a), rtol=1e-5)
    np.testing.assert_allclose(only_a("fisher"), _normalised(fisher_a), rtol=1e-5)
    for k, v in model.state_dict().items():  # scoring never mutates the model
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_fpgm_ranks_the_median_channel_lowest() -> None:
    model, x = Tiny().eval(), torch.randn(5, 3)
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.4, 0.4, 0], [0, 0, 1]]))
    dg = gp.analyze(model, x)
    group = next(g for g in dg.groups if g.size == 4)
    sub = gp.Group(group.id, group.size, [m for m in group.members if m.fqn == "a.weight"])
    scores = score_groups(model, dg, [sub], "fpgm")[group.id]
    assert int(np.argmin(scores)) == 2


def test_custom_callable_and_shape_check(tiny: tuple) -> None:
    model, _, dg, group = tiny
    got = score_groups(model, dg, [group], lambda g, t, d: np.arange(g.size))[group.id]
    assert got.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="returned shape"):
        score_groups(model, dg, [group], lambda g, t, d: np.zeros(2))


def test_every_named_criterion_runs(tiny: tuple) -> None:
    model, x, dg, group = tiny
    for name in CRITERIA:
        scores = score_groups(model, dg, [group], name, batches=[x])[group.id]
        assert scores.shape == (4,) and np.all(np.isfinite(scores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_sums_are_per_channel_sums_of_powers(dtype: torch.dtype) -> None:
    """l1/l2 and wanda's magnitudes in one torch reduction equal the per-channel sums of
    |w|^p over every other dim (conv weight: either dim; a vector: its entries): in float64
    for float32 weights, in float32 for 16-bit ones (their own rounding is 1e-3 and more), with
    the same ranking as float64 sums."""
    from graphprune.planning.importance import power_sums

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3).to(dtype)
    ref = w.double().numpy() if dtype == torch.float32 else w.float().double().numpy()
    rtol = 1e-12 if dtype == torch.float32 else 1e-6
    for dim in (0, 1):
        rows = np.moveaxis(np.abs(ref), dim, 0).reshape(ref.shape[dim], -1)
        for p in (1, 2):
            found, exact = power_sums(w, dim, p), (rows**p).sum(1)
            np.testing.assert_allclose(found, exact, rtol=rtol)
            assert list(np.argsort(found, kind="stable")) == list(np.argsort(exact, kind="stable"))
    vector = torch.randn(5).to(dtype)
    np.testing.assert_allclose(power_sums(vector, 0, 2), vector.double().numpy() ** 2, rtol=1e-12)

"""Pruning provably dead channels must not change the output (the equivalence oracle)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.compile import RECORD
from graphprune.models import MODELS
from graphprune.resolve import Resolution
from tests.equivalence import choose_dead, dead_first, make_dead, masked_reference, outputs

TRANSFORMERS = ["vit", "gpt", "llama"]


def _check(name: str, kinds: set[str], granularity: str, seed: int = 0) -> gp.CompileReport:
    spec = MODELS[name]
    model, x = spec.build(seed), spec.example_inputs()
    dg = gp.analyze(model, x)
    dead = choose_dead(dg, kinds, 0.5, np.random.default_rng(seed))
    assert dead, f"{name} has no prunable {kinds} group"
    make_dead(model, dg, dead)
    pruned = gp.compile(
        model, gp.Plan(ratio=0.5, importance=dead_first(dead), granularity=granularity), x
    )
    kept = Resolution.from_dict(getattr(pruned, RECORD)["resolution"]).kept
    for gid, channels in dead.items():  # every dead channel is gone unless a part needed one
        assert len(set(channels) & set(kept[gid])) <= 1 + len(channels) // 4
    reference = copy.deepcopy(model)
    masked_reference(reference, dg, kept)
    expected = outputs(reference, x)
    assert expected.std() > 1e-3  # the oracle is not trivial: live channels still carry signal
    torch.testing.assert_close(outputs(pruned, x), expected, atol=1e-5, rtol=1e-4)
    report = gp.report(pruned)
    assert report.params_after < report.params_before
    return report


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dead_channels(name: str) -> None:
    report = _check(name, {"channels"}, "channels")
    assert report.macs_after < report.macs_before


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_dead_heads(name: str) -> None:
    _check(name, {"heads", "kv_heads"}, "heads", seed=1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_all_is_a_no_op(name: str) -> None:
    spec = MODELS[name]
    model, x = spec.build(), spec.example_inputs()
    pruned = gp.compile(model, gp.Plan(ratio=0.0), x)
    assert type(pruned) is type(model) and pruned is not model
    before, after = model.state_dict(), pruned.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(outputs(pruned, x), outputs(model, x))
    assert gp.report(pruned).changes == []

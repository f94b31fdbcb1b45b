"""Pruning provably dead channels must not change the output (the equivalence oracle)."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.models import MODELS
from tests.equivalence import check_dead_channels, outputs

TRANSFORMERS = ["vit", "gpt", "llama"]


def _check(name: str, kinds: set[str], granularity: str, seed: int = 0) -> gp.CompileReport:
    spec = MODELS[name]
    return check_dead_channels(spec.build(seed), spec.example_inputs(), kinds, granularity, seed)


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

"""Property: for any pair of nesting shapes, pruning commutes with reshape.

A parameter ``p`` of ``in_shape`` is reshaped to ``out_shape`` and multiplied by ``q``. For
random kept channels of every group, the kept sub-tensor of ``p`` reshaped to the kept shape
of ``q`` must be exactly the kept sub-tensor of ``p.reshape(out_shape)``: the rewritten
model's reshape then reads the right elements.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import graphprune as gp


class ReshapeMul(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.p = nn.Parameter(torch.zeros(in_shape))
        self.q = nn.Parameter(torch.zeros(out_shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.p.reshape(self.out_shape) * self.q + x


@st.composite
def nesting_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    factors = draw(st.lists(st.sampled_from([2, 3, 4]), min_size=1, max_size=5))

    def partition() -> tuple[int, ...]:
        cuts = sorted(
            draw(st.sets(st.integers(1, len(factors) - 1), max_size=len(factors) - 1))
            if len(factors) > 1
            else set()
        )
        bounds = [0, *cuts, len(factors)]
        shape = [math.prod(factors[a:b]) for a, b in itertools.pairwise(bounds)]
        if draw(st.booleans()):
            shape.insert(draw(st.integers(0, len(shape))), 1)
        return tuple(shape)

    return partition(), partition()


@settings(max_examples=60, deadline=None)
@given(shapes=nesting_shapes(), seed=st.integers(0, 2**16))
def test_pruning_commutes_with_reshape(
    shapes: tuple[tuple[int, ...], tuple[int, ...]], seed: int
) -> None:
    in_shape, out_shape = shapes
    dg = gp.analyze(ReshapeMul(in_shape, out_shape), torch.zeros(out_shape))
    rng = np.random.default_rng(seed)
    kept = {
        g.id: sorted(rng.choice(g.size, size=rng.integers(1, g.size + 1), replace=False))
        for g in dg.groups
    }
    kept_p = [dg.kept_positions("p", d, kept) for d in range(len(in_shape))]
    kept_q = [dg.kept_positions("q", d, kept) for d in range(len(out_shape))]
    values = np.arange(math.prod(in_shape)).reshape(in_shape)
    sub_in = values[np.ix_(*kept_p)]
    sub_out = values.reshape(out_shape)[np.ix_(*kept_q)]
    assert sub_in.size == sub_out.size
    np.testing.assert_array_equal(sub_in.reshape(sub_out.shape), sub_out)

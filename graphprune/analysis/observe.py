"""One observed forward: what compile's check of the original and the verification of each
rewrite both need from running the model once (eval mode, no grad) -- its output, its MACs
and the ints every torch call received (:func:`graphprune.analysis.provenance.recorded_calls`,
which the verification compares with the shape constants the kept channels need)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from graphprune.analysis.macs import forward_counting_macs
from graphprune.analysis.provenance import CallKey, IntUse, as_uses, recorded_calls
from graphprune.capture import ExampleInputs


@dataclass
class Observed:
    output: Any
    macs: int
    calls: dict[CallKey, tuple[int, ...]]  # in call order

    def uses(self) -> list[IntUse]:
        return as_uses(self.calls)


def observe(model: nn.Module, example_inputs: ExampleInputs) -> Observed:
    """Run ``model`` once on ``example_inputs``, counting MACs and recording int arguments."""
    with recorded_calls(model) as calls:
        output, macs = forward_counting_macs(model, example_inputs)
    return Observed(output, macs, calls)


def observe_fake(model: nn.Module, example_inputs: ExampleInputs) -> Observed:
    """:func:`observe` for a model on the meta device: under fake tensors, so the forward runs
    on shapes alone (code that branches on values sees a tracing tensor, as under export;
    Hugging Face's mask helpers then skip their data-dependent checks)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return observe(model, example_inputs)

"""The dependency analyzer: channel rules per aten op, union-find into groups."""

from __future__ import annotations

import time

from torch import nn

from graphprune.analysis.graph import DependencyGraph, Group, Member, build
from graphprune.analysis.registry import rule
from graphprune.analysis.walk import walk
from graphprune.capture import Captured, ExampleInputs, capture, serialized


def analyze_captured(captured: Captured) -> DependencyGraph:
    """Group the channels of an already captured program."""
    start = time.perf_counter()
    walked = walk(captured)
    dg = build(captured, walked)
    dg.seconds = time.perf_counter() - start
    return dg


@serialized
def analyze(model: nn.Module, example_inputs: ExampleInputs) -> DependencyGraph:
    """Capture ``model`` on ``example_inputs`` and group its coupled channels."""
    return analyze_captured(capture(model, example_inputs))


__all__ = ["DependencyGraph", "Group", "Member", "analyze", "analyze_captured", "rule"]

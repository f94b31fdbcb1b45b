"""graphprune: a graph-rewriting compiler for neural-network pruning."""

from __future__ import annotations

from graphprune.analysis import DependencyGraph, Group, Member, analyze
from graphprune.capture import capture
from graphprune.errors import AnalysisError, CaptureError, GraphPruneError, InputError

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "CaptureError",
    "DependencyGraph",
    "GraphPruneError",
    "Group",
    "InputError",
    "Member",
    "__version__",
    "analyze",
    "capture",
]

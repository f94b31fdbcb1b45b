from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.models import MODELS


@pytest.fixture(scope="session")
def zoo_graphs() -> dict[str, gp.DependencyGraph]:
    """Each zoo model analysed once per test session."""
    torch.manual_seed(0)
    return {name: gp.analyze(spec.build(), spec.example_inputs()) for name, spec in MODELS.items()}

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import graphprune as gp
from graphprune.models import MODELS
from tests.real_models import declare_torchvision_ops

declare_torchvision_ops()  # before anything imports torchvision (transformers does)

# CI replays a fixed sequence of examples (a red build must be reproducible); locally every
# run draws new ones, which is how the property tests keep finding new cases
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def zoo_graphs() -> dict[str, gp.DependencyGraph]:
    """Each zoo model analysed once per test session."""
    torch.manual_seed(0)
    return {name: gp.analyze(spec.build(), spec.example_inputs()) for name, spec in MODELS.items()}

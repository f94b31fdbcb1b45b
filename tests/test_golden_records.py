"""Files saved by earlier releases load and replay exactly.

``tests/golden/`` holds one ``gp.save`` file per record format, written by the release that
wrote that format (format 1: before pruning units; format 2: with per-unit outcomes and
attribute values), and the outputs the pruned model gave on a probe input when it was saved.
They are never regenerated: a change that cannot load them breaks users' files.

The restored weights are bit-exact (the seeded build and the recorded kept indices), but the
probe outputs were computed on the CPU that wrote the files: convolution kernels differ in
float rounding between instruction sets (a Xeon without the writer's kernels differs by 7e-9
on ResNet-18's outputs of ~0.08), so outputs are compared to 1e-5 of their scale -- a single
wrong channel moves them by orders of magnitude more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graphprune as gp
from graphprune.models import MODELS

GOLDEN = Path(__file__).parent / "golden"
FILES = sorted(p.name.removesuffix(".pt") for p in GOLDEN.glob("*.pt") if ".expected" not in p.name)


def test_one_golden_file_per_format() -> None:
    formats = {
        json.loads(torch.load(GOLDEN / f"{name}.pt", weights_only=True)["graphprune"])["format"]
        for name in FILES
    }
    assert formats == {1, 2}


@pytest.mark.parametrize("name", FILES)
def test_golden_file_loads_and_replays_exactly(name: str) -> None:
    model_name = name.split("_")[1]
    spec = MODELS[model_name]
    expected = torch.load(GOLDEN / f"{name}.expected.pt", weights_only=True)
    restored = gp.load(spec.build(), GOLDEN / f"{name}.pt", spec.example_inputs())
    restored.eval()
    with torch.no_grad():
        output = restored(*expected["input"])
    scale = expected["output"].abs().max().item()
    torch.testing.assert_close(output, expected["output"], rtol=0, atol=1e-5 * scale)

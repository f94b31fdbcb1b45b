from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graphprune as gp
from graphprune.models import MODELS
from tests.equivalence import outputs

CASES = [(name, "channels") for name in sorted(MODELS)] + [
    ("vit", "heads"),
    ("gpt", "heads"),
    ("llama", "heads"),
    ("gpt", "layers"),
    ("vit", "layers"),
]


@pytest.mark.parametrize(("name", "granularity"), CASES)
def test_round_trip(name: str, granularity: str, tmp_path: Path) -> None:
    spec = MODELS[name]
    x = spec.example_inputs()
    pruned = gp.compile(spec.build(seed=0), gp.Plan(ratio=0.5, granularity=granularity), x)
    path = tmp_path / "pruned.pt"
    gp.save(pruned, path)
    fresh = spec.build(seed=1)  # different random weights: everything must come from the file
    loaded = gp.load(fresh, path, x)
    assert loaded is fresh and type(loaded) is type(pruned)
    assert torch.equal(outputs(loaded, x), outputs(pruned, x))
    assert repr(loaded) == repr(pruned)
    gp.save(loaded, tmp_path / "again.pt")  # a loaded model saves again


def test_file_holds_no_pickled_code(tmp_path: Path) -> None:
    spec = MODELS["resnet18"]
    pruned = gp.compile(spec.build(), gp.Plan(ratio=0.5), spec.example_inputs())
    gp.save(pruned, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(payload) == {"graphprune", "state_dict"}


def test_errors(tmp_path: Path) -> None:
    spec = MODELS["resnet18"]
    with pytest.raises(gp.InputError, match=r"not produced by graphprune\.compile"):
        gp.save(spec.build(), tmp_path / "m.pt")
    pruned = gp.compile(spec.build(), gp.Plan(ratio=0.5), spec.example_inputs())
    gp.save(pruned, tmp_path / "m.pt")
    other = MODELS["vgg"]
    with pytest.raises(gp.InputError, match="not the architecture that was pruned"):
        gp.load(other.build(), tmp_path / "m.pt", other.example_inputs())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files

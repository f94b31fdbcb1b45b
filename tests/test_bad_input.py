"""Bad input gets one clear graphprune error (what, where, what to do), never a raw traceback,
and the user's model is left as it was."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.checks import GraphPruneWarning
from graphprune.models import MODELS


def test_inputs_of_the_wrong_shape_name_the_shapes_and_the_failing_line() -> None:
    spec = MODELS["resnet18"]
    with pytest.raises(gp.InputError) as info:
        gp.compile(spec.build(), gp.Plan(ratio=0.5), torch.randn(2, 4, 32, 32))
    message = str(info.value)
    assert "does not run on the example inputs" in message
    assert "tensor(2, 4, 32, 32)" in message and "hint:" in message
    assert "models/cnn.py" in message  # the user's line that failed


def test_a_model_on_the_meta_device_says_what_is_supported() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(gp.InputError, match=r"meta device .*to_empty"):
        gp.compile(model, gp.Plan(ratio=0.5), torch.randn(2, 4))


def test_nan_weights_warn_that_scores_are_nan() -> None:
    spec = MODELS["vgg"]
    model = spec.build()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.warns(GraphPruneWarning, match=r"NaN or inf \(e\.g\. features\.0\.weight\)"):
        gp.compile(model, gp.Plan(ratio=0.5), spec.example_inputs())


def test_clean_weights_do_not_warn() -> None:
    spec = MODELS["vgg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphPruneWarning)
        gp.compile(spec.build(), gp.Plan(ratio=0.5), spec.example_inputs())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a checkpoint at all", "not a readable graphprune file"),
        (None, "not a file written by graphprune.save"),  # a plain state_dict
    ],
)
def test_load_of_a_corrupt_or_foreign_file(
    content: bytes | None, expected: str, tmp_path: Path
) -> None:
    spec = MODELS["resnet18"]
    path = tmp_path / "model.pt"
    if content is None:
        torch.save(spec.build().state_dict(), path)
    else:
        path.write_bytes(content)
    model = spec.build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(gp.InputError, match=expected):
        gp.load(model, path, spec.example_inputs())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_of_a_truncated_file(tmp_path: Path) -> None:
    spec = MODELS["resnet18"]
    x = spec.example_inputs()
    path = tmp_path / "pruned.pt"
    gp.save(gp.compile(spec.build(), gp.Plan(ratio=0.5), x), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(gp.InputError, match="truncated"):
        gp.load(spec.build(), path, x)
    with pytest.raises(gp.InputError, match="no such file"):
        gp.load(spec.build(), tmp_path / "missing.pt", x)


class _Block(nn.Module):
    """A residual block whose first argument is not the stream it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc(h) * scale.mean()


class _SideInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(self.scale, x)
        return x


def test_layers_plan_with_no_block_a_skip_can_replace_says_so() -> None:
    with pytest.raises(gp.PlanError, match="none can be replaced by a skip"):
        gp.compile(_SideInput(), gp.Plan(ratio=0.5, granularity="layers"), torch.randn(2, 8))

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import graphprune as gp
from graphprune.capture import capture, owning_module


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


def test_capture_error_names_the_source_line_and_hints() -> None:
    with pytest.raises(gp.CaptureError) as info:
        gp.analyze(Branchy(), torch.randn(2, 4))
    err = info.value
    assert err.source_line is not None
    assert "test_capture.py" in err.source_line and "if x.sum() > 0" in err.source_line
    assert "tensor *values*" in err.hint or "torch.cond" in err.hint
    assert "could not capture the model" in str(err)


def test_capture_error_for_wrong_inputs() -> None:
    with pytest.raises(gp.CaptureError) as info:
        gp.analyze(nn.Linear(4, 3), torch.randn(2, 5))
    assert "example inputs" in info.value.hint


def test_bad_example_inputs_type() -> None:
    with pytest.raises(gp.InputError, match="example_inputs must be"):
        gp.analyze(nn.Linear(4, 3), "not a tensor")  # type: ignore[arg-type]


class Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.fc(self.emb(input_ids) * mask[..., None])


def test_dict_inputs_and_tuple_inputs() -> None:
    inputs = {"input_ids": torch.randint(0, 10, (2, 3)), "mask": torch.ones(2, 3)}
    dg = gp.analyze(Keyword(), inputs)
    assert [g.compact() for g in dg.groups] == [
        "10 frozen: emb[0]",
        "8 prunable: emb[1] fc[1]",
        "2 frozen: fc[0]",
    ]
    dg2 = gp.analyze(Keyword(), (inputs["input_ids"], inputs["mask"]))
    assert [g.compact() for g in dg2.groups] == [g.compact() for g in dg.groups]


def test_capture_does_not_mutate_the_model() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    before = copy.deepcopy(model.state_dict())
    captured = capture(model, torch.randn(3, 4))
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert captured.state_fqn["p_0_weight"] == "0.weight"
    assert captured.parameters >= {"0.weight", "1.bias"}
    nodes = {n.name: owning_module(n) for n in captured.graph.nodes}
    assert nodes["linear"] == "0" and nodes["batch_norm"] == "1"

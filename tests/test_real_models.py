"""A sample of real architectures (timm, torchvision; random init, small inputs) that exercise
the count relations: each compiles at ratio 0.5, keeps its output shape, prunes, and the
pruned model matches a dead-channel reference or verifies in onnxruntime. The full sweep over
every torchvision classifier and timm family is ``benchmarks/coverage.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import graphprune as gp
from tests.equivalence import outputs

# (source, name, kwargs, input side): one model per class of shape arithmetic
SAMPLE = [
    ("timm", "convit_tiny", {"img_size": 64}, 64),  # C // num_heads from x.shape
    ("timm", "pvt_v2_b0", {}, 64),  # reshape(B, N, C), spatial-reduction attention
    ("timm", "inception_next_atto", {}, 64),  # torch.split(x, self.split_indexes)
    ("timm", "fasternet_t0", {}, 64),  # split(x, [self.dim_conv3, self.dim_untouched])
    ("timm", "cspresnet50", {}, 64),  # x.split(self.expand_chs // 2)
    ("timm", "rexnet_100", {}, 64),  # x[:, 0:self.in_channels]
    ("timm", "poolformer_s12", {}, 64),  # self.scale.view(self.shape)
    ("torchvision", "swin_v2_t", {}, 64),  # numel() // 3, relative position index
]


def build(source: str, name: str, kwargs: dict[str, object]) -> nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, **kwargs).eval()
    import torchvision

    return torchvision.models.get_model(name, **kwargs).eval()


@pytest.mark.parametrize(("source", "name", "kwargs", "side"), SAMPLE, ids=[s[1] for s in SAMPLE])
def test_real_model_compiles_prunes_and_runs(
    source: str, name: str, kwargs: dict[str, object], side: int
) -> None:
    model = build(source, name, kwargs)
    x = (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)),)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)
    report = gp.report(pruned)
    assert outputs(pruned, x).shape == outputs(model, x).shape
    assert report.macs_ratio < 0.7, report.table()
    assert not report.frozen, [f.reason for f in report.frozen]


@pytest.mark.parametrize("name", ["convit_tiny", "fasternet_t0"])
def test_real_model_verifies_in_onnxruntime(name: str, tmp_path: Path) -> None:
    source, _, kwargs, side = next(s for s in SAMPLE if s[1] == name)
    model = build(source, name, kwargs)
    x = (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)),)
    pruned = gp.compile(model, gp.Plan(ratio=0.5), x)
    exported = gp.export_onnx(pruned, x, tmp_path / "m.onnx", verify=True)
    assert exported.verification is not None and exported.verification.ok

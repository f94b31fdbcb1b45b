"""Seconds spent capturing (torch.export) and analysing each zoo model, measured in one run.

.venv/bin/python benchmarks/compile_time.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from graphprune.models import MODELS
from graphprune.models.cnn import Bottleneck, ResNet
from graphprune.models.transformers import ViT
from torch import nn

from graphprune.analysis import analyze_captured
from graphprune.capture import capture


def full_size() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """Real-size networks, to show analysis time at scale (not part of the zoo)."""
    image = (torch.randn(1, 3, 224, 224),)
    return {
        "resnet50@224": (ResNet(Bottleneck, [3, 4, 6, 3], (64, 128, 256, 512), 1000), image),
        "vit_s16@224": (ViT(224, 16, 384, 12, 6, 1000), image),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (median shown)")
    args = parser.parse_args()
    print(
        f"{'model':<18} {'params':>11} {'nodes':>6} {'groups':>7} "
        f"{'capture s':>10} {'analyze s':>10}"
    )
    cases = {name: (spec.build(), spec.example_inputs()) for name, spec in MODELS.items()}
    cases.update(full_size())
    for name, (model, inputs) in cases.items():
        model.eval()
        cap_times, ana_times = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            captured = capture(model, inputs)
            t1 = time.perf_counter()
            dg = analyze_captured(captured)
            t2 = time.perf_counter()
            cap_times.append(t1 - t0)
            ana_times.append(t2 - t1)
        params = sum(p.numel() for p in model.parameters())
        nodes = len(captured.graph.nodes)
        print(
            f"{name:<18} {params:>11,} {nodes:>6} {len(dg.groups):>7} "
            f"{statistics.median(cap_times):>10.3f} {statistics.median(ana_times):>10.3f}"
        )


if __name__ == "__main__":
    main()

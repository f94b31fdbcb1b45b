"""Seconds spent capturing (torch.export), analysing and pruning (graphprune.compile at 0.5)
each zoo model and two real-size networks, measured in one run (median of --repeat).

    .venv/bin/python benchmarks/compile_time.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import graphprune as gp
from graphprune.analysis import analyze_captured
from graphprune.capture import capture
from graphprune.models import MODELS
from graphprune.models.cnn import Bottleneck, ResNet
from graphprune.models.transformers import ViT


def full_size() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """Real-size networks, to show the cost at scale (not part of the zoo)."""
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
        f"{'model':<18} {'params':>11} {'nodes':>6} {'groups':>7} {'capture s':>10} "
        f"{'analyze s':>10} {'compile s':>10}  (compile = whole ratio-0.5 prune, verified)"
    )
    cases = {name: (spec.build(), spec.example_inputs()) for name, spec in MODELS.items()}
    cases.update(full_size())
    for name, (model, inputs) in cases.items():
        model.eval()
        cap, ana, comp = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            captured = capture(model, inputs)
            t1 = time.perf_counter()
            dg = analyze_captured(captured)
            t2 = time.perf_counter()
            gp.compile(model, gp.Plan(ratio=0.5), inputs)
            t3 = time.perf_counter()
            cap.append(t1 - t0)
            ana.append(t2 - t1)
            comp.append(t3 - t2)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:<18} {params:>11,} {len(captured.graph.nodes):>6} {len(dg.groups):>7} "
            f"{statistics.median(cap):>10.3f} {statistics.median(ana):>10.3f} "
            f"{statistics.median(comp):>10.3f}"
        )


if __name__ == "__main__":
    main()

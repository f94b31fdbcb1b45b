"""Latency plan vs uniform ratio at matched latency, several fine-tuning seeds (digits CNN).

The digits CNN of ``benchmarks/accuracy.py`` (trained, batch 32): ``Plan(target_latency=t)``
against a uniform ``ratio`` plan with ``round_to=1`` (exact counts, so its latency can be
bisected close to the latency plan's measured one), both ``importance="taylor"`` on 8
labelled batches; each fine-tuned (BatchNorm recalibration + 3 epochs) with seeds 1, 2, 3.

    .venv/bin/python benchmarks/latency_seeds.py [--targets 0.5,0.35]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

import graphprune as gp
from graphprune.models.cnn import BasicBlock, ResNet
from graphprune.stages.latency import measure_ratio

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import accuracy, batches, digits, recalibrate, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.35")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    data = digits()
    torch.manual_seed(0)
    cnn = ResNet(BasicBlock, [2, 2, 2, 2], widths=(32, 64, 128, 256))
    cnn = train(cnn, data, 20, 2e-3, seed=0)
    x = data[0][:32]
    calib = [gp.LabelledBatch(a, b) for a, b in batches(data[0], data[1], 64, seed=99)[:8]]
    kw = {"calibration": calib, "loss_fn": F.cross_entropy}
    for target in (float(t) for t in args.targets.split(",")):
        plan = gp.Plan(target_latency=target, importance="taylor")
        latency_plan = gp.compile(cnn, plan, x, **kw)
        measured, _ = measure_ratio(cnn, latency_plan, x, 2)
        lo, hi = 0.0, 0.95
        best: tuple[float, torch.nn.Module, float, float] | None = None
        for _ in range(7):  # bisect the uniform ratio to the same measured latency
            ratio = (lo + hi) / 2
            uniform_plan = gp.Plan(ratio=ratio, importance="taylor", round_to=1)
            uniform = gp.compile(cnn, uniform_plan, x, **kw)
            got, _ = measure_ratio(cnn, uniform, x, 2)
            if best is None or abs(got - measured) < best[0]:
                best = (abs(got - measured), uniform, ratio, got)
            lo, hi = (ratio, hi) if got > measured else (lo, ratio)
        assert best is not None
        _, uniform, ratio, got = best
        results = {}
        for label, model in (("latency plan", latency_plan), ("uniform", uniform)):
            results[label] = [
                accuracy(train(recalibrate(copy.deepcopy(model), data), data, 3, 1e-3, seed), data)
                for seed in (1, 2, 3)
            ]
        lat, uni = results["latency plan"], results["uniform"]
        print(
            f"target {target}: latency plan measured {measured:.3f}, accuracy "
            f"{' / '.join(f'{a:.2f}' for a in lat)} (mean {statistics.mean(lat):.2f}); uniform "
            f"ratio {ratio:.3f} (round_to=1) measured {got:.3f}, accuracy "
            f"{' / '.join(f'{a:.2f}' for a in uni)} (mean {statistics.mean(uni):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()

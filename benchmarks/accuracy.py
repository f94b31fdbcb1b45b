"""Accuracy vs measured speed on real data: prune, fine-tune, iterate -- scikit-learn's digits.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 handwritten digits, bundled, no download),
upsampled to 16x16, grey replicated to 3 channels, fixed stratified split (1347 train / 450
test, random_state=0), fixed seeds. Models: a ResNet-18-layout CNN (zoo ``ResNet``/``BasicBlock``,
widths 32-256) and a ViT (zoo ``ViT``, 16x16 images, 4x4 patches, dim 128, depth 4). Each is
trained dense (Adam, cosine LR), then for channel ratios 0.3 / 0.5 / 0.7 (taylor importance
on 8 labelled calibration batches, round_to="auto"):

Dense training: 20 (CNN) / 60 (ViT) epochs; a control line reports the dense model after the
fine-tuning epochs too, so gains of the pruned models are not just extra training.

* one-shot: prune, no training (CNN: also after BatchNorm recalibration, 20 batches);
* fine-tuned: one-shot + BN recalibration + ``--finetune`` epochs;
* iterative: ``graphprune.Pruner``, 3 cubic steps, recalibration + ``--finetune``/3 epochs each;

next to the onnxruntime speed-up of the pruned model over the dense one (fp32, 2 threads,
interleaved runs, batch 1 and 32, verified against torch). Then unstructured 50/80/90 % and
2:4 (magnitude masks, fine-tuned with the masks on): their ONNX file shrinks, their
onnxruntime speed does not (the table says so). Writes ``accuracy.png`` (accuracy vs measured
speed-up) and ``kept_channels.png`` into ``--out``.

    .venv/bin/python benchmarks/accuracy.py [--finetune 6] [--out out/accuracy]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import graphprune as gp
from graphprune.finetune.plots import plot_accuracy_vs_speedup, plot_kept_channels
from graphprune.io import write_text_atomic
from graphprune.models.cnn import BasicBlock, ResNet
from graphprune.models.transformers import ViT

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
RATIOS = (0.3, 0.5, 0.7)
EPOCHS = {"resnet": 20, "vit": 60}  # dense training, to convergence (see the control line)


def digits() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
    images = ((images - 0.3) / 0.4).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 16, 16)
    labels = torch.tensor(d.target)
    train, test = train_test_split(
        range(len(labels)), test_size=0.25, random_state=0, stratify=d.target
    )
    return images[train], labels[train], images[test], labels[test]


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> list[tuple[Any, Any]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]


def train(model: nn.Module, data: Data, epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam with a cosine learning rate; masks (parametrize) stay applied throughout."""
    if epochs <= 0:
        return model
    x, y = data[0], data[1]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in gp.progress.track(range(epochs), "training", True):
        for bx, by in batches(x, y, 64, seed * 1000 + epoch):
            opt.zero_grad()
            F.cross_entropy(model(bx), by).backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module, data: Data) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data[2]).argmax(1) == data[3]).float().mean()) * 100


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def recalibrate(model: nn.Module, data: Data) -> nn.Module:
    if has_bn(model):
        gp.recalibrate_norms(model, batches(data[0], data[1], 64, 7), inputs=lambda b: b[0])
    return model


def speed(
    model: nn.Module, dense: nn.Module, x: torch.Tensor, runs: int, sparse: bool = False
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = gp.export_onnx(
            model,
            (x[:1],),
            Path(tmp) / "m.onnx",
            baseline=dense,
            bench_runs=runs,
            batch_sizes=(1, 32),
            sparse_storage="auto" if sparse else None,
        )
    assert report.latency is not None and report.verification is not None
    return {
        "speedup": {r.batch: r.speedup for r in report.latency.results},
        "macs_ratio": report.macs / report.baseline_macs,
        "mb": report.exported.bytes / 1e6,
        "dense_mb": report.latency.baseline_bytes / 1e6,
        "max_abs_error": report.verification.max_abs,
    }


def run_model(
    name: str, build: Callable[[], nn.Module], data: Data, args: argparse.Namespace, out: Path
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    x_example = (data[0][:2],)
    start = time.perf_counter()
    epochs = args.epochs or EPOCHS[name]
    dense = train(build(), data, epochs, 2e-3, seed=0)
    base = accuracy(dense, data)
    # control: do the fine-tuning epochs alone move the dense model? (converged: no)
    control = accuracy(train(copy.deepcopy(dense), data, args.finetune, 1e-3, seed=1), data)
    print(
        f"\n{name}: dense {base:.2f} % test accuracy after {epochs} epochs "
        f"({time.perf_counter() - start:.0f} s); dense + {args.finetune} fine-tuning epochs: "
        f"{control:.2f} %"
    )
    calib = batches(data[0], data[1], 64, seed=99)
    rows: list[dict[str, Any]] = [
        {"model": name, "plan": "dense", "accuracy": base, "epochs": epochs, "control": control}
    ]
    head = (
        f"{'plan':<18} {'MACs':>5} {'one-shot':>8} {'+BN':>6} {'tuned':>6} {'iter.':>6} "
        f"{'Δ tuned':>7} {'ORT b1':>7} {'ORT b32':>7}  MB"
    )
    print(head)
    for ratio in RATIOS:
        plan = gp.Plan(ratio=ratio, importance="taylor", round_to="auto")
        loss = F.cross_entropy
        one = gp.Pruner(
            dense, plan, x_example, calibration=calib, loss_fn=loss, progress=False
        ).run()
        one_shot = accuracy(one, data)
        recal = accuracy(recalibrate(one, data), data) if has_bn(one) else float("nan")
        tuned = train(copy.deepcopy(one), data, args.finetune, 1e-3, seed=1)
        tuned_acc = accuracy(tuned, data)

        def step_tune(m: nn.Module, step: int) -> dict[str, float]:
            train(recalibrate(m, data), data, max(1, args.finetune // 3), 1e-3, seed=10 + step)
            return {"accuracy": accuracy(m, data)}

        iterative = gp.Pruner(
            dense, plan, x_example, steps=3, calibration=calib, loss_fn=loss, progress=False
        ).run(step_tune)
        iter_acc = accuracy(iterative, data)
        measured = speed(tuned, dense, data[0], args.runs)
        if ratio == 0.5:
            plot_kept_channels(gp.report(one), out / f"kept_channels_{name}.png")
        row = {
            "model": name,
            "plan": f"channels {ratio:.0%}",
            "one_shot": one_shot,
            "one_shot_bn": recal,
            "fine_tuned": tuned_acc,
            "iterative": iter_acc,
            "accuracy": tuned_acc,
            "loss_points": base - tuned_acc,
            **measured,
        }
        rows.append(row)
        print(
            f"{row['plan']:<18} {measured['macs_ratio']:>5.2f} {one_shot:>8.2f} {recal:>6.2f} "
            f"{tuned_acc:>6.2f} {iter_acc:>6.2f} {tuned_acc - base:>+7.2f} "
            f"{measured['speedup'][1]:>6.2f}x {measured['speedup'][32]:>6.2f}x "
            f"{measured['mb']:.2f}",
            flush=True,
        )
    sparse_plans = [
        (f"unstructured {s:.0%}", gp.Plan(granularity="unstructured", ratio=s))
        for s in (0.5, 0.8, 0.9)
    ] + [("2:4", gp.Plan(granularity="n:m", nm=[2, 4]))]
    for label, plan in sparse_plans:
        masked = gp.compile(dense, plan, x_example)
        one_shot = accuracy(masked, data)
        tuned = gp.finalize(train(masked, data, args.finetune, 1e-3, seed=2))
        tuned_acc = accuracy(tuned, data)
        measured = speed(tuned, dense, data[0], args.runs, sparse=True)
        row = {
            "model": name,
            "plan": label,
            "one_shot": one_shot,
            "fine_tuned": tuned_acc,
            "accuracy": tuned_acc,
            "loss_points": base - tuned_acc,
            **measured,
        }
        rows.append(row)
        nan = float("nan")
        print(
            f"{label:<18} {measured['macs_ratio']:>5.2f} {one_shot:>8.2f} {nan:>6.2f} "
            f"{tuned_acc:>6.2f} {nan:>6.2f} {tuned_acc - base:>+7.2f} "
            f"{measured['speedup'][1]:>6.2f}x {measured['speedup'][32]:>6.2f}x "
            f"{measured['mb']:.2f} (dense {measured['dense_mb']:.2f}: storage, not speed)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="dense training epochs (default per model)")
    parser.add_argument("--finetune", type=int, default=6, help="fine-tuning epochs")
    parser.add_argument("--runs", type=int, default=30, help="interleaved onnxruntime runs")
    parser.add_argument("--models", default="resnet,vit")
    parser.add_argument("--out", default="out/accuracy", help="plots and results.json go here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = digits()
    print(
        f"digits: {len(data[1])} train / {len(data[3])} test, 16x16; "
        f"{args.finetune} fine-tuning epochs; accuracy in % on the "
        "test split; ORT = measured onnxruntime speed-up over the dense model (fp32, 2 threads)"
    )
    builders: dict[str, Callable[[], nn.Module]] = {
        "resnet": lambda: ResNet(BasicBlock, [2, 2, 2, 2], widths=(32, 64, 128, 256)),
        "vit": lambda: ViT(image=16, patch=4, dim=128, depth=4, heads=4),
    }
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += run_model(name, builders[name], data, args, out)
    points = []
    for r in rows:
        if "speedup" in r:
            kind = "fine-tuned" if r["plan"].startswith("channels") else "sparse, fine-tuned"
            tag = r["plan"].replace("channels ", "").replace("unstructured ", "")
            points.append((f"{r['model']} {kind} @{tag}", r["speedup"][1], r["accuracy"]))
    plot_accuracy_vs_speedup(points, out / "accuracy.png")
    wins = [
        r for r in rows if "speedup" in r and r["speedup"][1] >= 2.0 and r["loss_points"] <= 1.0
    ]
    print(
        "\n>= 2x measured speed-up (batch 1) with <= 1 point accuracy loss after fine-tuning: "
        + (", ".join(f"{r['model']} {r['plan']}" for r in wins) or "none")
    )
    write_text_atomic(out / "results.json", json.dumps(rows, indent=1, default=str))
    print(f"wrote {out / 'accuracy.png'}, kept_channels_*.png and results.json")


if __name__ == "__main__":
    main()

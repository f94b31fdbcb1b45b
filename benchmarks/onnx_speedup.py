"""Measured onnxruntime speed-up of pruned zoo models, next to the ideal (MACs) speed-up.

For each zoo model: prune 50 % of channels (l2, local), export the original and the pruned
model, verify both against torch in onnxruntime, quantize both to int8 (dynamic), and time them
side by side in one process (interleaved runs, 2 threads, batch 1 and 16). Prints, per model:
MACs ratio, ideal speed-up, measured speed-up and efficiency (measured / ideal) per batch size,
file sizes, max verification error, and the int8 variants' speed-ups over the fp32 original
(static QDQ int8 for the CNNs, dynamic int8 for the transformers).

    .venv/bin/python benchmarks/onnx_speedup.py [--runs 30] [--models resnet18,vit] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

import graphprune as gp
from graphprune.io import write_text_atomic
from graphprune.models import MODELS
from graphprune.onnx import benchmark, export_onnx, make_feeds

CNNS = {
    "vgg",
    "resnet18",
    "resnet_bottleneck",
    "mobilenet_v2",
    "resnext",
    "densenet",
    "inception",
    "se_resnet",
    "unet",
}


def measure(
    name: str, runs: int, batches: tuple[int, ...], threads: int, ratio: float, round_to: int | str
) -> dict[str, Any]:
    spec = MODELS[name]
    model, x = spec.build(), spec.example_inputs()
    pruned = gp.compile(model, gp.Plan(ratio=ratio, round_to=round_to), x)
    # int8: static QDQ for convs (onnxruntime's dynamic path runs them as slow ConvInteger),
    # dynamic for the transformers (MatMulInteger with per-batch activation scales)
    mode = "static" if name in CNNS else "dynamic"
    calibration = [spec.example_inputs(seed=s) for s in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        base = export_onnx(
            model, x, Path(tmp) / "base.onnx", quantize=mode, calibration=calibration
        )
        small = export_onnx(
            pruned, x, Path(tmp) / "pruned.onnx", quantize=mode, calibration=calibration
        )
        feeds = make_feeds(x, base.exported.input_names)
        ideal = base.macs / max(small.macs, 1)
        assert base.quantized and small.quantized
        pairs = {  # each timed side by side against the fp32 original
            "fp32": (small.exported.path, ("baseline", "pruned"), ideal),
            "int8": (small.quantized, ("fp32", "pruned int8"), None),
            "int8_base": (base.quantized, ("fp32", "int8"), None),
        }
        timed = {
            key: benchmark(
                base.exported.path,
                other,
                feeds,
                batch_sizes=batches,
                threads=threads,
                runs=runs,
                labels=labels,
                ideal_speedup=best,
            )
            for key, (other, labels, best) in pairs.items()
        }
    fp32, int8, int8_base = timed["fp32"], timed["int8"], timed["int8_base"]
    return {
        "model": name,
        "int8_mode": mode,
        "macs_ratio": small.macs / base.macs,
        "ideal": ideal,
        "speedup": {r.batch: r.speedup for r in fp32.results},
        "efficiency": {r.batch: fp32.efficiency(r) for r in fp32.results},
        "ms_base": {r.batch: r.baseline.median_ms for r in fp32.results},
        "ms_pruned": {r.batch: r.pruned.median_ms for r in fp32.results},
        "int8_speedup": {r.batch: r.speedup for r in int8_base.results},
        "pruned_int8_speedup": {r.batch: r.speedup for r in int8.results},
        "mb": {
            "base": base.exported.bytes / 1e6,
            "pruned": small.exported.bytes / 1e6,
            "pruned_int8": small.quantized_bytes / 1e6,
        },
        "max_abs_error": max(base.verification.max_abs, small.verification.max_abs),  # type: ignore[union-attr]
        "int8_max_abs_error": small.quantized_verification.max_abs,  # type: ignore[union-attr]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=lambda v: v if v == "auto" else int(v), default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    batches = tuple(int(b) for b in args.batches.split(","))
    b1, bn = batches[0], batches[-1]
    print(
        f"pruning {args.ratio:.0%} of channels (l2, round_to={args.round_to}); onnxruntime CPU, "
        f"{args.threads} threads, {args.runs} interleaved runs; speed-ups are measured "
        f"side by side against the fp32 original"
    )
    head = (
        f"{'model':<18} {'MACs':>5} {'ideal':>5} | {'ms b' + str(b1):>7} {'x b' + str(b1):>6}"
        f" {'eff':>4} | {'ms b' + str(bn):>8} {'x b' + str(bn):>6} {'eff':>4} | "
        f"{'MB fp32':>7} {'pruned':>6} {'+int8':>6} | {'int8 x':>6} {'prn+int8 x':>10} | "
        f"{'max|Δ|':>7}"
    )
    print(head)
    rows = []
    for name in args.models.split(","):
        r = measure(name, args.runs, batches, args.threads, args.ratio, args.round_to)
        rows.append(r)
        print(
            f"{name:<18} {r['macs_ratio']:>5.2f} {r['ideal']:>5.2f} | "
            f"{r['ms_base'][b1]:>7.3f} {r['speedup'][b1]:>5.2f}x {r['efficiency'][b1]:>4.2f} | "
            f"{r['ms_base'][bn]:>8.3f} {r['speedup'][bn]:>5.2f}x {r['efficiency'][bn]:>4.2f} | "
            f"{r['mb']['base']:>7.2f} {r['mb']['pruned']:>6.2f} {r['mb']['pruned_int8']:>6.2f} | "
            f"{r['int8_speedup'][bn]:>5.2f}x {r['pruned_int8_speedup'][bn]:>9.2f}x | "
            f"{r['max_abs_error']:>7.1e}",
            flush=True,
        )
    for label, names in [("CNNs", CNNS), ("all", set(MODELS))]:
        chosen = [r for r in rows if r["model"] in names]
        if chosen:
            print(
                f"median efficiency, {label}: batch {b1} "
                f"{statistics.median(r['efficiency'][b1] for r in chosen):.2f}, batch {bn} "
                f"{statistics.median(r['efficiency'][bn] for r in chosen):.2f}"
            )
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

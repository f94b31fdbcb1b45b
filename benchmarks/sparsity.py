"""Sparsity: what it buys on disk and in time, measured side by side in one run.

Model: the zoo GPT at GPT-2-small width (n_embd 768, 12 heads, 2 layers; every attention and MLP
Linear masked, the tied lm_head left dense). For each sparsity (unstructured magnitude 50-99 %,
plus 2:4 and 16x16 blocks) and batch 1 / 32 (one token per sequence, as in decoding: 1 and 32
rows through every Linear), prints:

* ONNX file: dense vs compact sparse storage (values + bitmask, or ONNX sparse tensors where
  smaller), compression ratio; the compact file verified against torch in onnxruntime;
* onnxruntime latency, dense file vs compact file -- compact weights are decoded at session
  start, so this ratio should be ~1.0x: storage, not speed;
* torch latency, dense model vs the model whose layers ``graphprune.sparsify`` moved to sparse
  kernels (CSR / BSR) where it measured them faster -- the only speed sparsity buys on CPU.

    .venv/bin/python benchmarks/sparsity.py [--runs 30] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import graphprune as gp
from graphprune.io import write_text_atomic
from graphprune.models.transformers import GPT
from graphprune.onnx.sparse_report import measure_sparsity

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
BATCHES = (1, 32)


def plans() -> list[tuple[str, gp.Plan]]:
    out = [
        (f"unstructured {s:.0%}", gp.Plan(granularity="unstructured", ratio=s)) for s in SPARSITIES
    ]
    out.append(("2:4", gp.Plan(granularity="n:m", nm=[2, 4])))
    out.append(("block 16x16 90%", gp.Plan(granularity="block", ratio=0.9, block=[16, 16])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="interleaved runs per batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every report as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(n_embd=768, n_head=12, n_layer=2)
    x = (torch.randint(0, 96, (1, 1)),)
    head = (
        f"{'plan':<17} {'sparsity':>8} {'ONNX MB':>15} {'ratio':>6}  "
        + "  ".join(f"{'ORT b' + str(b):>9} {'torch b' + str(b):>9}" for b in BATCHES)
        + "  sparse layers  b1 ms: ORT dense, torch dense, torch sparse"
    )
    print(
        f"GPT n_embd 768, 2 layers: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"params; {args.threads} threads; speed-ups are dense / sparse (>1 = sparse faster)"
    )
    print(head)
    results: dict[str, Any] = {}
    for label, plan in plans():
        masked = gp.compile(model, plan, x)
        report = measure_sparsity(
            masked, x, batch_sizes=BATCHES, runs=args.runs, threads=args.threads
        )
        assert report.onnx_latency is not None and report.torch_latency is not None
        speeds = "  ".join(
            f"{o.speedup:>8.2f}x {t.speedup:>8.2f}x"
            for o, t in zip(report.onnx_latency.results, report.torch_latency.results, strict=True)
        )
        converted = sum(layer.layout != "dense" for layer in report.layers)
        ort1, torch1 = report.onnx_latency.results[0], report.torch_latency.results[0]
        print(
            f"{label:<17} {report.sparsity:>8.1%} "
            f"{report.onnx_dense_bytes / 1e6:>6.1f} -> {report.onnx_compact_bytes / 1e6:>5.1f} "
            f"{report.onnx_dense_bytes / report.onnx_compact_bytes:>5.1f}x  {speeds}  "
            f"{converted:>6}/{len(report.layers)}  "
            f"{ort1.baseline.median_ms:>5.2f} {torch1.baseline.median_ms:>5.2f} "
            f"{torch1.pruned.median_ms:>5.2f}",
            flush=True,
        )
        results[label] = report.to_dict()
    print(
        "ORT = onnxruntime, dense file vs compact file (decoded at load: same kernels); "
        "torch = dense model vs graphprune.sparsify (layers on CSR/BSR where measured faster)"
    )
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()

"""One-shot pruning without any fine-tuning: importance criteria and reconstruction on real data.

(a) digits (scikit-learn, bundled; the split, models and dense training of
    ``benchmarks/accuracy.py``): the ResNet-layout CNN and the ViT at 30 / 50 / 70 % channels,
    test accuracy with *no training after pruning* for l2, taylor, wanda and wanda +
    ``reconstruct=True``; unstructured 50 / 70 / 90 % and 2:4 for magnitude (l1), wanda and
    reconstruct (SparseGPT). Calibration: 8 labelled training batches of 64.
(b) a byte-level GPT (zoo ``GPT``: 4 layers, 4 heads, width 192, context 128; ~1.9 M params)
    trained for ``--steps`` AdamW steps on the source files of Python's standard library
    (every 10th file, sorted by path, is validation); validation perplexity (64 fixed windows)
    for dense, unstructured 50 % and 2:4 (magnitude / wanda / SparseGPT), FFN 50 % and heads
    25 % (l2, wanda, wanda + reconstruct); 128 training windows (16 K bytes) calibrate.

Structured rows also get the measured onnxruntime speed-up over the dense model (fp32, 2
threads, batch 1, interleaved runs; the export verified against torch). Sparse rows keep the
dense MACs and speed: they are about accuracy. Writes ``oneshot.png`` (accuracy / perplexity vs
measured speed-up) and ``results.json`` into ``--out``.

    .venv/bin/python benchmarks/oneshot.py [--part digits,gpt] [--steps 1000] [--out out/oneshot]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import graphprune as gp
from graphprune.io import write_text_atomic
from graphprune.models.cnn import BasicBlock, ResNet
from graphprune.models.transformers import GPT, ViT

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import EPOCHS, accuracy, batches, digits, train

RATIOS = (0.3, 0.5, 0.7)
STRUCTURED = (("l2", False), ("taylor", False), ("wanda", False), ("wanda", True))
SPARSE = (("magnitude", "l1", False), ("wanda", "wanda", False), ("SparseGPT", "l1", True))
SPARSE_PLANS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("unstructured 50%", {"granularity": "unstructured", "ratio": 0.5}),
    ("unstructured 70%", {"granularity": "unstructured", "ratio": 0.7}),
    ("unstructured 90%", {"granularity": "unstructured", "ratio": 0.9}),
    ("2:4", {"granularity": "n:m", "nm": [2, 4]}),
)


def measured_speedup(model: nn.Module, dense: nn.Module, x: torch.Tensor, runs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        report = gp.export_onnx(
            model, (x,), Path(tmp) / "m.onnx", baseline=dense, bench_runs=runs, batch_sizes=(1,)
        )
    assert report.latency is not None and report.verification is not None
    return report.latency.results[0].speedup


# -- (a) digits ------------------------------------------------------------------------------
def digits_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = digits()
    builders: dict[str, Callable[[], nn.Module]] = {
        "resnet": lambda: ResNet(BasicBlock, [2, 2, 2, 2], widths=(32, 64, 128, 256)),
        "vit": lambda: ViT(image=16, patch=4, dim=128, depth=4, heads=4),
    }
    rows: list[dict[str, Any]] = []
    for name, build in builders.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        dense = train(build(), data, EPOCHS[name], 2e-3, seed=0)
        base = accuracy(dense, data)
        print(f"\n{name}: dense {base:.2f} % ({time.perf_counter() - start:.0f} s training)")
        calib = [gp.LabelledBatch(x, y) for x, y in batches(data[0], data[1], 64, seed=99)[:8]]
        example = (data[0][:2],)
        rows.append({"part": "digits", "model": name, "plan": "dense", "accuracy": base})
        print(f"{'plan':<18} " + " ".join(f"{c + ('+rec' if r else ''):>10}" for c, r in STRUCTURED)
              + f" {'ORT b1':>7} {'MACs':>5}")  # fmt: skip
        for ratio in RATIOS:
            found: dict[str, float] = {}
            last: nn.Module = dense
            for criterion, rec in STRUCTURED:
                plan = gp.Plan(ratio=ratio, importance=criterion, reconstruct=rec)
                t = time.perf_counter()
                pruned = gp.compile(
                    dense, plan, example, calibration=calib, loss_fn=F.cross_entropy
                )
                key = criterion + ("+reconstruct" if rec else "")
                found[key] = accuracy(pruned, data)
                found[key + " seconds"] = time.perf_counter() - t
                last = pruned
            speed = measured_speedup(last, dense, data[0][:1], args.runs)
            macs = gp.report(last).macs_ratio
            row = {"part": "digits", "model": name, "plan": f"channels {ratio:.0%}",
                   "dense": base, **found, "speedup": speed, "macs_ratio": macs}  # fmt: skip
            rows.append(row)
            print(f"{row['plan']:<18} " + " ".join(
                f"{found[c + ('+reconstruct' if r else '')]:>10.2f}" for c, r in STRUCTURED)
                + f" {speed:>6.2f}x {macs:>5.2f}", flush=True)  # fmt: skip
        for label, fields in SPARSE_PLANS:
            found = {}
            for tag, criterion, rec in SPARSE:
                plan = gp.Plan(importance=criterion, reconstruct=rec, **fields)
                pruned = gp.compile(dense, plan, example, calibration=calib)
                found[tag] = accuracy(pruned, data)
            rows.append({"part": "digits", "model": name, "plan": label, "dense": base, **found})
            print(f"{label:<18} " + " ".join(f"{t}={found[t]:.2f}" for t, _, _ in SPARSE),
                  flush=True)  # fmt: skip
    return rows


# -- (b) GPT on the standard library -----------------------------------------------------------
def stdlib_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Bytes of the stdlib's .py files: (train, validation, files); every 10th file by sorted
    path is validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train_parts, val_parts, size = [], [], 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val_parts if i % 10 == 0 else train_parts).append(data)
        size += len(data)
        if size >= max_bytes:
            break
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train_parts).long(), as_tensor(val_parts).long(), i + 1


def windows(data: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    starts = torch.randint(
        0, len(data) - length - 1, (count,), generator=torch.Generator().manual_seed(seed)
    )
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])  # (count, length + 1)


def perplexity(model: nn.Module, val: torch.Tensor) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for chunk in val.split(16):
            logits = model(chunk[:, :-1])
            losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()))
    return math.exp(float(torch.stack(losses).mean()))


def train_gpt(model: nn.Module, train_bytes: torch.Tensor, steps: int) -> None:
    """AdamW, one-cycle schedule, ``steps`` batches of 32 x 128-byte windows; left in eval."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in gp.progress.track(range(steps), "training GPT"):
        batch = windows(train_bytes, 32, 128, seed=step)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def gpt_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    train_bytes, val_bytes, files = stdlib_corpus(args.corpus_mb * 1_000_000)
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=192)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nGPT: {params / 1e6:.2f} M params; stdlib corpus: {files} files, "
        f"{len(train_bytes) / 1e6:.1f} MB train / {len(val_bytes) / 1e6:.1f} MB validation"
    )
    start = time.perf_counter()
    train_gpt(model, train_bytes, args.steps)
    val = windows(val_bytes, 64, 128, seed=123456)
    dense_ppl = perplexity(model, val)
    print(f"trained {args.steps} steps of 32 x 128 bytes in {time.perf_counter() - start:.0f} s; "
          f"dense validation perplexity {dense_ppl:.3f} (bytes)")  # fmt: skip
    calib = list(windows(train_bytes, args.calib_windows, 128, seed=999)[:, :-1].split(8))
    example = (val[:1, :-1],)
    rows: list[dict[str, Any]] = [{"part": "gpt", "plan": "dense", "perplexity": dense_ppl}]
    for label, fields in (SPARSE_PLANS[0], SPARSE_PLANS[3]):
        found = {}
        for tag, criterion, rec in SPARSE:
            pruned = gp.compile(
                model, gp.Plan(importance=criterion, reconstruct=rec, **fields), example,
                calibration=calib,
            )  # fmt: skip
            found[tag] = perplexity(pruned, val)
        rows.append({"part": "gpt", "plan": label, "dense": dense_ppl, **found})
        print(f"{label:<18} " + " ".join(f"{t} {found[t]:.3f} ({found[t] / dense_ppl:.3f}x)"
                                        for t, _, _ in SPARSE), flush=True)  # fmt: skip
    structured = (
        ("FFN 50%", {"ratio": 0.0, "overrides": {"*.mlp.c_fc": 0.5}}),
        ("heads 25%", {"granularity": "heads", "ratio": 0.25}),
    )
    for label, fields in structured:
        found = {}
        last: nn.Module = model
        for criterion, rec in (("l2", False), ("wanda", False), ("wanda", True)):
            plan = gp.Plan(importance=criterion, reconstruct=rec, **fields)
            last = gp.compile(model, plan, example, calibration=calib)
            found[criterion + ("+reconstruct" if rec else "")] = perplexity(last, val)
        speed = measured_speedup(last, model, example[0], args.runs)
        macs = gp.report(last).macs_ratio
        rows.append({"part": "gpt", "plan": label, "dense": dense_ppl, **found,
                     "speedup": speed, "macs_ratio": macs})  # fmt: skip
        print(f"{label:<18} " + " ".join(f"{k} {v:.3f}" for k, v in found.items())
              + f"  ORT b1 {speed:.2f}x, MACs {macs:.2f}", flush=True)  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, marker in (("resnet", "o"), ("vit", "s")):
        pts = [r for r in rows if r.get("model") == model and "speedup" in r]
        for key, style in (("wanda", "--"), ("wanda+reconstruct", "-")):
            axes[0].plot([r["speedup"] for r in pts], [r[key] for r in pts], style,
                         marker=marker, label=f"{model} {key}")  # fmt: skip
    axes[0].set(xlabel="measured onnxruntime speed-up (batch 1)", ylabel="test accuracy %",
                title="digits, channels 30/50/70 %, no fine-tuning")  # fmt: skip
    gpt = [r for r in rows if r.get("part") == "gpt" and "speedup" in r]
    for key, marker in (("wanda", "x"), ("wanda+reconstruct", "o")):  # two plans: no lines
        axes[1].scatter([r["speedup"] for r in gpt], [r[key] for r in gpt], marker=marker,
                        label=key)  # fmt: skip
        for r in gpt:
            axes[1].annotate(r["plan"], (r["speedup"], r[key]), fontsize=7,
                             xytext=(4, 4), textcoords="offset points")  # fmt: skip
    dense = [r["perplexity"] for r in rows if r.get("part") == "gpt" and r["plan"] == "dense"]
    if dense:
        axes[1].axhline(dense[0], color="grey", lw=0.8, label="dense")
    axes[1].set(xlabel="measured onnxruntime speed-up (batch 1)", ylabel="validation perplexity",
                title="stdlib GPT: FFN 50 %, heads 25 %")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="digits,gpt")
    parser.add_argument("--steps", type=int, default=1000, help="GPT training steps")
    parser.add_argument("--calib-windows", type=int, default=128, help="GPT calibration")
    parser.add_argument("--corpus-mb", type=int, default=12, help="stdlib bytes read (MB)")
    parser.add_argument("--runs", type=int, default=30, help="interleaved onnxruntime runs")
    parser.add_argument("--out", default="out/oneshot")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    parts = args.part.split(",")
    if "digits" in parts:
        rows += digits_part(args)
    if "gpt" in parts:
        rows += gpt_part(args)
    write_text_atomic(out / "results.json", json.dumps(rows, indent=1))
    if "speedup" in json.dumps(rows):
        plot(rows, out / "oneshot.png")
    print(f"wrote {out / 'results.json'} and {out / 'oneshot.png'}")


if __name__ == "__main__":
    main()

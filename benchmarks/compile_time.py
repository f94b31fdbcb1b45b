"""Seconds spent capturing (torch.export), analysing and pruning (graphprune.compile at 0.5)
each zoo model and two real-size networks, measured in one run (median of --repeat).

``--stages`` adds the seconds of each compile stage (from ``gp.report(m).seconds``; "rest" is
what no stage lap covers: MAC counts, config sync, copies) and Torch-Pruning's time for the same
job (l2 magnitude, ratio 0.5, the classifier ignored) in the same process, when installed.
``--llama`` adds a LLaMA-style model of 1.1 B parameters (TinyLlama's shape, bf16, random init)
pruned at 0.25 in place, the compile-time issue's target (about 2.2 GB of weights).

``--against REF`` also measures the graphprune of git revision REF (built into a temporary
directory, run in a subprocess on the same models and plan) and prints both side by side with
the ratio, e.g. to check that a change does not slow compile down.

    .venv/bin/python benchmarks/compile_time.py [--repeat 3] [--against e9fe280]
    .venv/bin/python benchmarks/compile_time.py --stages [--only resnet50@224,vit_s16@224] [--llama]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cases() -> dict[str, tuple[Any, tuple[Any, ...]]]:
    import torch

    from graphprune.models import MODELS
    from graphprune.models.cnn import Bottleneck, ResNet
    from graphprune.models.transformers import ViT

    found = {name: (spec.build(), spec.example_inputs()) for name, spec in MODELS.items()}
    image = (torch.randn(1, 3, 224, 224),)
    found["resnet50@224"] = (ResNet(Bottleneck, [3, 4, 6, 3], (64, 128, 256, 512), 1000), image)
    found["vit_s16@224"] = (ViT(224, 16, 384, 12, 6, 1000), image)
    return found


def llama_1b() -> tuple[Any, tuple[Any, ...]]:
    """TinyLlama's shape (hidden 2048, 22 layers, 32/4 heads, FFN 5632, vocab 32000): 1.1 B
    parameters in bf16, random init."""
    import importlib

    import torch

    sys.path.insert(1, str(ROOT))
    from tests.real_models import declare_torchvision_ops  # transformers imports torchvision

    declare_torchvision_ops()
    here = Path(__file__).resolve().parent  # holds transformers.py (a benchmark): look past it
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:  # transformers imports lazily: build while the path is clean
        tf: Any = importlib.import_module("transformers")
        torch.manual_seed(0)
        config = tf.LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
            max_position_embeddings=2048,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(config).bfloat16().eval()
    finally:
        sys.path[:] = saved
    return model, (torch.randint(0, 32000, (1, 16)),)


def stage_times(only: list[str] | None, llama: bool) -> dict[str, dict[str, float]]:
    """Per model: graphprune's whole compile, its stages, and Torch-Pruning's time (one run
    each, warm: a first compile of the same model is not timed)."""
    import graphprune as gp

    sys.path.append(str(Path(__file__).parent))  # last: benchmarks/transformers.py must not
    from vs_torch_pruning import torch_pruning  # shadow the library (benchmark-only dependency)

    found = cases()
    jobs = {n: found[n] for n in (only or list(found))}
    rows: dict[str, dict[str, float]] = {}
    for name, (model, inputs) in jobs.items():
        model.eval()
        gp.compile(model, gp.Plan(ratio=0.5, round_to=1), inputs)  # warm-up
        start = time.perf_counter()
        pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), inputs)
        row = {"graphprune": time.perf_counter() - start, **gp.report(pruned).seconds}
        row["tp"] = _tp_seconds(torch_pruning, model, inputs)
        rows[name] = row
    if llama:
        model, inputs = llama_1b()
        start = time.perf_counter()
        pruned = gp.compile(model, gp.Plan(ratio=0.25), inputs, inplace=True)
        rows["llama-1.1b bf16 @0.25"] = {
            "graphprune": time.perf_counter() - start, **gp.report(pruned).seconds,
            "tp": float("nan"),
        }  # fmt: skip
    return rows


def _tp_seconds(prune: Any, model: Any, inputs: tuple[Any, ...]) -> float:
    """Torch-Pruning's seconds for the same job (NaN when it cannot prune the model)."""
    example = inputs[0] if len(inputs) == 1 else inputs
    try:
        prune(model, example, 0.5, 1)  # warm-up
        start = time.perf_counter()
        prune(model, example, 0.5, 1)
        return time.perf_counter() - start
    except Exception:
        return float("nan")


def print_stages(rows: dict[str, dict[str, float]]) -> None:
    names = (k for r in rows.values() for k in r if k not in ("graphprune", "tp"))
    stages = list(dict.fromkeys(names))
    print(f"{'model':<24} {'graphprune s':>12} {'TP s':>7} {'ratio':>6}  "
          + " ".join(f"{s[:10]:>10}" for s in [*stages, "rest"]))  # fmt: skip
    ratios = []
    for name, r in rows.items():
        rest = r["graphprune"] - sum(r.get(s, 0.0) for s in stages)
        ratio = r["graphprune"] / r["tp"] if r["tp"] == r["tp"] and r["tp"] > 0 else float("nan")
        if ratio == ratio:
            ratios.append(ratio)
        cells = " ".join(f"{r.get(s, 0.0):>10.3f}" for s in stages) + f" {rest:>10.3f}"
        print(f"{name:<24} {r['graphprune']:>12.3f} {r['tp']:>7.3f} {ratio:>6.2f}  {cells}")
    if ratios:
        print(f"graphprune / Torch-Pruning: median {statistics.median(ratios):.2f}, "
              f"max {max(ratios):.2f} over {len(ratios)} models")  # fmt: skip


def measure(repeat: int) -> dict[str, dict[str, float]]:
    """Per model: params, graph nodes, groups and the median seconds of each stage."""
    import graphprune as gp
    from graphprune.analysis import analyze_captured
    from graphprune.capture import capture

    rows = {}
    for name, (model, inputs) in cases().items():
        model.eval()
        cap, ana, comp = [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            captured = capture(model, inputs)
            t1 = time.perf_counter()
            dg = analyze_captured(captured)
            t2 = time.perf_counter()
            gp.compile(
                model, gp.Plan(ratio=0.5, round_to=1), inputs
            )  # the same work in any version
            t3 = time.perf_counter()
            cap.append(t1 - t0)
            ana.append(t2 - t1)
            comp.append(t3 - t2)
        rows[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "nodes": len(captured.graph.nodes),
            "groups": len(dg.groups),
            "capture": statistics.median(cap),
            "analyze": statistics.median(ana),
            "compile": statistics.median(comp),
        }
    return rows


def measure_revision(ref: str, repeat: int) -> dict[str, dict[str, float]]:
    """The same measurement with graphprune as of git revision ``ref`` (built with pip into a
    temporary directory, so this checkout's editable install is not touched)."""
    with tempfile.TemporaryDirectory() as tmp:
        source, site = Path(tmp) / "src", Path(tmp) / "site"
        source.mkdir()
        archive = subprocess.run(
            ["git", "archive", ref], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
             str(site), str(source)],
            check=True,
        )  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(site)}
        out = subprocess.run(
            [sys.executable, __file__, "--repeat", str(repeat), "--json-only"],
            cwd=tmp,  # not ROOT: the checkout's graphprune must not shadow the built one
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (median shown)")
    parser.add_argument("--against", help="git revision to compare with")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", action="store_true", help="stage table vs Torch-Pruning")
    parser.add_argument("--only", help="comma-separated model names (with --stages)")
    parser.add_argument("--llama", action="store_true", help="add the 1.1 B LLaMA (--stages)")
    args = parser.parse_args()
    if args.stages:
        only = args.only.split(",") if args.only else None
        print_stages(stage_times(only, args.llama))
        return
    if args.json_only:
        print(json.dumps(measure(args.repeat)))
        return
    before = measure_revision(args.against, args.repeat) if args.against else None
    now = measure(args.repeat)
    print(
        f"{'model':<18} {'params':>11} {'nodes':>6} {'groups':>7} {'capture s':>10} "
        f"{'analyze s':>10} {'compile s':>10}"
        + (f" {args.against[:10] + ' s':>13} {'ratio':>6}" if before else "")
        + "  (compile = whole ratio-0.5 prune, verified)"
    )
    ratios = []
    for name, r in now.items():
        line = (
            f"{name:<18} {int(r['params']):>11,} {int(r['nodes']):>6} {int(r['groups']):>7} "
            f"{r['capture']:>10.3f} {r['analyze']:>10.3f} {r['compile']:>10.3f}"
        )
        if before and name in before:
            ratio = r["compile"] / before[name]["compile"]
            ratios.append(ratio)
            line += f" {before[name]['compile']:>13.3f} {ratio:>6.2f}"
        print(line)
    if ratios:
        print(
            f"compile time now / {args.against}: median {statistics.median(ratios):.2f}, "
            f"max {max(ratios):.2f}"
        )


if __name__ == "__main__":
    main()

"""graphprune vs Torch-Pruning: the same plan on the same torchvision models, measured in one
onnxruntime harness.

For each model (random init, batch 1, default input size): prune 50 % of the channels with
graphprune (``Plan(ratio=0.5, round_to=R)``, l2, local) and with Torch-Pruning 1.6
(``MagnitudePruner``, p=2, ``pruning_ratio=0.5``, ``round_to=R``, the classifier ignored);
export the original and both pruned models to ONNX, verify each against torch in
onnxruntime, then time the three in one process, two ways (2 threads, denormals flushed):

- *deployed*: each session as onnxruntime runs it by default (intra-op threads spin between
  ops), alone -- built, warmed and timed for a block of runs, then dropped -- in rotating
  blocks (:func:`graphprune.timing.block_samples`);
- *interleaved*: the three sessions alive together and timed call by call A B C, B C A, ...,
  spinning off so that idle pools do not compete; each op then pays a thread wake-up, a
  fixed cost that weighs on small pruned models (RegNetX-400MF pruned: 2.0 ms of kernels in
  onnxruntime's profile, 3.3 ms measured).

Prints MACs kept, measured speed-up over the original and efficiency (measured / MACs-ideal)
for both libraries side by side, per harness. ``--equal-macs`` gives graphprune
``target_macs`` = the MACs Torch-Pruning kept, so both run at the same size.

Torch-Pruning is a benchmark-only dependency: ``pip install torch-pruning torchvision``.

    .venv/bin/python benchmarks/vs_torch_pruning.py [--models densenet121,googlenet] [--runs 48]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune as gp
from graphprune.analysis.macs import count_macs
from graphprune.io import write_text_atomic
from graphprune.onnx import make_feeds
from graphprune.onnx.runtime import session
from graphprune.planning.plan import simd_block
from graphprune.timing import block_samples, interleaved_samples
from tests.real_models import declare_torchvision_ops

CONCAT = ["densenet121", "densenet169", "densenet201", "squeezenet1_0", "squeezenet1_1"]
CONCAT += ["googlenet", "inception_v3"]
GROUPED = ["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf"]
PLAIN = ["resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "efficientnet_b0"]
MODELS = CONCAT + GROUPED + PLAIN


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": True}
    model = getattr(torchvision.models, name)(**kwargs).eval()
    side = 299 if name == "inception_v3" else 224
    return model, torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear (or final conv of SqueezeNet): its outputs are the classes."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return linears[-1] if linears else layers[-1]


def torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float, round_to: int) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[classifier(pruned)],
        round_to=round_to,
    )
    pruner.step()
    return pruned.eval()


HARNESSES = ("deployed", "interleaved")


def timings(
    paths: dict[str, Path],
    input_names: dict[str, list[str]],
    x: torch.Tensor,
    runs: int,
    blocks: int,
    threads: int,
) -> dict[str, dict[str, float]]:
    """Median ms of each model under both harnesses (see the module docstring)."""

    def runner(key: str, spinning: bool) -> Any:
        sess = session(paths[key], threads, spinning=spinning)
        feeds = make_feeds(x, input_names[key])(sess, 1)
        return lambda: sess.run(None, feeds)

    builders = {key: (lambda k=key: runner(k, True)) for key in paths}
    deployed = block_samples(builders, blocks=blocks, runs=max(runs // blocks, 3), warmup=3)
    live = {key: runner(key, False) for key in paths}
    interleaved = interleaved_samples(live, warmup=5, repeats=runs)
    return {
        harness: {key: statistics.median(v) * 1e3 for key, v in samples.items()}
        for harness, samples in (("deployed", deployed), ("interleaved", interleaved))
    }


def measure(
    name: str,
    ratio: float,
    round_to: int,
    runs: int,
    blocks: int,
    threads: int,
    equal_macs: bool,
) -> dict[str, Any]:
    model, x = build(name)
    start = time.perf_counter()
    theirs = torch_pruning(model, x, ratio, round_to)
    tp_seconds = time.perf_counter() - start
    base_macs = count_macs(model, x)
    plan = gp.Plan(ratio=ratio, round_to=round_to)
    if equal_macs:  # graphprune at Torch-Pruning's MACs: one speed-up per size, comparable
        plan = gp.Plan(target_macs=count_macs(theirs, x) / base_macs, round_to=round_to)
    start = time.perf_counter()
    ours = gp.compile(model, plan, x)
    gp_seconds = time.perf_counter() - start
    macs = {"base": base_macs, "gp": count_macs(ours, x), "tp": count_macs(theirs, x)}
    with tempfile.TemporaryDirectory() as tmp:
        reports = {
            key: gp.export_onnx(m, x, Path(tmp) / f"{key}.onnx", verify=True)
            for key, m in [("base", model), ("gp", ours), ("tp", theirs)]
        }
        ms = timings(
            {key: Path(r.exported.path) for key, r in reports.items()},
            {key: r.exported.input_names for key, r in reports.items()},
            x,
            runs,
            blocks,
            threads,
        )
    row: dict[str, Any] = {"model": name}
    for harness in HARNESSES:
        row[f"ms_base_{harness}"] = ms[harness]["base"]
    for key in ("gp", "tp"):
        ideal = macs["base"] / macs[key]
        row[key] = {
            "macs_kept": macs[key] / macs["base"],
            "ideal": ideal,
            "max_abs_error": reports[key].verification.max_abs,  # type: ignore[union-attr]
        }
        for harness in HARNESSES:
            speedup = ms[harness]["base"] / ms[harness][key]
            row[key][harness] = {
                "ms": ms[harness][key],
                "speedup": speedup,
                "efficiency": speedup / ideal,
            }
    row["gp"]["compile_s"], row["tp"]["compile_s"] = gp_seconds, tp_seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=simd_block())
    parser.add_argument("--runs", type=int, default=48, help="timed runs per model, per harness")
    parser.add_argument("--blocks", type=int, default=6, help="deployed harness: blocks per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument(
        "--equal-macs",
        action="store_true",
        help="graphprune plans target_macs = the MACs Torch-Pruning kept (not ratio)",
    )
    args = parser.parse_args()
    declare_torchvision_ops()
    torch.set_flush_denormal(True)
    print(
        f"{args.ratio:.0%} of channels, l2, local, round_to={args.round_to}"
        + (" (graphprune: target_macs = Torch-Pruning's)" if args.equal_macs else "")
        + f"; onnxruntime CPU, {args.threads} threads, batch 1, {args.runs} runs of each of "
        "original / graphprune / Torch-Pruning per harness (deployed: "
        f"{args.blocks} rotating blocks, spinning on, one session alive; interleaved: spinning "
        "off, call by call); speed-up = original ms / pruned ms"
    )
    print(
        f"{'':<16} {'':>7} | {'':>7} {'deployed':^25} | {'interleaved':^25} |"
        f"\n{'model':<16} {'ms':>7} | {'MACs gp':>7} {'gp x':>6} {'eff':>5} "
        f"{'tp x':>6} {'eff':>5} | {'gp x':>6} {'eff':>5} {'tp x':>6} {'eff':>5} | "
        "MACs tp | gp >= tp"
    )
    rows = []
    for name in args.models.split(","):
        r = measure(
            name,
            args.ratio,
            args.round_to,
            args.runs,
            args.blocks,
            args.threads,
            args.equal_macs,
        )
        rows.append(r)
        g, t = r["gp"], r["tp"]
        cells = " | ".join(
            f"{g[h]['speedup']:>5.2f}x {g[h]['efficiency']:>5.2f} "
            f"{t[h]['speedup']:>5.2f}x {t[h]['efficiency']:>5.2f}"
            for h in HARNESSES
        )
        wins = "/".join("yes" if g[h]["speedup"] >= t[h]["speedup"] else "NO" for h in HARNESSES)
        print(
            f"{name:<16} {r['ms_base_deployed']:>7.2f} | {g['macs_kept']:>7.3f} {cells} | "
            f"{t['macs_kept']:>7.3f} | {wins}",
            flush=True,
        )
    for harness in HARNESSES:
        for key, label in (("gp", "graphprune"), ("tp", "Torch-Pruning")):
            print(
                f"{harness}: median efficiency, {label}: "
                f"{statistics.median(r[key][harness]['efficiency'] for r in rows):.2f}; "
                "median speed-up "
                f"{statistics.median(r[key][harness]['speedup'] for r in rows):.2f}x"
            )
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

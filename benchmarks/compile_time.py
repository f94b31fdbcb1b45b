"""Seconds spent capturing (torch.export), analysing and pruning (graphprune.compile at 0.5)
each zoo model and two real-size networks, measured in one run (median of --repeat).

``--stages`` prints, per model, graphprune's first compile of it ("cold") and its second
("warm": the unchanged model reuses its capture and analysis), Torch-Pruning's first and
second run of the same job (l2 magnitude, ratio 0.5, the classifier ignored) in the same
process, and the seconds of each stage of the cold compile (from ``gp.report(m).seconds``;
"rest" is what no stage lap covers: the check's forward, copies, config sync).
``--torchvision`` adds 18 torchvision models (those of benchmarks/vs_torch_pruning.py, plus
MobileNetV3-L, RegNetY-800MF and ViT-B/16); ``--llama`` a LLaMA-style model of 1.1 B
parameters (TinyLlama's shape, bf16, random init) pruned at 0.25 in place, the compile-time
issue's target (about 2.2 GB of weights); ``--against REF`` runs the same table for revision
REF first (in a subprocess) and prints its stages and the speed-up beside. ``--workflows``
times a latency-target compile and a 5-step Pruner end to end (with ``--against``: both
revisions, and whether the Pruner's final weights are the same).

``--against REF`` also measures the graphprune of git revision REF (built into a temporary
directory, run in a subprocess on the same models and plan) and prints both side by side with
the ratio, e.g. to check that a change does not slow compile down.

    .venv/bin/python benchmarks/compile_time.py [--repeat 3] [--against e9fe280]
    .venv/bin/python benchmarks/compile_time.py --stages [--torchvision] [--llama] [--against REF]
        [--only resnet50@224,tv:vit_b_16] [--out benchmarks/results/compile_time.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
        # graphprune.models.llm.LLAMA_SHAPES["1b"], spelled out: --against runs this with
        # revisions that predate that table
        config = tf.LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
            max_position_embeddings=2048,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(config).bfloat16().eval()
    finally:
        sys.path[:] = saved
    return model, (torch.randint(0, 32000, (1, 16)),)


TORCHVISION = [  # benchmarks/vs_torch_pruning.py's models and the compile-time issue's
    "densenet121", "densenet169", "densenet201", "squeezenet1_0", "squeezenet1_1", "googlenet",
    "inception_v3", "resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
    "resnet50", "mobilenet_v2", "vgg11_bn", "efficientnet_b0", "mobilenet_v3_large",
    "regnet_y_800mf", "vit_b_16",
]  # fmt: skip


def stage_cases(only: list[str] | None, torchvision: bool) -> dict[str, Any]:
    """Name -> a builder of (model, example inputs): the zoo, and torchvision's models."""
    found: dict[str, Any] = {name: (lambda c=c: c) for name, c in cases().items()}
    if torchvision:
        sys.path.insert(1, str(ROOT))
        from tests.real_models import declare_torchvision_ops

        declare_torchvision_ops()
        from vs_torch_pruning import build

        found.update({f"tv:{n}": (lambda n=n: _as_inputs(build(n))) for n in TORCHVISION})
    return {n: b for n, b in found.items() if not only or n in only}


def _as_inputs(built: tuple[Any, Any]) -> tuple[Any, tuple[Any, ...]]:
    return built[0], (built[1],)


def stage_times(
    only: list[str] | None, llama: bool, torchvision: bool
) -> dict[str, dict[str, float]]:
    """Per model, in this process: graphprune's first compile of the model ("cold": capture
    and analysis included) and the median of the next ``WARM_RUNS`` ("warm": an unchanged
    model reuses them), their stages, and Torch-Pruning's first run and the median of its next
    ``WARM_RUNS`` of the same job. A tiny model is
    compiled first, so that no model pays for the process's first export."""
    import graphprune as gp

    sys.path.append(str(Path(__file__).parent))  # last: benchmarks/transformers.py must not
    from vs_torch_pruning import torch_pruning  # shadow the library (benchmark-only dependency)

    builders = stage_cases(only, torchvision)
    warm_up, x = cases()["resnet18"]
    gp.compile(warm_up.eval(), gp.Plan(ratio=0.5), x)
    _tp_seconds(torch_pruning, warm_up, x)
    rows: dict[str, dict[str, float]] = {}
    for name, make in builders.items():
        model, inputs = make()
        model.eval()
        row: dict[str, float] = {}
        for run, repeats in (("cold", 1), ("warm", WARM_RUNS)):
            timed = []
            for _ in range(repeats):
                start = time.perf_counter()
                pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), inputs)
                timed.append((time.perf_counter() - start, gp.report(pruned).seconds))
            seconds, stages = sorted(timed, key=lambda t: t[0])[len(timed) // 2]  # the median
            row[run] = seconds
            row.update({f"{run}:{k}": v for k, v in stages.items()})
        row["tp cold"] = _tp_seconds(torch_pruning, model, inputs, warm_up=False)
        tp_runs = WARM_RUNS if row["tp cold"] == row["tp cold"] else 0  # none after a NaN
        warm_tp = [_tp_seconds(torch_pruning, model, inputs, warm_up=False) for _ in range(tp_runs)]
        row["tp warm"] = statistics.median(warm_tp) if warm_tp else float("nan")
        rows[name] = row
        print(f"  {name}: {row['cold']:.2f} s / {row['warm']:.2f} s, TP {row['tp warm']:.2f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    if llama:
        model, inputs = llama_1b()
        start = time.perf_counter()
        pruned = gp.compile(model, gp.Plan(ratio=0.25), inputs, inplace=True)
        seconds = time.perf_counter() - start
        rows["llama-1.1b bf16 @0.25"] = {
            "cold": seconds, **{f"cold:{k}": v for k, v in gp.report(pruned).seconds.items()},
            "warm": float("nan"), "tp cold": float("nan"), "tp warm": float("nan"),
        }  # fmt: skip
    return rows


WARM_RUNS = 3  # warm compiles per model on each side: the median is shown (2 cores, noisy)
TP_LIMIT_S = 60  # Torch-Pruning's dependency search does not end on some models (zoo llama)


class _TimeLimit(Exception):
    pass


def _tp_seconds(prune: Any, model: Any, inputs: tuple[Any, ...], warm_up: bool = True) -> float:
    """Torch-Pruning's seconds for the same job (NaN when it cannot prune the model, or takes
    more than ``TP_LIMIT_S``)."""
    import signal

    def stop(*_: Any) -> None:
        raise _TimeLimit

    example = inputs[0] if len(inputs) == 1 else inputs
    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.alarm(TP_LIMIT_S)
        if warm_up:
            prune(model, example, 0.5, 1)
        start = time.perf_counter()
        prune(model, example, 0.5, 1)
        return time.perf_counter() - start
    except Exception:
        return float("nan")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


STAGES = ["capture", "analyze", "reuse analysis", "shape relations", "score", "resolve",
          "rewrite and verify"]  # fmt: skip


def _ratio(a: float, b: float) -> float:
    return a / b if b == b and b > 0 and a == a else float("nan")


def print_stages(rows: dict[str, dict[str, float]], before: dict[str, Any] | None) -> None:
    """The comparison table, then the stages of each cold compile (and of ``before``'s)."""
    extra = f" {'before':>8} {'speed-up':>8}" if before else ""
    print(f"{'model':<26} {'gp cold':>8} {'gp warm':>8} {'TP cold':>8} {'TP warm':>8} "
          f"{'cold x':>7} {'warm x':>7}" + extra)  # fmt: skip
    cold, warm, gains = [], [], []
    for name, r in rows.items():
        c, w = _ratio(r["cold"], r["tp cold"]), _ratio(r["warm"], r["tp warm"])
        cold += [c] if c == c else []
        warm += [w] if w == w else []
        line = (f"{name:<26} {r['cold']:>8.2f} {r['warm']:>8.2f} {r['tp cold']:>8.2f} "
                f"{r['tp warm']:>8.2f} {c:>7.2f} {w:>7.2f}")  # fmt: skip
        if before and name in before:
            gain = _ratio(before[name]["warm"], r["warm"])
            gains += [gain] if gain == gain else []
            line += f" {before[name]['warm']:>8.2f} {gain:>8.2f}"
        print(line)
    for label, values in (("cold", cold), ("warm", warm)):
        if values:
            print(f"graphprune / Torch-Pruning, {label}: median {statistics.median(values):.2f}, "
                  f"max {max(values):.2f} over {len(values)} models")  # fmt: skip
    if gains:
        print(f"warm compile, before / now: median {statistics.median(gains):.2f}x faster")
    for title, table in (("now", rows), ("before", before or {})):
        if table:
            print(f"\nstages of the cold compile ({title}), seconds:")
            _print_stage_table(table)


def _print_stage_table(rows: dict[str, dict[str, float]]) -> None:
    print(f"{'model':<26} {'total':>7} " + " ".join(f"{s[:9]:>9}" for s in [*STAGES, "rest"]))
    for name, r in rows.items():
        cells = [r.get(f"cold:{s}", 0.0) for s in STAGES]
        rest = r["cold"] - sum(cells)
        print(f"{name:<26} {r['cold']:>7.2f} " + " ".join(f"{v:>9.3f}" for v in [*cells, rest]))


def workflow_times() -> dict[str, dict[str, float]]:
    """End-to-end seconds of the workflows that compile a model many times: a latency-target
    compile (0.65 of the measured onnxruntime latency; its op-latency tables measured by an
    untimed first run, so both revisions time the same work), then one to 0.75 (rounds never
    compiled before: only the original's export can be reused), and a 5-step Pruner at 0.5,
    on the zoo ResNet-18 layout and the zoo ViT; with what each produced (MACs ratio, and for
    the Pruner a checksum of the final weights: the same before and after a change)."""
    import torch

    import graphprune as gp
    from graphprune.analysis.macs import count_macs
    from graphprune.models import MODELS

    rows: dict[str, dict[str, float]] = {}
    for name in ("resnet18", "vit"):
        spec = MODELS[name]
        model, x = spec.build().eval(), spec.example_inputs()
        plan = gp.Plan(target_latency=0.65)  # 0.6 is past some runs' measured floors
        gp.compile(model, plan, x)  # fills the op-latency tables (untimed)
        start = time.perf_counter()
        pruned = gp.compile(model, plan, x)
        found = gp.report(pruned)
        rows[f"latency {plan.target_latency} {name}"] = {
            "seconds": time.perf_counter() - start, "macs_ratio": found.macs_ratio,
            "rounds": float(len(found.latency.rounds)) if found.latency else float("nan"),
        }  # fmt: skip
        start = time.perf_counter()  # another target on the same model: its rounds are new
        other = gp.report(gp.compile(model, gp.Plan(target_latency=0.75), x))
        rows[f"then latency 0.75 {name}"] = {
            "seconds": time.perf_counter() - start, "macs_ratio": other.macs_ratio,
            "rounds": float(len(other.latency.rounds)) if other.latency else float("nan"),
        }  # fmt: skip
        start = time.perf_counter()
        # channel plans narrow the attention with the residual since e105e95 (Plan.attention);
        # "keep" prunes what earlier revisions did, so both sides of --against do the same job
        fields = {f.name for f in dataclasses.fields(gp.Plan)}
        same = {"attention": "keep"} if "attention" in fields else {}
        plan = gp.Plan(ratio=0.5, round_to=1, **same)
        pruner = gp.Pruner(model, plan, x, steps=5, progress=False)
        final = pruner.run()
        checksum = sum(float(t.double().abs().sum()) for t in final.state_dict().values())
        rows[f"pruner 5 steps {name}"] = {
            "seconds": time.perf_counter() - start,
            "macs_ratio": pruner.history[-1].macs / max(count_macs(model, x), 1),
            "checksum": checksum,
        }
        torch.manual_seed(0)
    return rows


def print_workflows(rows: dict[str, dict[str, float]], before: dict[str, Any] | None) -> None:
    extra = f" {'before s':>9} {'MACs':>6} {'rounds':>6} {'speed-up':>8}  same weights"
    print(f"{'workflow':<26} {'seconds':>8} {'MACs':>6} {'rounds':>6}" + (extra if before else ""))
    for name, r in rows.items():
        rounds = f"{r['rounds']:.0f}" if "rounds" in r else "-"
        line = f"{name:<26} {r['seconds']:>8.2f} {r['macs_ratio']:>6.3f} {rounds:>6}"
        if before and name in before:
            b = before[name]
            same = ""
            if "checksum" in r:
                close = abs(r["checksum"] - b["checksum"]) <= 1e-9 * abs(b["checksum"])
                same = "yes" if close else "NO"
            then = f"{b['rounds']:.0f}" if "rounds" in b else "-"
            line += (f" {b['seconds']:>9.2f} {b['macs_ratio']:>6.3f} {then:>6} "
                     f"{b['seconds'] / r['seconds']:>8.2f}  {same}")  # fmt: skip
        print(line)


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


@contextlib.contextmanager
def built_revision(ref: str) -> Iterator[Path]:
    """graphprune as of git revision ``ref`` laid out as installed in a temporary directory
    (``passes/`` and ``models/`` as ``graphprune.passes`` and ``.models``; not by pip: some
    revisions' package lists missed a package): put it on PYTHONPATH and run from elsewhere
    than the checkout, whose editable install is untouched."""
    with tempfile.TemporaryDirectory() as tmp:
        source, site = Path(tmp) / "src", Path(tmp) / "site"
        source.mkdir()
        archive = subprocess.run(
            ["git", "archive", ref], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        shutil.copytree(source / "graphprune", site / "graphprune")
        for sub in ("passes", "models"):
            shutil.copytree(source / sub, site / "graphprune" / sub)
        yield site


def measure_revision(
    ref: str, repeat: int, extra: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """The same measurement with graphprune as of git revision ``ref``."""
    with built_revision(ref) as site:
        env = {**os.environ, "PYTHONPATH": str(site)}
        done = subprocess.run(
            [sys.executable, __file__, "--repeat", str(repeat), "--json-only", *(extra or [])],
            cwd=site.parent,  # not ROOT: the checkout's graphprune must not shadow the built one
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"the run at {ref} failed:\n{done.stderr[-3000:]}")
        out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (median shown)")
    parser.add_argument("--against", help="git revision to compare with")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", action="store_true", help="stage table vs Torch-Pruning")
    parser.add_argument("--only", help="comma-separated model names (with --stages)")
    parser.add_argument("--llama", action="store_true", help="add the 1.1 B LLaMA (--stages)")
    parser.add_argument("--torchvision", action="store_true", help="add torchvision (--stages)")
    parser.add_argument("--out", help="write the --stages/--workflows rows as JSON here")
    parser.add_argument("--workflows", action="store_true", help="latency target and Pruner")
    args = parser.parse_args()
    if args.workflows:
        if args.json_only:
            print(json.dumps(workflow_times()))
            return
        cache = tempfile.mkdtemp()  # one op-latency table cache for both revisions
        os.environ["GRAPHPRUNE_CACHE_DIR"] = cache
        extra = ["--workflows"]
        before = measure_revision(args.against, args.repeat, extra) if args.against else None
        rows = workflow_times()
        print_workflows(rows, before)
        if args.out:
            from graphprune.io import write_text_atomic

            write_text_atomic(Path(args.out), json.dumps({"now": rows, "before": before}))
        return
    if args.stages:
        only = args.only.split(",") if args.only else None
        if args.json_only:
            print(json.dumps(stage_times(only, args.llama, args.torchvision)))
            return
        extra = ["--stages", *(["--torchvision"] if args.torchvision else [])]
        extra += ["--llama"] if args.llama else []
        extra += ["--only", args.only] if args.only else []
        before = measure_revision(args.against, args.repeat, extra) if args.against else None
        rows = stage_times(only, args.llama, args.torchvision)
        print_stages(rows, before)
        if args.out:
            from graphprune.io import write_text_atomic

            write_text_atomic(Path(args.out), json.dumps({"now": rows, "before": before}))
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

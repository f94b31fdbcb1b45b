"""Coverage: does graphprune compile any model a user can run?

Every torchvision classification model, the smallest model of every timm family
(``timm.list_modules()``; the variant with the fewest parameters, counted on the meta device;
families whose smallest model exceeds ``--max-params`` M are skipped with the reason) and every
Hugging Face model type (``--source hf``: each ``AutoModel`` type built small from its default
config by tests/hf_models.py; a type that does not build that way is counted apart, it says
nothing about graphprune), random init, default input size, batch 1 (HF: batch 2):

1. ``gp.compile(model, gp.Plan(ratio=0.5), x)`` (default plan: l2, local, round_to="auto"),
2. the output shape is kept,
3. ``gp.export_onnx(pruned, x, verify=True)``: exported and verified in onnxruntime,
4. MACs kept (< 0.70 counts as "pruned >= 30 %") and the groups frozen by compile's
   relations and freeze-and-retry;
5. HF types also compile at ``granularity="heads"`` and ``"layers"``, and each compile records
   whether ``from_pretrained`` can rebuild the pruned model from its synced config.

Each model runs in its own subprocess (a hang, a crash or a leak stays there) with a time
limit; results are appended to a JSON-lines file, so an interrupted run resumes where it
stopped. Prints one row per model and a summary per source.

    .venv/bin/python benchmarks/coverage.py [--source torchvision,timm] [--out out/coverage.jsonl]
    .venv/bin/python benchmarks/coverage.py --only timm:convit_tiny    # one model, printed
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
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# this folder holds transformers.py (a benchmark): it must not shadow the library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from tests.real_models import declare_torchvision_ops  # noqa: E402


def torchvision_models() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in sorted(torchvision.models.list_models(torchvision.models))]


def timm_families(max_params: float) -> tuple[list[str], dict[str, str]]:
    """The smallest model of each timm family, and the families skipped (with why)."""
    import timm
    import torch

    chosen, skipped = [], {}
    for family in sorted(timm.list_modules()):
        sizes = []
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name)
                sizes.append((sum(p.numel() for p in model.parameters()), name))
            except Exception:  # a variant that needs arguments: try the next
                continue
        if not sizes:
            skipped[family] = "no variant builds with default arguments"
            continue
        params, name = min(sizes)
        if params > max_params * 1e6:
            skipped[family] = f"smallest model {name} has {params / 1e6:.0f} M parameters"
            continue
        chosen.append(f"timm:{name}")
    return chosen, skipped


def build(spec: str) -> tuple[Any, Any]:
    import timm
    import torch
    import torchvision

    source, name = spec.split(":", 1)
    torch.manual_seed(0)
    if source == "hf":
        from tests import hf_models

        model = hf_models.build(name)
        return model, hf_models.example_inputs(model)
    if source == "torchvision":
        kwargs: dict[str, Any] = {}
        if name in ("googlenet", "inception_v3"):
            kwargs = {"aux_logits": False, "init_weights": True}
        model = torchvision.models.get_model(name, **kwargs)
        side = 299 if name == "inception_v3" else 224
        shape = (3, side, side)
    else:
        model = timm.create_model(name)
        if model.num_classes == 0:  # a feature extractor (e.g. DINOv3): give it its classifier
            model = timm.create_model(name, num_classes=1000)
        shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    nonzero_weights(model)
    generator = torch.Generator().manual_seed(0)
    return model.eval(), torch.randn(1, *shape, generator=generator)


def nonzero_weights(model: Any) -> None:
    """Random init zeroes some weights on purpose (timm: classifier heads, the last norm of a
    residual branch); outputs of zeros would make every verification trivially pass."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not name.endswith("bias") and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def hf_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return [f"hf:{t}" for t in sorted(MODEL_MAPPING_NAMES)]


def _call(model: Any, x: Any) -> Any:
    return model(**x) if isinstance(x, dict) else model(x)


def _hf_granularities(gp: Any, model: Any, x: Any, row: dict[str, Any]) -> None:
    """HF: heads and layers too, and whether each config says what was pruned."""
    row["config_expressible"] = {"channels": row.get("expressible")}
    for granularity in ("heads", "layers"):
        try:
            pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity=granularity), x)
            report = gp.report(pruned)
            row[f"{granularity}_macs_kept"] = report.macs_ratio
            row["config_expressible"][granularity] = (report.config or {}).get("expressible")
        except Exception as exc:
            row[f"{granularity}_error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"


def run_one(spec: str) -> dict[str, Any]:
    """Compile, check, export and verify one model; every step's outcome."""
    import torch

    import graphprune as gp

    torch.set_flush_denormal(True)
    row: dict[str, Any] = {"model": spec, "compiled": False, "verified": False}
    start = time.perf_counter()
    stage = "build"
    try:
        model, x = build(spec)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        stage = "compile"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = gp.compile(model, gp.Plan(ratio=0.5), x)
        report = gp.report(pruned)
        row["expressible"] = (report.config or {}).get("expressible")
        row.update(
            compiled=True,
            compile_s=time.perf_counter() - start,
            macs_kept=report.macs_ratio,
            params_kept=report.params_ratio,
            frozen=len(report.frozen),
            frozen_reasons=[f.reason[:300] for f in report.frozen[:5]],
            units=len(report.units),
        )
        stage = "run"
        with torch.no_grad():
            reference = _call(model, x)
            same_shape = _shape(_call(pruned, x)) == _shape(reference)
        row["shape_kept"] = same_shape
        row["output_std"] = float(_first_tensor(reference).float().std())
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = gp.export_onnx(pruned, x, Path(tmp) / "m.onnx", verify=True)
        row["verified"] = True
        row["max_abs_error"] = exported.verification.max_abs if exported.verification else None
        if spec.startswith("hf:"):
            stage = "granularities"
            _hf_granularities(gp, model, x, row)
    except Exception as exc:
        row["failed_at"] = stage
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:800]}"
        row["where"] = traceback.format_exc().strip().splitlines()[-3:-1]
    row["seconds"] = time.perf_counter() - start
    return row


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = list(out.values()) if isinstance(out, dict) else list(out)
    return next(v for v in values if isinstance(v, torch.Tensor))


def _shape(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shape(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return [_shape(v) for v in out]
    return None


def _not_runnable(row: dict[str, Any]) -> bool:
    """Built or fed wrongly by this benchmark (HF: a type wanting two inputs), which says
    nothing about graphprune: compile rejected inputs the model itself does not run on."""
    return row.get("failed_at") == "build" or str(row.get("error", "")).startswith(
        "InputError: the model does not run on the example inputs"
    )


def summary(rows: list[dict[str, Any]], label: str) -> list[str]:
    n = len(rows)
    if not n:
        return []

    def pct(k: int) -> str:
        return f"{k}/{n} ({100 * k / n:.0f} %)"

    unbuilt = [r for r in rows if _not_runnable(r)]
    rows = [r for r in rows if not _not_runnable(r)]
    n = len(rows)
    compiled = [r for r in rows if r["compiled"]]
    trivial = [r for r in compiled if r.get("output_std", 1.0) == 0.0]
    pruned = [r for r in compiled if r.get("macs_kept", 1.0) < 0.999]
    good = [r for r in rows if r["verified"] and r.get("shape_kept") and r["macs_kept"] <= 0.70]
    lines = [
        f"{label}: {n} models"
        + (
            f" ({len(unbuilt)} more did not build or run from a small default config and one "
            "main input: multimodal, encoder-decoder)"
            if unbuilt
            else ""
        ),
        f"  compiled            {pct(len(compiled))}",
        f"  something pruned    {pct(len(pruned))}",
        f"  output shape kept   {pct(sum(1 for r in compiled if r.get('shape_kept')))}",
        f"  exported + verified {pct(sum(1 for r in rows if r['verified']))}",
        f"  all of that and >= 30 % of MACs pruned: {pct(len(good))}",
    ]
    if compiled:
        lines.append(
            f"  median MACs kept {statistics.median(r['macs_kept'] for r in compiled):.3f}; "
            f"median groups frozen {statistics.median(r['frozen'] for r in compiled):.0f}; "
            f"median compile {statistics.median(r['compile_s'] for r in compiled):.1f} s"
        )
    if label == "hf" and compiled:
        for g in ("channels", "heads", "layers"):
            done = [r for r in compiled if g in r.get("config_expressible", {})]
            says = sum(1 for r in done if r["config_expressible"][g])
            lines.append(
                f"  {g:<8} compiled {len(done)}/{len(compiled)}; config rebuilds it "
                f"(from_pretrained) {says}/{len(done)}"
            )
    lines += [
        f"  trivial (all-zero) output, verification says little: {r['model']}" for r in trivial
    ]
    for r in rows:
        if not r["compiled"] or not r["verified"] or not r.get("shape_kept"):
            lines.append(
                f"  FAILED {r['model']} at {r.get('failed_at')}: {r.get('error', '')[:300]}"
            )
        elif r["macs_kept"] > 0.70:
            why = "; ".join(r.get("frozen_reasons", [])[:1])
            lines.append(f"  <30 % {r['model']}: MACs kept {r['macs_kept']:.2f} {why[:200]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="torchvision,timm")
    parser.add_argument("--out", default="out/coverage.jsonl")
    parser.add_argument("--max-params", type=float, default=120.0, help="skip above (M)")
    parser.add_argument("--timeout", type=int, default=1500, help="seconds per model")
    parser.add_argument("--only", help="run one model (e.g. timm:convit_tiny) and print it")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    args = parser.parse_args()
    declare_torchvision_ops()
    if args.only:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.only)))
        return
    specs, skipped = [], {}
    if "torchvision" in args.source:
        specs += torchvision_models()
    if "timm" in args.source:
        chosen, skipped = timm_families(args.max_params)
        specs += chosen
    if "hf" in args.source.split(","):
        specs += hf_types()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[row["model"]] = row
    for spec in specs:
        if spec in done:
            continue
        command = [sys.executable, __file__, "--only", spec, "--threads", str(args.threads)]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT
            )
            lines = [x for x in result.stdout.splitlines() if x.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "model": spec, "compiled": False, "verified": False, "failed_at": "process",
                "error": (result.stderr.strip().splitlines() or ["no output"])[-1][:500],
            }  # fmt: skip
        except subprocess.TimeoutExpired:
            row = {"model": spec, "compiled": False, "verified": False, "failed_at": "timeout",
                   "error": f"over {args.timeout} s"}  # fmt: skip
        done[spec] = row
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        status = (
            f"MACs kept {row['macs_kept']:.3f}, frozen {row['frozen']}, "
            f"{'verified' if row['verified'] else 'NOT verified: ' + row.get('error', '')[:160]}"
            if row["compiled"]
            else f"FAILED at {row.get('failed_at')}: {row.get('error', '')[:200]}"
        )
        print(f"{spec:<44} {row.get('seconds', 0):6.1f}s  {status}", flush=True)
    for source in args.source.split(","):
        rows = [done[s] for s in specs if s.startswith(source + ":")]
        print("\n".join(summary(rows, source)))
    for family, why in sorted(skipped.items()):
        print(f"  skipped timm family {family}: {why}")


if __name__ == "__main__":
    main()

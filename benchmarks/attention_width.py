"""Channel plans on transformers, with the attention narrowed (``Plan.attention="auto"``, the
default) and left whole (``"keep"``, the behaviour before): MACs kept and the measured
onnxruntime speed-up of each, side by side in one process.

Cases: the zoo ViT, torchvision ViT-B/16 and Swin-T (224 px), timm ViT-Ti/16 and ViT-S/16
(224 px), and the Hugging Face BERT, GPT-2, LLaMA and ViT of ``benchmarks/transformers.py``;
random init, batch 1, ``Plan(ratio=0.5)`` (``round_to`` auto), 2 threads, interleaved runs.

    .venv/bin/python benchmarks/attention_width.py [--runs 20] [--only vit_b_16,bert]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))
from tests.real_models import declare_torchvision_ops  # noqa: E402

declare_torchvision_ops()

import graphprune as gp  # noqa: E402
from graphprune.io import write_text_atomic  # noqa: E402

Case = Callable[[], tuple[nn.Module, Any]]


def _image(side: int = 224) -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)),)


def _torchvision(name: str) -> Case:
    def build() -> tuple[nn.Module, Any]:
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.get_model(name).eval(), _image()

    return build


def _timm(name: str) -> Case:
    def build() -> tuple[nn.Module, Any]:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name).eval(), _image()

    return build


def _zoo_vit() -> tuple[nn.Module, Any]:
    from graphprune.models import MODELS

    spec = MODELS["vit"]
    return spec.build(), spec.example_inputs()


def _hf(name: str) -> Case:
    def build() -> tuple[nn.Module, Any]:
        path = ROOT / "benchmarks" / "transformers.py"
        spec = importlib.util.spec_from_file_location("hf_benchmark", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        make, x = module.models()[name]
        torch.manual_seed(0)
        return make().eval(), x

    return build


CASES: dict[str, Case] = {
    "zoo vit": _zoo_vit,
    "vit_b_16": _torchvision("vit_b_16"),
    "swin_t": _torchvision("swin_t"),
    "vit_tiny_patch16_224": _timm("vit_tiny_patch16_224"),
    "vit_small_patch16_224": _timm("vit_small_patch16_224"),
    "bert": _hf("bert"),
    "gpt2": _hf("gpt2"),
    "llama": _hf("llama"),
    "vit (hf)": _hf("vit"),
}


def measure(name: str, runs: int) -> dict[str, Any]:
    model, x = CASES[name]()
    row: dict[str, Any] = {"model": name}
    for attention in ("auto", "keep"):
        pruned = gp.compile(model, gp.Plan(ratio=0.5, attention=attention), x)
        report = gp.report(pruned)
        with tempfile.TemporaryDirectory() as tmp:
            exported = gp.export_onnx(
                pruned, x, Path(tmp) / "pruned.onnx", baseline=model, bench_runs=runs
            )
        assert exported.latency is not None and exported.verification is not None
        kinds = sorted({g.kind for g in report.groups if g.kind != "channels"})
        row[attention] = {
            "macs_ratio": report.macs_ratio,
            "speedup": exported.latency.results[0].speedup,
            "attention": ", ".join(kinds) or "-",
            "max_abs_error": exported.verification.max_abs,
            "config": None if report.config is None else report.config["expressible"],
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--json")
    args = parser.parse_args()
    print(
        "Plan(ratio=0.5), attention 'auto' (default) vs 'keep'; onnxruntime CPU, 2 threads, "
        f"{args.runs} interleaved runs, batch 1"
    )
    print(
        f"{'model':<24} {'pruned in attention':<22} {'MACs':>5} {'speed-up':>8} | "
        f"{'MACs keep':>9} {'speed-up':>8} | from_pretrained"
    )
    rows = []
    for name in args.only.split(","):
        row = measure(name, args.runs)
        rows.append(row)
        auto, keep = row["auto"], row["keep"]
        config = "" if auto["config"] is None else f"{auto['config']} (keep: {keep['config']})"
        print(
            f"{name:<24} {auto['attention']:<22} {auto['macs_ratio']:>5.2f} "
            f"{auto['speedup']:>7.2f}x | {keep['macs_ratio']:>9.2f} {keep['speedup']:>7.2f}x | "
            f"{config}",
            flush=True,
        )
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

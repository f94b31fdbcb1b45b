"""Hugging Face models pruned by graphprune: params, MACs, measured onnxruntime speed-up.

BERT (sequence classification), GPT-2 (LM head), LLaMA (GQA: 8 query / 4 kv heads, RMSNorm,
SwiGLU, rotary) and ViT (image classification), built from random configs (no download) at a
width where timing means something (hidden 256, 4 layers, 128 tokens / 64 patches). Each is
pruned 50 % at channel, head and layer granularity; the original and the pruned model are
exported to ONNX (KV cache off), verified against torch, and timed side by side in onnxruntime
(2 threads, interleaved runs, batch 1). Also printed: whether ``save_pretrained`` /
``from_pretrained`` can rebuild the pruned model from its synced config. ``--types`` adds the
fifteen types of tests/test_hf_types.py, built from their default configs by role at width
256 (2 layers), at each granularity they have.

    .venv/bin/python benchmarks/transformers.py [--runs 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphprune as gp
from graphprune.io import write_text_atomic


def _import_transformers() -> Any:
    """The library, not this file: run as a script, this file's folder is first on sys.path
    and its name is ``transformers`` too (the name the issue asked for)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    return importlib.import_module("transformers")


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # tests.* (after the library: see _import_transformers)
from tests.real_models import declare_torchvision_ops  # noqa: E402

declare_torchvision_ops()  # transformers imports torchvision where it is installed
tf = _import_transformers()
tf.logging.set_verbosity_error()
TOKENS = 128
GRANULARITIES = ("channels", "heads", "layers")


def models() -> dict[str, tuple[Callable[[], nn.Module], dict[str, torch.Tensor]]]:
    ids = {"input_ids": torch.randint(0, 1000, (1, TOKENS))}
    common = {"vocab_size": 1000, "max_position_embeddings": 256}
    return {
        "bert": (
            lambda: tf.BertForSequenceClassification(
                tf.BertConfig(
                    hidden_size=256,
                    num_hidden_layers=4,
                    num_attention_heads=4,
                    intermediate_size=1024,
                    num_labels=2,
                    **common,
                )
            ),
            {**ids, "attention_mask": torch.ones(1, TOKENS, dtype=torch.long)},
        ),
        "gpt2": (
            lambda: tf.GPT2LMHeadModel(
                tf.GPT2Config(vocab_size=1000, n_positions=256, n_embd=256, n_layer=4, n_head=4)
            ),
            ids,
        ),
        "llama": (
            lambda: tf.LlamaForCausalLM(
                tf.LlamaConfig(
                    hidden_size=256,
                    intermediate_size=688,
                    num_hidden_layers=4,
                    num_attention_heads=8,
                    num_key_value_heads=4,
                    **common,
                )
            ),
            ids,
        ),
        "vit": (
            lambda: tf.ViTForImageClassification(
                tf.ViTConfig(
                    image_size=64,
                    patch_size=8,
                    hidden_size=256,
                    num_hidden_layers=4,
                    num_attention_heads=4,
                    intermediate_size=1024,
                    num_labels=10,
                )
            ),
            {"pixel_values": torch.randn(1, 3, 64, 64)},
        ),
    }


def sampled_types() -> dict[str, tuple[Callable[[], nn.Module], dict[str, torch.Tensor]]]:
    """The types tests/test_hf_types.py checks, built from their default configs by role
    (tests/hf_models.py) at width 256, 2 layers, batch 1."""
    from tests import hf_models

    found: dict[str, tuple[Callable[[], nn.Module], dict[str, torch.Tensor]]] = {}
    for model_type, (head, _) in hf_models.SAMPLE.items():

        def build(t: str = model_type, h: str = head) -> nn.Module:
            return hf_models.build(t, h, scale=4)

        found[model_type] = (build, hf_models.example_inputs(build(), batch=1))
    return found


def measure(
    name: str, granularity: str, runs: int, build: Callable[[], nn.Module], x: Any
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().eval()
    plan = gp.Plan(ratio=0.5, granularity=granularity)
    try:
        pruned = gp.compile(model, plan, x)
    except gp.PruneError as exc:  # nothing the config can state: measured with any widths
        if "config='free'" not in str(exc):
            raise
        pruned = gp.compile(model, dataclasses.replace(plan, config="free"), x)
    report = gp.report(pruned)
    with tempfile.TemporaryDirectory() as tmp:
        exported = gp.export_onnx(
            pruned, x, Path(tmp) / "pruned.onnx", baseline=model, bench_runs=runs
        )
    assert exported.latency is not None and exported.verification is not None
    result = exported.latency.results[0]
    return {
        "model": name,
        "granularity": granularity,
        "params": (report.params_before, report.params_after),
        "macs_ratio": report.macs_ratio,
        "ideal": 1 / report.macs_ratio,
        "speedup": result.speedup,
        "ms": (result.baseline.median_ms, result.pruned.median_ms),
        "max_abs_error": exported.verification.max_abs,
        "config": report.config["changes"],
        "from_pretrained": report.config["expressible"],
        "config_mode": report.config["mode"],
    }


def _loads(row: dict[str, Any]) -> str:
    if row["from_pretrained"]:
        return "yes"
    return "free (gp.save)" if row.get("config_mode") == "free" else "no (gp.save)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json")
    parser.add_argument(
        "--types", action="store_true", help="also the sampled types of tests/test_hf_types.py"
    )
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(
        f"50 % pruned; onnxruntime CPU, 2 threads, {args.runs} interleaved runs, batch 1, "
        f"{TOKENS} tokens (ViT: 64 patches)"
    )
    print(
        f"{'model':<18} {'plan':<9} {'params M':>13} {'MACs':>5} {'ideal':>6} {'measured':>8} "
        f"{'ms':>13} {'max |Δ|':>8}  from_pretrained  config"
    )
    rows = []
    cases = [(name, g, *spec) for name, spec in models().items() for g in GRANULARITIES]
    if args.types:
        from tests import hf_models

        cases += [
            (name, g, *spec)
            for name, spec in sampled_types().items()
            for g in hf_models.SAMPLE[name][1]
        ]
    for name, granularity, build, x in cases:
        try:
            r = measure(name, granularity, args.runs, build, x)
        except Exception as exc:  # a benchmark row, not a crash: say what failed
            print(f"{name:<18} {granularity:<9} FAILED {type(exc).__name__}: {exc}"[:300])
            continue
        rows.append(r)
        before, after = r["params"]
        print(
            f"{name:<18} {granularity:<9} {before / 1e6:>5.2f} -> {after / 1e6:>4.2f} "
            f"{r['macs_ratio']:>5.2f} {r['ideal']:>5.2f}x {r['speedup']:>7.2f}x "
            f"{r['ms'][0]:>5.2f} -> {r['ms'][1]:>4.2f} {r['max_abs_error']:>8.1e}  "
            f"{_loads(r):<15}  "
            f"{', '.join(f'{k}={v}' for k, v in r['config'].items())}",
            flush=True,
        )
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

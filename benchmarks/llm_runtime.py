"""LLM speed where LLMs run on CPUs: onnxruntime-genai, original vs pruned, side by side.

1. A LLaMA-style causal LM (``--scale 1b``: TinyLlama's shape, hidden 2048, 22 layers, 32/4
   heads, FFN 5632, vocab 32000; 1.1 B parameters, random init, float32) is saved once with
   ``save_pretrained`` beside a byte-level BPE tokenizer trained on the standard library's
   source (tests/genai.py).
2. Per ratio (0.25 and 0.5): loaded from that directory and pruned in place with graphprune's
   channel plan -- hidden and FFN channels, and with them whole heads (GQA: kv heads with
   their query heads) -- into a standard smaller LLaMA whose config states it (the report must
   say synced), saved.
3. Each directory is converted by onnxruntime-genai's model builder (fp32, CPU).
4. In one process, interleaved (each repetition runs every model once): prefill (``--prompt``
   tokens in, first token out) and decode (``--new`` more tokens) with greedy search; the
   median of ``--repeats``. The pruned models' greedy tokens are compared with transformers'
   ``generate`` of the same pruned weights.
5. Next to it, what graphprune's own ONNX export measures: each model exported with
   ``graphprune.onnx.export`` and one forward over the prompt timed in onnxruntime against
   the original's (``graphprune.onnx.bench``, interleaved).

    .venv/bin/python benchmarks/llm_runtime.py [--scale 1b|tiny] [--work /tmp/llm_runtime]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# this folder holds transformers.py (a benchmark): it must not shadow the library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from graphprune.models.llm import LLAMA_SHAPES  # noqa: E402 (after the path is set)

SHAPES = {k: LLAMA_SHAPES[k] for k in ("1b", "tiny")}
TOKENIZER_VOCAB = 4096  # ids above it are never produced by the tokenizer; the model has them


def save_original(work: Path, scale: str) -> Path:
    """The random-init model and its tokenizer in ``work/original`` (made once)."""
    from tests import genai, hf_models

    target = work / "original"
    if (target / "config.json").exists():
        return target
    tf = hf_models.transformers()
    torch = sys.modules["torch"]
    torch.manual_seed(0)
    config = tf.LlamaConfig(**SHAPES[scale], max_position_embeddings=2048, bos_token_id=0,
                            eos_token_id=1)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(target)
    genai.byte_bpe_tokenizer(TOKENIZER_VOCAB).save_pretrained(target)
    return target


def prune(original: Path, ratio: float, work: Path) -> tuple[Path, dict[str, Any]]:
    """Hidden and FFN channels and heads at ``ratio``, in place; saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    import graphprune as gp

    target = work / f"pruned_{ratio}"
    model = LlamaForCausalLM.from_pretrained(original).eval()
    x = {"input_ids": torch.randint(2, TOKENIZER_VOCAB, (1, 20))}
    params_before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    # one channel plan: hidden and FFN channels, and whole heads with the hidden size
    # (Plan.attention "auto"), so hidden / heads stays the head size the config states
    plan = gp.Plan(ratio=ratio)
    model = gp.compile(model, plan, x, inplace=True)
    config = gp.report(model).config
    if config is None or not config.expressible:
        raise SystemExit(f"{plan}: the config is not synced: {config and config.reason}")
    steps = [config.changes]
    seconds = time.perf_counter() - start
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(original).save_pretrained(target)
    row = {
        "compile_s": seconds, "config": {k: v for s in steps for k, v in s.items()},
        "params": [params_before, sum(p.numel() for p in model.parameters())],
    }  # fmt: skip
    return target, row


def onnx_exports(dirs: dict[str, Path], work: Path, prompt: list[int]) -> dict[str, Path]:
    """graphprune's ONNX export of each model (one forward over ``prompt``, no KV cache)."""
    import torch
    from transformers import LlamaForCausalLM

    from graphprune.onnx.export import export

    files = {}
    for name, directory in dirs.items():
        model = LlamaForCausalLM.from_pretrained(directory).eval()
        model.config.use_cache = False
        files[name] = work / "gp_onnx" / name / "model.onnx"
        export(model, {"input_ids": torch.tensor([prompt])}, files[name])
        del model
        gc.collect()
    return files


def measure_genai(
    built: dict[str, Path], prompt: list[int], new: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Prefill and decode tokens/s per model, interleaved, medians; the greedy tokens."""
    import onnxruntime_genai as og

    from tests import genai

    models = {name: og.Model(str(path)) for name, path in built.items()}
    for model in models.values():  # warm-up
        genai.greedy(model, prompt, 4)
    runs: dict[str, list[genai.Timed]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(genai.greedy(model, prompt, new))
    return {
        name: {
            "prefill_tok_s": len(prompt) / statistics.median(r.prefill_s for r in timed),
            "decode_tok_s": (new - 1) / statistics.median(r.decode_s for r in timed),
            "tokens": timed[0].tokens,
        }
        for name, timed in runs.items()
    }


def measure_export(files: dict[str, Path], prompt: list[int]) -> dict[str, float]:
    """Per pruned model: its forward latency over the original's in onnxruntime."""
    import numpy as np

    from graphprune.onnx.bench import benchmark

    def feeds(loaded: Any, batch: int) -> dict[str, Any]:
        return {"input_ids": np.array([prompt] * batch, dtype=np.int64)}

    ratios = {}
    for name, path in files.items():
        if name == "original":
            continue
        found = benchmark(files["original"], path, feeds, batch_sizes=(1,) * 3, runs=10)
        ratios[name] = statistics.median(
            r.pruned.median_ms / r.baseline.median_ms for r in found.results
        )
    return ratios


def transformers_tokens(directory: Path, prompt: list[int], new: int) -> list[int]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return [int(t) for t in out[0, len(prompt) :]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--work", default="/tmp/llm_runtime")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="generated tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

    from tests.real_models import declare_torchvision_ops

    declare_torchvision_ops()
    import torch  # noqa: F401  (save_original reads it from sys.modules)
    from transformers import AutoTokenizer

    from tests import genai

    work = Path(args.work) / args.scale
    work.mkdir(parents=True, exist_ok=True)
    dirs = {"original": save_original(work, args.scale)}
    rows: dict[str, dict[str, Any]] = {"original": {}}
    for ratio in (float(r) for r in args.ratios.split(",")):
        dirs[f"pruned {ratio}"], rows[f"pruned {ratio}"] = prune(dirs["original"], ratio, work)
        rows["original"]["params"] = [rows[f"pruned {ratio}"]["params"][0]] * 2
        gc.collect()
    tokenizer = AutoTokenizer.from_pretrained(dirs["original"])
    prompt = tokenizer(genai.stdlib_text(8 * args.prompt)).input_ids[: args.prompt]
    built = {}
    for name, directory in dirs.items():
        built[name] = work / "genai" / name.replace(" ", "_")
        shutil.rmtree(built[name], ignore_errors=True)
        rows[name]["build_s"] = genai.build(directory, built[name])
    genai_rows = measure_genai(built, prompt, args.new, args.repeats)
    for name, directory in dirs.items():
        rows[name].update(genai_rows[name])
        if name != "original":
            rows[name]["same_tokens"] = genai_rows[name]["tokens"] == transformers_tokens(
                directory, prompt, args.new
            )
    export_ratio = measure_export(onnx_exports(dirs, work, prompt), prompt)
    for name, ratio in export_ratio.items():
        rows[name]["export_latency_ratio"] = ratio
    print_table(rows, args)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    base = rows["original"]
    print(f"LLaMA-style {args.scale} (fp32), onnxruntime-genai CPU, prompt {args.prompt} tokens, "
          f"{args.new} generated, median of {args.repeats} interleaved runs")  # fmt: skip
    print(f"{'model':<14} {'params':>8} {'prefill tok/s':>14} {'x':>6} {'decode tok/s':>13} "
          f"{'x':>6} {'1/params':>9} {'gp ONNX x':>10} {'same tokens':>12}")  # fmt: skip
    for name, row in rows.items():
        params = row["params"][1]
        params_ratio = row["params"][1] / row["params"][0]
        export = row.get("export_latency_ratio")
        print(
            f"{name:<14} {_count(params):>8} {row['prefill_tok_s']:>14.1f} "
            f"{row['prefill_tok_s'] / base['prefill_tok_s']:>6.2f} {row['decode_tok_s']:>13.1f} "
            f"{row['decode_tok_s'] / base['decode_tok_s']:>6.2f} {1 / params_ratio:>9.2f} "
            f"{(1 / export) if export else 1.0:>10.2f} {row.get('same_tokens', '-')!s:>12}"
        )
    for name, row in rows.items():
        if "config" in row:
            print(f"  {name}: config {row['config']}, compile {row['compile_s']:.1f} s")


if __name__ == "__main__":
    main()

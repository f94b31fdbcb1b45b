"""Streaming does not change one-shot quality: a trained byte-level LLaMA-shaped model pruned from
its checkpoint, block by block, against the same plan compiled in memory.

A ``LlamaForCausalLM`` with a byte vocabulary (256; width 192, 4 layers, 4 heads, FFN 512,
~1.9 M parameters, the size of the one-shot benchmark's GPT) is trained for ``--steps`` AdamW
steps on the source files of Python's standard library (the corpus, windows and validation
split of ``benchmarks/oneshot.py``), saved with ``save_pretrained``, and pruned two ways with
each plan -- 2:4 and unstructured 50 % SparseGPT, 2:4 wanda and 2:4 magnitude -- on 128 training
windows of 128 bytes:

* in memory: ``graphprune.compile(model, plan, calibration=...)`` then ``finalize``;
* streamed: ``graphprune.compile_checkpoint(src, plan, dst, calibration=...)`` and
  ``from_pretrained(dst)``.

Printed per plan: whether the masks (the zero patterns) and the weights are identical, and the
validation perplexity (64 fixed windows) of both against the dense model's.

    .venv/bin/python benchmarks/streamed_oneshot.py [--steps 600] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# this folder holds transformers.py (a benchmark): import the library before adding it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from tests.real_models import declare_torchvision_ops  # noqa: E402

declare_torchvision_ops()
import torch  # noqa: E402
import transformers as tf  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.io import write_text_atomic  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))
from oneshot import perplexity as byte_perplexity  # noqa: E402
from oneshot import stdlib_corpus, train_gpt, windows  # noqa: E402

PLANS = {
    "2:4 SparseGPT": gp.Plan(granularity="n:m", nm=[2, 4], reconstruct=True),
    "50% SparseGPT": gp.Plan(granularity="unstructured", ratio=0.5, reconstruct=True),
    "2:4 wanda": gp.Plan(granularity="n:m", nm=[2, 4], importance="wanda"),
    "2:4 magnitude": gp.Plan(granularity="n:m", nm=[2, 4], importance="l1"),
}


def byte_llama() -> Any:
    config = tf.LlamaConfig(
        vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config)


class Logits(torch.nn.Module):
    """The model's logits as a tensor (the one-shot benchmark's training loop and perplexity
    take a model that returns them)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(ids, use_cache=False).logits
        return out


def compare(memory: Any, streamed: Any) -> dict[str, Any]:
    """Masks (zero patterns) and weights of two models, tensor by tensor."""
    a, b = memory.state_dict(), streamed.state_dict()
    masks = all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
    weights = all(torch.equal(a[k], b[k]) for k in a)
    gap = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return {"masks_equal": masks, "weights_equal": weights, "max_abs_diff": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--corpus-mb", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    train_bytes, val_bytes, files = stdlib_corpus(args.corpus_mb * 1_000_000)
    model = byte_llama()
    start = time.perf_counter()
    train_gpt(Logits(model), train_bytes, args.steps)  # the one-shot benchmark's loop
    val = windows(val_bytes, 64, 128, seed=123456)
    dense = byte_perplexity(Logits(model), val)
    lines = [
        f"byte-level LLaMA, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"{args.steps} steps on {files} stdlib files in {time.perf_counter() - start:.0f} s; "
        f"dense validation perplexity {dense:.4f}",
        f"{'plan':<16} {'masks':>6} {'weights':>8} {'ppl memory':>11} {'ppl streamed':>13} "
        f"{'diff':>8} {'stream s':>9}",
    ]
    print("\n".join(lines), flush=True)
    calibration = [(w,) for w in windows(train_bytes, 128, 128, seed=999)[:, :-1].split(8)]
    example = (val[:1, :-1],)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        model.save_pretrained(src)
        for i, (label, plan) in enumerate(PLANS.items()):
            memory = gp.finalize(gp.compile(model, plan, example, calibration=calibration))
            start = time.perf_counter()
            gp.compile_checkpoint(src, plan, Path(tmp) / f"dst{i}", example_inputs=example,
                                  calibration=calibration, progress=False)  # fmt: skip
            seconds = time.perf_counter() - start
            streamed = tf.LlamaForCausalLM.from_pretrained(Path(tmp) / f"dst{i}").eval()
            found = compare(memory, streamed)
            ppl = byte_perplexity(Logits(memory), val), byte_perplexity(Logits(streamed), val)
            diff = abs(ppl[1] - ppl[0]) / ppl[0]
            rows.append({"plan": label, **found, "ppl_memory": ppl[0], "ppl_streamed": ppl[1],
                         "relative_diff": diff, "streamed_s": seconds})  # fmt: skip
            line = (f"{label:<16} {'same' if found['masks_equal'] else 'DIFF':>6} "
                    f"{'same' if found['weights_equal'] else 'DIFF':>8} {ppl[0]:>11.4f} "
                    f"{ppl[1]:>13.4f} {diff:>8.2%} {seconds:>9.1f}")  # fmt: skip
            lines.append(line)
            print(line, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"dense_perplexity": dense, "steps": args.steps, "rows": rows}
    write_text_atomic(out / "streamed_oneshot.json", json.dumps(result, indent=1))
    write_text_atomic(out / "streamed_oneshot.txt", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

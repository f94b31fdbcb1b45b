"""onnxruntime-genai for tests and benchmarks: a tokenizer, the model builder, greedy decoding.

The builder reads a ``save_pretrained`` directory that also holds a tokenizer; a byte-level
BPE trained with ``tokenizers`` on the standard library's own source (on every machine, no
download) serves. The builder imports transformers, which imports torchvision: it runs in a
subprocess that declares torchvision's op schemas first (tests/real_models.py).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_BUILDER = f"""
import runpy, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.real_models import declare_torchvision_ops
declare_torchvision_ops()
sys.path.remove({str(ROOT)!r})
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def byte_bpe_tokenizer(vocab_size: int, files: int = 60) -> Any:
    """A transformers fast tokenizer: byte-level BPE trained on ``files`` stdlib modules,
    ``<s>`` = 0 and ``</s>`` = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in sources], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def stdlib_text(chars: int) -> str:
    """``chars`` characters of the standard library's source (a prompt)."""
    return Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:chars]


def build(hf_dir: Path, out_dir: Path, precision: str = "fp32") -> float:
    """onnxruntime-genai's model builder on ``hf_dir`` (CPU); the seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _BUILDER, "-i", str(hf_dir), "-o", str(out_dir),
         "-p", precision, "-e", "cpu", "-c", str(out_dir / ".cache")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the onnxruntime-genai builder failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


@dataclass
class Timed:
    tokens: list[int]
    prefill_s: float  # the prompt in, the first token's logits out
    decode_s: float  # every later token


def greedy(model: Any, prompt: list[int], new_tokens: int) -> Timed:
    """Greedy decoding of ``new_tokens`` after ``prompt`` in an ``og.Model``, timed."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    tokens = [int(generator.get_next_tokens()[0])]
    prefilled = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return Timed(tokens, prefilled - start, time.perf_counter() - prefilled)

"""A pruned causal LM runs in onnxruntime-genai, the runtime LLMs are deployed in on CPUs.

Its model builder reads nothing but the ``save_pretrained`` directory (config, weights,
tokenizer), so this checks the config claim the way a deployment relies on it: a LLaMA pruned
by a channel plan (hidden and FFN channels, and with them whole heads -- GQA: kv heads with
their query heads) is converted by the builder and generates the same greedy tokens as the
pruned model in transformers. The speed side is ``benchmarks/llm_runtime.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graphprune as gp
from tests import genai, hf_models

og = pytest.importorskip("onnxruntime_genai")


def test_heads_and_channels_pruned_llama_generates_the_same_in_onnxruntime_genai(
    tmp_path: Path,
) -> None:
    tf = hf_models.transformers()
    tokenizer = genai.byte_bpe_tokenizer(vocab_size=384, files=20)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=384, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    x = {"input_ids": torch.randint(2, 384, (2, 16))}
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)  # heads go with the width
    assert gp.report(pruned).config.expressible, gp.report(pruned).config.reason
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    assert (pruned.config.hidden_size, pruned.config.intermediate_size) == (64, 128)

    pruned.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    genai.build(tmp_path / "hf", tmp_path / "onnx")
    prompt = tokenizer(genai.stdlib_text(120)).input_ids
    expected = pruned.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    found = genai.greedy(og.Model(str(tmp_path / "onnx")), prompt, 12)
    assert found.tokens == expected[0, len(prompt) :].tolist()

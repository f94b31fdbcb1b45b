"""Language-model shapes the benchmarks build at random init (config fields of LlamaConfig)."""

from __future__ import annotations

LLAMA_SHAPES: dict[str, dict[str, int]] = {
    # LLaMA-3.1-8B
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    # TinyLlama: 1.1 B parameters
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    # a few M parameters, for a quick run
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096},
}  # fmt: skip

"""Hugging Face models of any type, small and randomly initialised, for tests and benchmarks.

A type's default config is shrunk by *role*, not by a per-type table: every int field of the
default config whose name is one of the spellings below (``hidden_size``/``d_model``/``n_embd``
...) takes the small value of its role, and everything else stays the default. The model is
the type's base model (``AutoModel``) unless a head class is asked for; its example input is
made from its ``main_input_name`` (token ids, pixel values, audio features).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

# role -> (small value, the field names that play it across transformers' configs)
ROLES: dict[str, tuple[int, tuple[str, ...]]] = {
    "width": (64, ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")),
    "ffn": (
        128,
        (
            "intermediate_size",
            "d_ff",
            "ffn_dim",
            "n_inner",
            "encoder_ffn_dim",
            "hidden_dim",
            "ffn_hidden_size",
        ),
    ),
    "layers": (2, ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers")),
    "heads": (
        4,
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads"),
    ),
    "kv_heads": (2, ("num_key_value_heads", "multi_query_group_num", "num_kv_heads")),
    "head_dim": (16, ("head_dim", "d_kv", "attention_head_size", "rotary_dim")),
    "vocab": (128, ("vocab_size",)),
    "positions": (128, ("max_position_embeddings", "n_positions", "max_source_positions")),
    "image": (64, ("image_size",)),
    "patch": (8, ("patch_size",)),
}
TOKENS = 16

# type -> (class to build, {granularity: what Plan(ratio=0.5) gives at that granularity}):
# True: the config states the pruned model (from_pretrained rebuilds it exactly); False: it
# compiles and the report says why the config cannot state it; REFUSED: the default
# Plan(config="expressible") finds nothing the config can state and refuses with the reason
# (config="free" prunes it, reported). Absent: the granularity does not apply.
REFUSED = "refused"
SAMPLE: dict[str, tuple[str, dict[str, bool | str]]] = {
    "qwen3": ("AutoModelForCausalLM", {"channels": True, "heads": True, "layers": True}),
    # reads config.head_dim with a default (hidden / heads): the sync writes it
    "qwen2": ("AutoModelForCausalLM", {"channels": True, "heads": True, "layers": True}),
    "mistral": ("AutoModelForCausalLM", {"channels": True, "heads": True, "layers": True}),
    # channels take whole heads with the hidden size (hidden / heads stays the head size);
    # a heads plan alone changes the head size, which these configs derive
    "opt": ("AutoModelForCausalLM", {"channels": True, "heads": REFUSED, "layers": True}),
    "roberta": ("AutoModel", {"channels": True, "heads": REFUSED, "layers": True}),
    # heads folded into the batch dim of bmm (found: channels no longer cut q/k/v's head_dim
    # where the config states hidden / heads)
    "deberta-v2": ("AutoModel", {"channels": True, "heads": REFUSED, "layers": True}),
    # a relative-position bias table (buckets x heads) added to the scores in place
    "mpnet": ("AutoModel", {"channels": True, "heads": REFUSED, "layers": True}),
    "gemma2": ("AutoModel", {"channels": True, "heads": True, "layers": True}),  # eager, capped
    # the embedding scale is a buffer sqrt(hidden_size) made at construction, and the
    # embedding is tied to the head (untied, the scale is folded into it: test_config_ties)
    "gemma3_text": ("AutoModelForCausalLM", {"channels": False, "heads": True, "layers": True}),
    # fused qkv_proj: (heads + 2 x kv_heads) x head_dim rows, solved for jointly
    "phi3": ("AutoModel", {"channels": True, "heads": True, "layers": True}),
    "gpt_neox": ("AutoModel", {"channels": True, "heads": REFUSED, "layers": True}),
    "t5": ("T5EncoderModel", {"channels": True, "heads": True, "layers": True}),
    "distilbert": ("AutoModel", {"channels": True, "heads": REFUSED, "layers": True}),
    "falcon": ("AutoModel", {"channels": True, "layers": True}),  # x.T in every Linear
    # the FFN is 4 x hidden_size, and the base model's output fixes hidden_size
    "bloom": ("AutoModel", {"channels": REFUSED, "layers": True}),
    "clip_vision_model": ("AutoModel", {"channels": True, "heads": REFUSED, "layers": True}),
    # per-stage lists: the transformer's heads count is one field for every stage
    "mobilevit": ("AutoModel", {"channels": False, "heads": REFUSED}),
    # per-stage width lists (hidden_sizes[i]); dropped blocks become skips no config says
    "convnext": ("AutoModel", {"channels": True, "layers": False}),
    # every stage's width is embed_dim x 2^i, and the output fixes the last one
    "swin": ("AutoModel", {"channels": REFUSED, "layers": False}),
    # heads: config.head_dim (read with a default) states the kept width; layers: the
    # backbone stage names follow the kept layers
    "dinov2": ("AutoModel", {"channels": True, "heads": True, "layers": True}),
    "whisper": (  # the encoder, with a classification head
        "WhisperForAudioClassification",
        {"channels": True, "heads": REFUSED, "layers": True},
    ),
}


def transformers() -> Any:
    tf = importlib.import_module("transformers")
    tf.logging.set_verbosity_error()
    return tf


def tiny_config(model_type: str, shrink: bool = True, scale: int = 1, **overrides: Any) -> Any:
    """The default config of ``model_type`` with every role-named int field made small
    (``scale`` times wider: width, FFN and head_dim)."""
    tf = transformers()
    config = tf.AutoConfig.for_model(model_type)
    defaults = config.to_dict()
    values: dict[str, Any] = {}
    for role, (small, names) in ROLES.items() if shrink else ():
        for name in names:
            if type(defaults.get(name)) is int:
                values[name] = small * (scale if role in ("width", "ffn", "head_dim") else 1)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if type(defaults.get(name)) is int and defaults[name] >= ROLES["vocab"][0]:
            values[name] = 0
    wanted = {**values, **overrides}
    accepted = inspect.signature(type(config).__init__).parameters
    # through the constructor where it takes them, so derived fields follow (Swin's hidden_size)
    config = tf.AutoConfig.for_model(
        model_type, **{k: v for k, v in wanted.items() if k in accepted}
    )
    for key, value in wanted.items():
        if key not in accepted:
            setattr(config, key, value)
    layers = next((n for n in ROLES["layers"][1] if type(defaults.get(n)) is int), None)
    if layers is not None:  # per-layer lists (layer_types, window patterns) follow the count
        for key, value in defaults.items():
            if (
                key not in overrides
                and isinstance(value, list)
                and len(value) == defaults[layers] > 1
            ):
                setattr(config, key, value[: getattr(config, layers)])
    return config


# types whose small config needs more than the roles: Swin's windows must tile every stage
BUILD: dict[str, dict[str, Any]] = {
    "swin": {"shrink": False, "depths": [2, 2, 2, 2], "embed_dim": 48, "image_size": 128,
             "window_size": 4},
}  # fmt: skip


def build(
    model_type: str, head: str = "AutoModel", shrink: bool = True, scale: int = 1, **overrides: Any
) -> nn.Module:
    """A randomly initialised ``head`` (an Auto class or a model class name) of
    ``model_type``, eval mode."""
    if model_type in BUILD and not overrides:
        overrides = dict(BUILD[model_type])
        shrink = overrides.pop("shrink", shrink)
    tf = transformers()
    config = tiny_config(model_type, shrink, scale, **overrides)
    torch.manual_seed(0)
    cls = getattr(tf, head)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return model.eval()  # type: ignore[no-any-return]


def example_inputs(model: nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs for ``model``'s main input: token ids, pixel values or input features."""
    config: Any = model.config
    name = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(0)
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", ROLES["vocab"][0])
        return {name: torch.randint(1, vocab, (batch, TOKENS), generator=generator)}
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, list | tuple) else size
        channels = getattr(config, "num_channels", 3)
        return {name: torch.randn(batch, channels, size, size, generator=generator)}
    if name == "input_features":  # speech encoders: (batch, mel bins, frames)
        mels = getattr(config, "num_mel_bins", 80)
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return {name: torch.randn(batch, mels, frames, generator=generator)}
    raise ValueError(f"{type(model).__name__}: no example input for {name!r}")

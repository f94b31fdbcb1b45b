"""Hugging Face transformers (optional): BERT, GPT-2, LLaMA (GQA), ViT from small random configs.

Each compiles at channel, head and layer granularity with the config and the attention
modules' own counts kept in sync; outputs keep their shapes; dead channels/heads prune without
changing the output; ONNX export verifies in onnxruntime; graphprune.save/load round-trips
everything, save_pretrained/from_pretrained whatever the config can express; generate() works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import graphprune as gp
from tests.equivalence import check_dead_channels, outputs

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

Case = tuple[Callable[[], nn.Module], dict[str, torch.Tensor]]


def _bert() -> nn.Module:
    config = tf.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    return tf.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    config = tf.GPT2Config(
        vocab_size=100,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = tf.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config)


def _vit() -> nn.Module:
    config = tf.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return tf.ViTForImageClassification(config)


def _tokens() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))}


CASES: dict[str, Case] = {
    "bert": (_bert, {**_tokens(), "attention_mask": torch.ones(2, 16, dtype=torch.long)}),
    "gpt2": (_gpt2, _tokens()),
    "llama": (_llama, _tokens()),
    "vit": (_vit, {"pixel_values": torch.randn(2, 3, 32, 32)}),
}
# what each (family, granularity) must change in the config, and whether a config can say it
EXPECTED: dict[tuple[str, str], tuple[dict[str, Any], bool]] = {
    # channels take whole heads with them (Plan.attention "auto"): hidden / heads stays the
    # head size, which every config below can state
    ("bert", "channels"): (
        {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}, True
    ),
    # head size is hidden / heads: no config says it (refused; config="free" prunes them)
    ("bert", "heads"): ({}, False),
    ("bert", "layers"): ({"num_hidden_layers": 1}, True),
    ("gpt2", "channels"): ({"hidden_size": 32, "num_attention_heads": 2}, True),  # n_inner None
    ("gpt2", "heads"): ({}, False),
    ("gpt2", "layers"): ({"num_hidden_layers": 1}, True),
    ("llama", "channels"): (
        {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
         "num_key_value_heads": 1},
        True,
    ),
    ("llama", "heads"): ({"num_attention_heads": 2, "num_key_value_heads": 1}, True),
    ("llama", "layers"): ({"num_hidden_layers": 1}, True),
    ("vit", "channels"): (
        {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}, True
    ),
    # ViT reads config.head_dim with a default (hidden / heads): the sync writes it
    ("vit", "heads"): ({"num_attention_heads": 2, "head_dim": 16}, True),
    ("vit", "layers"): ({"num_hidden_layers": 1}, True),
}


def _build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    build, x = CASES[name]
    return build().eval(), x


@pytest.mark.parametrize(("name", "granularity"), sorted(EXPECTED))
def test_compile_syncs_config_and_round_trips(name: str, granularity: str, tmp_path: Path) -> None:
    model, x = _build(name)
    plan = gp.Plan(ratio=0.5, granularity=granularity)
    changes, expressible = EXPECTED[name, granularity]
    if not expressible:  # the default (config="expressible") refuses, with the way out
        with pytest.raises(gp.PruneError, match=r"config: .*config='free'"):
            gp.compile(model, plan, x)
        plan = dataclasses.replace(plan, config="free")
    pruned = gp.compile(model, plan, x)
    report = gp.report(pruned)
    assert report.config["changes"] == changes
    assert report.config["expressible"] is expressible, report.config["reason"]
    assert outputs(pruned, x).shape == outputs(model, x).shape
    assert report.params_after < report.params_before
    assert model.config.num_hidden_layers == 2  # the user's model and config are untouched

    gp.save(pruned, tmp_path / "pruned.pt")  # every case: graphprune.save / load
    loaded = gp.load(_build(name)[0], tmp_path / "pruned.pt", x)
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned, x))
    assert loaded.config.to_dict() == pruned.config.to_dict()
    if expressible:  # and the config alone rebuilds it
        pruned.save_pretrained(tmp_path / "hf")
        rebuilt = type(model).from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(outputs(rebuilt, x), outputs(pruned, x))
    else:
        assert "graphprune.save" in report.config["reason"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_modules_count_their_heads(name: str) -> None:
    model, x = _build(name)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads", config="free"), x)
    attention = {
        "bert": lambda m: m.bert.encoder.layer[0].attention.self,
        "gpt2": lambda m: m.transformer.h[0].attn,
        "llama": lambda m: m.model.layers[0].self_attn,
        "vit": lambda m: m.vit.layers[0].attention,
    }[name](pruned)
    heads = {"bert": "num_attention_heads", "gpt2": "num_heads", "vit": "num_attention_heads"}
    if name in heads:
        assert getattr(attention, heads[name]) == 2
    if name == "bert":  # all_head_size, read by no forward, is also the hidden size: reported
        changes = gp.report(pruned).changes
        assert any("all_head_size" in c and "not updated" in c for c in changes)
    if name == "llama":  # GQA: 4 q / 2 kv heads -> 2 / 1, two q heads per kv head as before
        assert attention.num_key_value_groups == 2
        assert attention.q_proj.out_features == 2 * attention.head_dim
        assert attention.k_proj.out_features == attention.head_dim


@pytest.mark.parametrize("name", sorted(CASES))
def test_dead_channels_and_heads_prune_exactly(name: str) -> None:
    for kinds, granularity in [({"channels"}, "channels"), ({"heads", "kv_heads"}, "heads")]:
        model, x = _build(name)
        check_dead_channels(model, x, kinds, granularity, seed=1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_export_verifies(name: str, tmp_path: Path) -> None:
    model, x = _build(name)
    for granularity in ("channels", "heads", "layers"):
        plan = gp.Plan(ratio=0.5, granularity=granularity, config="free")
        pruned = gp.compile(model, plan, x)
        report = gp.export_onnx(pruned, x, tmp_path / f"{granularity}.onnx")
        assert report.verification is not None and report.verification.ok
        assert report.verification.max_abs < 1e-4
        assert getattr(pruned.config, "use_cache", True) is True  # exported without the cache


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("granularity", ["channels", "heads", "layers"])
def test_generate_still_works(name: str, granularity: str) -> None:
    model, x = _build(name)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity=granularity, config="free"), x)
    prompt = torch.tensor([[5, 17, 42, 3, 9]])
    cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False)
    uncached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 13) and torch.equal(cached, uncached)  # the KV cache agrees


def test_per_layer_sizes_need_graphprune_save(tmp_path: Path) -> None:
    model, x = _build("llama")
    plan = gp.Plan(ratio=0.0, overrides={"model.layers.0.mlp.gate_proj": 0.5}, config="free")
    pruned = gp.compile(model, plan, x)
    report = gp.report(pruned)
    assert not report.config["expressible"]
    why = report.config["fields"]["intermediate_size"]
    assert "several values: 64 (model.layers.0.mlp" in why and "128 (model.layers.1.mlp" in why
    assert "graphprune.save" in report.config["reason"]
    gp.save(pruned, tmp_path / "m.pt")
    loaded = gp.load(_build("llama")[0], tmp_path / "m.pt", x)
    assert loaded.model.layers[0].mlp.gate_proj.out_features == 64
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned, x))


def test_ffn_only_plan_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    model, x = _build("bert")
    plan = gp.Plan(ratio=0.0, overrides={"*.intermediate.dense": 0.5})  # FFN neurons only
    pruned = gp.compile(model, plan, x)
    report = gp.report(pruned)
    assert report.config["changes"] == {"intermediate_size": 64}
    assert report.config["expressible"]
    pruned.save_pretrained(tmp_path)
    rebuilt = type(model).from_pretrained(tmp_path).eval()
    assert rebuilt.bert.encoder.layer[1].intermediate.dense.out_features == 64
    torch.testing.assert_close(outputs(rebuilt, x), outputs(pruned, x))


def test_base_model_and_tied_embeddings() -> None:
    model, x = _build("bert")
    base = model.bert  # a BertModel on its own
    pruned = gp.compile(base, gp.Plan(ratio=0.5), x)
    # its hidden states *are* the output, so the hidden size is frozen; the FFN is not
    assert pruned(**x).last_hidden_state.shape == (2, 16, 64)
    assert gp.report(pruned).config["changes"] == {"intermediate_size": 64}
    assert pruned.config.hidden_size == 64 and pruned.config.intermediate_size == 64

    gpt2, x = _build("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    pruned = gp.compile(gpt2, gp.Plan(ratio=0.5), x)
    assert pruned.lm_head.weight is pruned.transformer.wte.weight  # still one tensor
    assert pruned.lm_head.weight.shape == (100, 32)


def test_a_layout_no_config_builds_is_reported_not_guessed(tmp_path: Path) -> None:
    class Hardwired(tf.LlamaForCausalLM):  # a user's subclass with a width no config field sets
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.adapter = nn.Linear(64, 64, bias=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return self.lm_head(self.adapter(self.model(input_ids).last_hidden_state))

    torch.manual_seed(0)
    model = Hardwired(_llama().config).eval()
    x = _tokens()
    pruned = gp.compile(model, gp.Plan(ratio=0.5), x)
    config = gp.report(pruned).config
    assert pruned.adapter.in_features == 32
    assert not config["expressible"] and "adapter.weight" in config["reason"]
    assert "graphprune.save" in config["reason"]
    gp.save(pruned, tmp_path / "m.pt")
    torch.manual_seed(0)
    loaded = gp.load(Hardwired(_llama().config).eval(), tmp_path / "m.pt", x)
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned, x))


def test_inplace_compile_syncs_the_config_like_a_copy() -> None:
    """inplace=True rewrites the model's own config: the sync still compares with the
    unpruned one (it once compared the config with itself and reported nothing changed)."""
    torch.manual_seed(0)
    model = _llama().eval()
    x = {"input_ids": torch.randint(0, 100, (2, 8))}
    copy_report = gp.report(gp.compile(model, gp.Plan(ratio=0.5), x)).config
    in_place = gp.report(gp.compile(model, gp.Plan(ratio=0.5), x, inplace=True)).config
    assert copy_report is not None and in_place is not None
    assert in_place.changes == copy_report.changes == {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }  # fmt: skip
    assert in_place.expressible and copy_report.expressible
    assert model.config.hidden_size == 32

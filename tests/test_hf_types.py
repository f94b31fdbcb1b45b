"""A sample of Hugging Face model types beyond the four of test_hf.py, with no per-type code.

Each type is built small from its default config (tests/hf_models.py shrinks fields by role)
and compiled at channel, head and layer granularity. Checked: the outputs keep their shapes
and are finite, parameters fall, and the report's claim about the config is true --
where it says ``from_pretrained`` rebuilds the pruned model, a save_pretrained/from_pretrained
round trip computes the same outputs; where it says it cannot, it names the reason and
``graphprune.save``/``load`` restores the model exactly. The full sweep over every type
transformers ships is ``benchmarks/hf_types.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import graphprune as gp
from graphprune.hf import meta_shapes
from graphprune.hf_defaults import defaulted_fields
from tests import hf_models
from tests.equivalence import check_dead_channels, outputs
from tests.hf_models import REFUSED, SAMPLE

pytest.importorskip("transformers")

CASES = [(t, g) for t, (_, grans) in SAMPLE.items() for g in grans]


@pytest.mark.parametrize(("model_type", "granularity"), CASES)
def test_type_compiles_and_the_config_claim_holds(
    model_type: str, granularity: str, tmp_path: Path
) -> None:
    head, expected = SAMPLE[model_type]
    model = hf_models.build(model_type, head)
    x = hf_models.example_inputs(model)
    before = outputs(model, x)
    plan = gp.Plan(ratio=0.5, granularity=granularity)
    if expected[granularity] == REFUSED:  # nothing the config can state: said, with the way out
        with pytest.raises(gp.PruneError, match=r"config: .*config='free'"):
            gp.compile(model, plan, x)
        plan = dataclasses.replace(plan, config="free")
    pruned = gp.compile(model, plan, x)
    after = outputs(pruned, x)
    report = gp.report(pruned)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert report.params_after < report.params_before
    assert torch.equal(outputs(model, x), before)  # the user's model is untouched

    config = report.config
    assert config["expressible"] is (expected[granularity] is True), config["reason"]
    if config["expressible"]:
        pruned.save_pretrained(tmp_path / "hf")
        rebuilt = type(pruned).from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(outputs(rebuilt, x), after)
    else:
        assert config["reason"] and "graphprune.save" in config["reason"]
        gp.save(pruned, tmp_path / "m.pt")
        loaded = gp.load(hf_models.build(model_type, head), tmp_path / "m.pt", x)
        torch.testing.assert_close(outputs(loaded, x), after)


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_type_exports_and_verifies(model_type: str, tmp_path: Path) -> None:
    head, expected = SAMPLE[model_type]
    model = hf_models.build(model_type, head)
    x = hf_models.example_inputs(model)
    granularity = next(iter(expected))
    plan = gp.Plan(ratio=0.5, granularity=granularity, config="free")
    pruned = gp.compile(model, plan, x)
    report = gp.export_onnx(pruned, x, tmp_path / "m.onnx")
    assert report.verification is not None and report.verification.ok


DECODERS = [t for t, (head, _) in SAMPLE.items() if head == "AutoModelForCausalLM"]


def _mode(claim: bool | str | None) -> str:
    """The config mode a sample case compiles with (the default unless it refuses)."""
    return "free" if claim == REFUSED else "expressible"


@pytest.mark.parametrize(
    ("model_type", "changes"),
    [
        ("phi3", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
        ("gemma2", {"num_attention_heads": 2, "num_key_value_heads": 1}),
    ],
)
def test_gqa_heads_are_stated_and_generate_the_same(
    model_type: str, changes: dict[str, int], tmp_path: Path
) -> None:
    """GQA decoders' heads plans as causal LMs: 2 of 4 query heads and 1 of 2 kv heads, the
    config states it, from_pretrained rebuilds the logits, and generation is the same with
    and without the KV cache, before and after the round trip. Phi-3 projects q, k and v in
    one fused Linear ((heads + 2 x kv_heads) x head_dim rows, three fields at once: solved
    around the nearest miss); Gemma-2 soft-caps its scores (eager attention)."""
    model = hf_models.build(model_type, "AutoModelForCausalLM")
    x = hf_models.example_inputs(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads"), x)
    config = gp.report(pruned).config
    assert config["expressible"], config["reason"]
    assert config["changes"] == changes
    pruned.save_pretrained(tmp_path / "hf")
    rebuilt = type(pruned).from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(outputs(rebuilt, x), outputs(pruned, x))
    prompt = x["input_ids"][:1, :5]
    for generator in (pruned, rebuilt):
        cached = generator.generate(prompt, max_new_tokens=6, do_sample=False)
        uncached = generator.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.shape == (1, 11) and torch.equal(cached, uncached)


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_generates_the_same_with_and_without_cache(model_type: str) -> None:
    head, expected = SAMPLE[model_type]
    model = hf_models.build(model_type, head)
    x = hf_models.example_inputs(model)
    prompt = x["input_ids"][:1, :5]
    for granularity, claim in expected.items():
        plan = gp.Plan(ratio=0.5, granularity=granularity, config=_mode(claim))
        pruned = gp.compile(model, plan, x)
        cached = pruned.generate(prompt, max_new_tokens=6, do_sample=False)
        uncached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.shape == (1, 11) and torch.equal(cached, uncached), granularity


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        # (batch x heads, T, T) bmm, with c2p/p2c relative attention through its own
        # projections of the position embeddings
        ("deberta-v2", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                        "max_relative_positions": 32, "position_buckets": 16}),
        ("mpnet", {}),  # a (buckets x heads) bias table shared by every layer, added in place
    ],
)  # fmt: skip
def test_folded_and_biased_heads_prune_exactly_and_verify(
    model_type: str, overrides: dict[str, object], tmp_path: Path
) -> None:
    """Heads where attention folds them into the batch dim (DeBERTa-v2) or adds a relative
    position bias to the scores (MPNet): dead heads prune without changing the outputs, and
    a heads plan exports and verifies in onnxruntime."""
    head = SAMPLE[model_type][0]
    model = hf_models.build(model_type, head, **overrides)
    x = hf_models.example_inputs(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads", config="free"), x)
    report = gp.report(pruned)
    assert report.groups and all(g.kind == "heads" and g.kept * 2 == g.total for g in report.groups)
    exported = gp.export_onnx(pruned, x, tmp_path / "m.onnx")
    assert exported.verification is not None and exported.verification.ok
    check_dead_channels(model, x, {"heads", "kv_heads"}, "heads", seed=1)


def test_folded_heads_are_found_with_a_batch_of_one() -> None:
    """A batch of 1 folds (1 x heads) into the heads alone: the batch factor the analysis
    drops from DeBERTa's (batch x heads, T, T) scores is the inputs' first dim, not simply
    the outer one (which would be the heads here, and none were found)."""
    model = hf_models.build("deberta-v2")
    x = hf_models.example_inputs(model, batch=1)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads", config="free"), x)
    assert [(g.kind, g.kept, g.total) for g in gp.report(pruned).groups] == [("heads", 2, 4)] * 2
    check_dead_channels(model, x, {"heads"}, "heads", seed=1)


def test_heads_of_folded_attention_are_not_guessed() -> None:
    """BLOOM adds its ALiBi bias with baddbmm, slopes computed from the head count at run time
    (pruning heads would change the kept heads' slopes): granularity='heads' says it found no
    heads there instead of guessing."""
    model = hf_models.build("bloom")
    with pytest.raises(gp.PlanError, match="found no attention heads"):
        gp.compile(model, gp.Plan(ratio=0.5, granularity="heads"), hf_models.example_inputs(model))


def test_a_gqa_head_count_is_never_inverted_from_a_shrinking_width(tmp_path: Path) -> None:
    """Apertus reads head_dim with a default of hidden / heads. Doubling the heads *shrinks*
    k_proj there (kv_heads x hidden / heads), so a linear inversion of k_proj alone would
    claim 8 heads; the sync must instead state 2 of 4 heads with the head_dim they keep."""
    model = hf_models.build("apertus")
    x = hf_models.example_inputs(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads"), x)
    config = gp.report(pruned).config
    head_dim = model.config.hidden_size // 4
    assert config["changes"] == {
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": head_dim
    }  # fmt: skip
    assert config["expressible"], config["reason"]
    pruned.save_pretrained(tmp_path / "hf")
    rebuilt = type(pruned).from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(outputs(rebuilt, x), outputs(pruned, x))


def test_a_config_claim_is_checked_on_outputs_not_shapes(tmp_path: Path) -> None:
    """Gemma 3 scales its embeddings by a buffer, sqrt(hidden_size), made when the model is
    built: a model rebuilt from the channels-pruned config has every shape and attribute
    right and still computes something else. The claim is refused, and rightly so."""
    model = hf_models.build("gemma3_text", "AutoModelForCausalLM")
    x = hf_models.example_inputs(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5), x)
    config = gp.report(pruned).config
    assert not config["expressible"] and "computes other outputs" in config["reason"]
    assert "embed_tokens.embed_scale" in config["reason"]  # tied to the head: not folded
    pruned.save_pretrained(tmp_path / "hf")
    rebuilt = type(pruned).from_pretrained(tmp_path / "hf").eval()
    assert not torch.allclose(outputs(rebuilt, x), outputs(pruned, x), atol=1e-5)


def test_a_field_read_with_a_default_is_found_and_written_only_where_needed(
    tmp_path: Path,
) -> None:
    """Qwen2's attention reads ``getattr(config, "head_dim", None) or hidden // heads``: the
    field is found from the modelling code (no table), written when heads are pruned (2 of 4
    heads of width 16: derived, it would be 32) and left out when nothing needs it."""
    model = hf_models.build("qwen2", "AutoModelForCausalLM")
    assert "head_dim" not in model.config.to_dict() or model.config.head_dim is None
    assert defaulted_fields(type(model), model.config, meta_shapes) == {"head_dim": 16}
    llama = hf_models.build("llama", "AutoModelForCausalLM")  # states head_dim itself
    assert defaulted_fields(type(llama), llama.config, meta_shapes) == {}
    narrow = type(model)(hf_models.tiny_config("qwen2", num_attention_heads=8))  # 64 / 8
    assert defaulted_fields(type(narrow), narrow.config, meta_shapes) == {"head_dim": 8}

    x = hf_models.example_inputs(model)
    heads = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads"), x)
    config = gp.report(heads).config
    assert config["changes"] == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    heads.save_pretrained(tmp_path / "heads")
    rebuilt = type(heads).from_pretrained(tmp_path / "heads").eval()
    torch.testing.assert_close(outputs(rebuilt, x), outputs(heads, x))

    layers = gp.compile(model, gp.Plan(ratio=0.5, granularity="layers"), x)
    assert gp.report(layers).config["changes"] == {"num_hidden_layers": 1}
    assert getattr(layers.config, "head_dim", None) is None


def _llama(hidden: int, layers: int) -> torch.nn.Module:
    """A random LLaMA causal LM with 8 query and 4 kv heads."""
    tf = hf_models.transformers()
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=256,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def test_a_layer_index_equal_to_a_head_count_is_not_taken_for_one() -> None:
    """The fifth decoder layer's ``layer_idx`` (its KV-cache slot, read by no captured op) is
    4, like the kv head count: only the head count may follow the pruned heads (4 -> 3), or
    layer 4 writes layer 3's cache slot and cached generation goes wrong."""
    model = _llama(hidden=192, layers=6)
    x = {"input_ids": torch.randint(0, 256, (1, 20))}
    pruned = gp.compile(model, gp.Plan(ratio=0.25, granularity="heads"), x)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(6))
    assert gp.report(pruned).config.expressible
    prompt = x["input_ids"][:, :5]
    cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False)
    uncached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_sequence_as_long_as_the_head_count_does_not_freeze_the_heads() -> None:
    """8 tokens and 8 heads: the export repeats kv heads (``reshape(1, 8, 8, 16)``) where
    eager SDPA does not, so a call matched by order alone (``reshape(1, -1, 8, 16)``) would
    read the sequence length as the head count and freeze every head group."""
    model = _llama(hidden=128, layers=2)
    x = {"input_ids": torch.randint(0, 256, (1, 8))}
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads"), x)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    assert gp.report(pruned).config.expressible

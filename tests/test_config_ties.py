"""Plan(config="expressible"), the default for transformers models: widths one config field
holds stay equal, and what a field that cannot change sizes stays whole, so that
``save_pretrained``/``from_pretrained`` rebuilds the pruned model; ``config="free"`` allows any
widths (saved with graphprune.save). Checked the way a user relies on it: the saved model is
rebuilt from its files and computes the pruned model's outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.hf import int_fields, shape_map
from tests import hf_models
from tests.equivalence import outputs

pytest.importorskip("transformers")


def _ffn_widths(model: nn.Module) -> list[int]:
    return [int(layer.mlp.up_proj.out_features) for layer in model.model.layers]


def _llama(layers: int = 4) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = hf_models.build("llama", "AutoModelForCausalLM", num_hidden_layers=layers)
    return model, hf_models.example_inputs(model)


def _rebuilds(pruned: nn.Module, x: Any, path: Path) -> None:
    pruned.save_pretrained(path)
    rebuilt = type(pruned).from_pretrained(path).eval()
    torch.testing.assert_close(outputs(rebuilt, x), outputs(pruned, x))


@pytest.mark.parametrize(
    "plan",
    [
        gp.Plan(ratio=0.5, overrides={"model.layers.0.mlp.*": 0.25}),
        gp.Plan(ratio=0.4, scope="global"),
    ],
    ids=["overrides", "global"],
)
def test_per_layer_requests_are_evened_out_and_said(plan: gp.Plan, tmp_path: Path) -> None:
    """LlamaConfig holds one intermediate_size: a request for per-layer FFN widths keeps one
    width in every layer, the report says so (and how to keep them), and from_pretrained
    rebuilds the result; config='free' keeps the per-layer widths and says the config cannot
    hold them."""
    model, x = _llama()
    pruned = gp.compile(model, plan, x)
    report = gp.report(pruned)
    widths = _ffn_widths(pruned)
    assert len(set(widths)) == 1 and widths[0] < 128, widths
    notes = [n for n in report.notes if n.startswith("config: ")]  # evened out: said
    assert notes and all("config='free'" in n for n in notes), report.notes
    if plan.overrides:
        assert "intermediate_size" in notes[0] and "keep 64..96 of" in notes[0]
    assert report.config["expressible"] and report.config["mode"] == "expressible"
    _rebuilds(pruned, x, tmp_path / "hf")

    free = gp.compile(model, dataclasses.replace(plan, config="free"), x)
    if plan.scope == "local":  # the override is honoured as asked
        assert _ffn_widths(free)[0] > _ffn_widths(free)[1]
    config = gp.report(free).config
    if len(set(_ffn_widths(free))) > 1:
        assert not config["expressible"] and "intermediate_size" in config["reason"]
    assert config["mode"] == "free"


def test_a_field_that_cannot_change_keeps_what_it_sizes() -> None:
    """BLOOM states its FFN as 4 x hidden_size, and the base model's output is the hidden
    size, which cannot change: a channel plan has nothing the config can state, so it is
    refused with that reason (and the way out); config='free' prunes the FFN and says the
    config cannot express it."""
    model = hf_models.build("bloom")
    x = hf_models.example_inputs(model)
    with pytest.raises(gp.PruneError, match=r"BloomConfig\.hidden_size.*config='free'"):
        gp.compile(model, gp.Plan(ratio=0.5), x)
    free = gp.compile(model, gp.Plan(ratio=0.5, config="free"), x)
    report = gp.report(free)
    assert report.params_after < report.params_before
    assert not report.config["expressible"] and "hidden_size" in report.config["reason"]


def test_per_stage_lists_state_per_stage_widths(tmp_path: Path) -> None:
    """ConvNeXt holds one width per stage (hidden_sizes, a list): each entry is a field of the
    shape map, the stages the base model's output does not fix are halved, the last stays
    whole (its FFN with it: 4 x hidden_sizes[3]), and from_pretrained rebuilds it."""
    model = hf_models.build("convnext")
    assert {f"hidden_sizes[{i}]" for i in range(4)} <= set(shape_map(
        type(model), model.config).footprints)  # fmt: skip
    assert "hidden_sizes[3]" in int_fields(model.config)
    x = hf_models.example_inputs(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5), x)
    config = gp.report(pruned).config
    before = list(model.config.hidden_sizes)
    assert config["changes"]["hidden_sizes"] == [w // 2 for w in before[:3]] + before[3:]
    assert config["expressible"], config["reason"]
    _rebuilds(pruned, x, tmp_path / "hf")


def test_an_embedding_scale_is_folded_into_an_untied_embedding(tmp_path: Path) -> None:
    """Gemma 3 scales its embedding by a buffer sqrt(hidden_size) made at construction. With
    the embedding untied from the output head, the pruned model's scale moves into the
    embedding weight (checked on outputs) and from_pretrained rebuilds it exactly; tied, the
    fold would change the head, so the claim is refused (tests/hf_models.SAMPLE)."""
    model = hf_models.build("gemma3_text", "AutoModelForCausalLM", tie_word_embeddings=False)
    x = hf_models.example_inputs(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5), x)
    config = gp.report(pruned).config
    assert config["expressible"], config["reason"]
    assert any("embed_scale" in a and "folded" in a for a in config["attributes"])
    _rebuilds(pruned, x, tmp_path / "hf")


def test_only_lists_the_model_reads_per_layer_follow_removed_layers() -> None:
    """A layers plan slices the config lists with one entry per layer (Gemma-3's layer_types,
    read as the layers are built), not a list as long as the layer count by chance (Whisper's
    begin_suppress_tokens: two token ids, read only by generate)."""
    gemma = hf_models.build("gemma3_text", "AutoModelForCausalLM")
    x = hf_models.example_inputs(gemma)
    pruned = gp.compile(gemma, gp.Plan(ratio=0.5, granularity="layers"), x)
    assert len(pruned.config.layer_types) == pruned.config.num_hidden_layers == 1
    whisper = hf_models.build("whisper", "WhisperForAudioClassification")
    tokens = list(whisper.config.begin_suppress_tokens)
    assert len(tokens) == whisper.config.num_hidden_layers  # the coincidence under test
    x = hf_models.example_inputs(whisper)
    pruned = gp.compile(whisper, gp.Plan(ratio=0.5, granularity="layers"), x)
    assert pruned.config.num_hidden_layers == 1
    assert list(pruned.config.begin_suppress_tokens) == tokens

from __future__ import annotations

import json

import networkx as nx
import pytest

import graphprune as gp


def test_table_lists_groups_and_timing(zoo_graphs: dict[str, gp.DependencyGraph]) -> None:
    text = str(zoo_graphs["resnet18"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["id", "channels", "state", "members"]
    assert "frozen: model input 'x' dim 1" in text
    assert lines[-1].startswith("14 groups (12 prunable), 0 unsupported ops, analysed in")


def test_explain_prints_the_coupling_path(
    zoo_graphs: dict[str, gp.DependencyGraph], capsys: pytest.CaptureFixture[str]
) -> None:
    dg = zoo_graphs["resnet18"]
    text = dg.explain("layer1.1.conv2")
    assert capsys.readouterr().out.strip() == text
    # conv2 of block 1 reaches block 0's conv2 through the residual add
    path = next(
        line for line in text.splitlines() if line.strip().endswith("layer1.0.conv2.weight[0]")
    )
    assert "add (layer1.1: element-wise)" in path or "add (layer1.0: element-wise)" in path
    assert "conv2d (layer1.1.conv2: conv output channels)" in path
    assert text.startswith("group 0 (16 channels, prunable):")


def test_explain_unknown_name_suggests(zoo_graphs: dict[str, gp.DependencyGraph]) -> None:
    with pytest.raises(gp.InputError, match=r"did you mean .*'layer1\.0\.conv1'"):
        zoo_graphs["resnet18"].explain("layer1.0.convl", echo=False)


def test_explain_heads_path_goes_through_attention(
    zoo_graphs: dict[str, gp.DependencyGraph],
) -> None:
    text = zoo_graphs["gpt"].explain("transformer.h.0.attn.c_proj.weight", echo=False)
    assert "scaled_dot_product_attention" in text
    assert "each channel x16 (blocks)" in text  # c_proj's input rows: 4 heads x 16


def test_to_dict_is_json(zoo_graphs: dict[str, gp.DependencyGraph]) -> None:
    data = json.loads(zoo_graphs["vit"].to_json())
    assert len(data["groups"]) == len(zoo_graphs["vit"].groups)
    first = data["groups"][0]
    assert {"id", "size", "prunable", "frozen_reasons", "notes", "ops", "members"} <= set(first)
    assert first["members"][0]["index_map"] == list(range(first["size"]))
    assert any(c["op"] == "aten.view" for c in data["shape_constants"])


def test_to_networkx(zoo_graphs: dict[str, gp.DependencyGraph]) -> None:
    graph = zoo_graphs["resnet18"].to_networkx()
    assert isinstance(graph, nx.MultiGraph)
    assert graph.nodes["conv1.weight[0]"]["groups"] == [0]
    assert graph.nodes["fc.weight[1]"]["groups"] == [11]
    assert nx.has_path(graph, "conv1.weight[0]", "layer2.0.downsample.0.weight[1]")
    ops = {d["op"] for _, _, d in graph.edges(data=True)}
    assert {"aten.conv2d", "aten.add.Tensor", "aten.batch_norm"} <= ops


def test_groups_of_module(zoo_graphs: dict[str, gp.DependencyGraph]) -> None:
    dg = zoo_graphs["llama"]
    sizes = sorted(g.size for g in dg.groups_of("layers.0.self_attn.q_proj"))
    assert sizes == [2, 2, 8, 64]  # kv heads, repeats, rotary pairs of head_dim, hidden

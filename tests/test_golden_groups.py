"""Golden group summaries for every zoo model, written out literally.

Each line is ``Group.compact()``: "<channels> <prunable|frozen>: module[dim] ...". They were
reviewed by hand against the architectures, e.g.
- resnet18: each stage's residual stream is one group holding every conv2/bn2 output, the
  downsample conv+BN and the next stage's input convs; each block's conv1 is its own group.
- resnext: a grouped 3x3 conv (4 groups of 4) gives three groups: the conv groups shared by
  its input and output, the channel-within-group on the input, and on the output.
- mobilenet_v2: a depthwise conv's channels are its input's channels.
- densenet/inception/unet: a norm or conv reading a concat merges the concatenated groups.
- vit/gpt: attention heads and head_dim are separate groups of the qkv rows; MHA's packed
  (3, E) q/k/v index is frozen (selected by position).
- llama: kv heads, query heads per kv head (GQA repeat), v head_dim, and the rotary pairs of
  q/k head_dim shared by all layers through ``inv_freq``.
"""

from __future__ import annotations

import pytest

import graphprune as gp
from graphprune.models import MODELS

GOLDEN: dict[str, list[str]] = {
    "vgg": [
        "16 prunable: features.0[0] features.1[0] features.4[1]",
        "3 frozen: features.0[1]",
        "32 prunable: features.4[0] features.5[0] features.8[1]",
        "64 prunable: features.11[1] features.8[0] features.9[0]",
        "64 prunable: classifier.0[1] features.11[0] features.12[0]",
        "128 prunable: classifier.0[0] classifier.3[1]",
        "10 frozen: classifier.3[0]",
    ],
    "resnet18": [
        "16 prunable: bn1[0] conv1[0] layer1.0.bn2[0] layer1.0.conv1[1] layer1.0.conv2[0] layer1.1.bn2[0] layer1.1.conv1[1] layer1.1.conv2[0] layer2.0.conv1[1] layer2.0.downsample.0[1]",
        "3 frozen: conv1[1]",
        "16 prunable: layer1.0.bn1[0] layer1.0.conv1[0] layer1.0.conv2[1]",
        "16 prunable: layer1.1.bn1[0] layer1.1.conv1[0] layer1.1.conv2[1]",
        "32 prunable: layer2.0.bn1[0] layer2.0.conv1[0] layer2.0.conv2[1]",
        "32 prunable: layer2.0.bn2[0] layer2.0.conv2[0] layer2.0.downsample.0[0] layer2.0.downsample.1[0] layer2.1.bn2[0] layer2.1.conv1[1] layer2.1.conv2[0] layer3.0.conv1[1] layer3.0.downsample.0[1]",
        "32 prunable: layer2.1.bn1[0] layer2.1.conv1[0] layer2.1.conv2[1]",
        "64 prunable: layer3.0.bn1[0] layer3.0.conv1[0] layer3.0.conv2[1]",
        "64 prunable: layer3.0.bn2[0] layer3.0.conv2[0] layer3.0.downsample.0[0] layer3.0.downsample.1[0] layer3.1.bn2[0] layer3.1.conv1[1] layer3.1.conv2[0] layer4.0.conv1[1] layer4.0.downsample.0[1]",
        "64 prunable: layer3.1.bn1[0] layer3.1.conv1[0] layer3.1.conv2[1]",
        "128 prunable: layer4.0.bn1[0] layer4.0.conv1[0] layer4.0.conv2[1]",
        "128 prunable: fc[1] layer4.0.bn2[0] layer4.0.conv2[0] layer4.0.downsample.0[0] layer4.0.downsample.1[0] layer4.1.bn2[0] layer4.1.conv1[1] layer4.1.conv2[0]",
        "128 prunable: layer4.1.bn1[0] layer4.1.conv1[0] layer4.1.conv2[1]",
        "10 frozen: fc[0]",
    ],
    "resnet_bottleneck": [
        "8 prunable: bn1[0] conv1[0] layer1.0.conv1[1] layer1.0.downsample.0[1]",
        "3 frozen: conv1[1]",
        "8 prunable: layer1.0.bn1[0] layer1.0.conv1[0] layer1.0.conv2[1]",
        "8 prunable: layer1.0.bn2[0] layer1.0.conv2[0] layer1.0.conv3[1]",
        "32 prunable: layer1.0.bn3[0] layer1.0.conv3[0] layer1.0.downsample.0[0] layer1.0.downsample.1[0] layer1.1.bn3[0] layer1.1.conv1[1] layer1.1.conv3[0] layer2.0.conv1[1] layer2.0.downsample.0[1]",
        "8 prunable: layer1.1.bn1[0] layer1.1.conv1[0] layer1.1.conv2[1]",
        "8 prunable: layer1.1.bn2[0] layer1.1.conv2[0] layer1.1.conv3[1]",
        "16 prunable: layer2.0.bn1[0] layer2.0.conv1[0] layer2.0.conv2[1]",
        "16 prunable: layer2.0.bn2[0] layer2.0.conv2[0] layer2.0.conv3[1]",
        "64 prunable: fc[1] layer2.0.bn3[0] layer2.0.conv3[0] layer2.0.downsample.0[0] layer2.0.downsample.1[0]",
        "10 frozen: fc[0]",
    ],
    "mobilenet_v2": [
        "16 prunable: features.0.0[0] features.0.1[0] features.1.conv.0[0] features.1.conv.1[0] features.1.conv.3[0] features.1.conv.3[1] features.1.conv.4[0] features.2.conv.0[1]",
        "3 frozen: features.0.0[1]",
        "96 prunable: features.2.conv.0[0] features.2.conv.1[0] features.2.conv.3[0] features.2.conv.4[0] features.2.conv.6[1]",
        "24 prunable: features.2.conv.6[0] features.2.conv.7[0] features.3.conv.0[1] features.3.conv.6[0] features.3.conv.7[0] features.4.conv.0[1]",
        "144 prunable: features.3.conv.0[0] features.3.conv.1[0] features.3.conv.3[0] features.3.conv.4[0] features.3.conv.6[1]",
        "144 prunable: features.4.conv.0[0] features.4.conv.1[0] features.4.conv.3[0] features.4.conv.4[0] features.4.conv.6[1]",
        "32 prunable: features.4.conv.6[0] features.4.conv.7[0] features.5.conv.0[1] features.5.conv.6[0] features.5.conv.7[0] features.6.conv.0[1]",
        "192 prunable: features.5.conv.0[0] features.5.conv.1[0] features.5.conv.3[0] features.5.conv.4[0] features.5.conv.6[1]",
        "192 prunable: features.6.conv.0[0] features.6.conv.1[0] features.6.conv.3[0] features.6.conv.4[0] features.6.conv.6[1]",
        "64 prunable: features.6.conv.6[0] features.6.conv.7[0] features.7.0[1]",
        "256 prunable: classifier.1[1] features.7.0[0] features.7.1[0]",
        "10 frozen: classifier.1[0]",
    ],
    "resnext": [
        "8 prunable: bn1[0] conv1[0] layer1.0.conv1[1] layer1.0.downsample.0[1]",
        "3 frozen: conv1[1]",
        "4 prunable: layer1.0.bn1[0] layer1.0.conv1[0] layer1.0.conv2[1]",
        "32 prunable: layer1.0.bn3[0] layer1.0.conv3[0] layer1.0.downsample.0[0] layer1.0.downsample.1[0] layer2.0.conv1[1] layer2.0.downsample.0[1]",
        "4 prunable: layer2.0.bn1[0] layer2.0.conv1[0] layer2.0.conv2[1]",
        "64 prunable: fc[1] layer2.0.bn3[0] layer2.0.conv3[0] layer2.0.downsample.0[0] layer2.0.downsample.1[0]",
        "10 frozen: fc[0]",
        "4 prunable: layer1.0.bn1[0] layer1.0.bn2[0] layer1.0.conv1[0] layer1.0.conv2[0] layer1.0.conv3[1]",
        "4 prunable: layer1.0.bn2[0] layer1.0.conv2[0] layer1.0.conv3[1]",
        "4 prunable: layer2.0.bn1[0] layer2.0.bn2[0] layer2.0.conv1[0] layer2.0.conv2[0] layer2.0.conv3[1]",
        "4 prunable: layer2.0.bn2[0] layer2.0.conv2[0] layer2.0.conv3[1]",
    ],
    "densenet": [
        "40 prunable: blocks.0.0.conv1[1] blocks.0.0.conv2[0] blocks.0.0.norm1[0] blocks.0.1.conv1[1] blocks.0.1.conv2[0] blocks.0.1.norm1[0] blocks.0.2.conv1[1] blocks.0.2.conv2[0] blocks.0.2.norm1[0] stem[0] transitions.0.0[0] transitions.0.2[1]",
        "3 frozen: stem[1]",
        "16 prunable: blocks.0.0.conv1[0] blocks.0.0.conv2[1] blocks.0.0.norm2[0]",
        "16 prunable: blocks.0.1.conv1[0] blocks.0.1.conv2[1] blocks.0.1.norm2[0]",
        "16 prunable: blocks.0.2.conv1[0] blocks.0.2.conv2[1] blocks.0.2.norm2[0]",
        "44 prunable: blocks.1.0.conv1[1] blocks.1.0.conv2[0] blocks.1.0.norm1[0] blocks.1.1.conv1[1] blocks.1.1.conv2[0] blocks.1.1.norm1[0] blocks.1.2.conv1[1] blocks.1.2.conv2[0] blocks.1.2.norm1[0] fc[1] norm[0] transitions.0.2[0]",
        "16 prunable: blocks.1.0.conv1[0] blocks.1.0.conv2[1] blocks.1.0.norm2[0]",
        "16 prunable: blocks.1.1.conv1[0] blocks.1.1.conv2[1] blocks.1.1.norm2[0]",
        "16 prunable: blocks.1.2.conv1[0] blocks.1.2.conv2[1] blocks.1.2.norm2[0]",
        "10 frozen: fc[0]",
    ],
    "inception": [
        "32 prunable: block1.branch1.0[1] block1.branch3.0.0[1] block1.branch5.0.0[1] block1.branch_pool.1.0[1] stem.0[0] stem.1[0]",
        "3 frozen: stem.0[1]",
        "64 prunable: block1.branch1.0[0] block1.branch1.1[0] block1.branch3.1.0[0] block1.branch3.1.1[0] block1.branch5.2.0[0] block1.branch5.2.1[0] block1.branch_pool.1.0[0] block1.branch_pool.1.1[0] block2.branch1.0[1] block2.branch3.0.0[1] block2.branch5.0.0[1] block2.branch_pool.1.0[1]",
        "16 prunable: block1.branch3.0.0[0] block1.branch3.0.1[0] block1.branch3.1.0[1]",
        "8 prunable: block1.branch5.0.0[0] block1.branch5.0.1[0] block1.branch5.1.0[1]",
        "12 prunable: block1.branch5.1.0[0] block1.branch5.1.1[0] block1.branch5.2.0[1]",
        "88 prunable: block2.branch1.0[0] block2.branch1.1[0] block2.branch3.1.0[0] block2.branch3.1.1[0] block2.branch5.2.0[0] block2.branch5.2.1[0] block2.branch_pool.1.0[0] block2.branch_pool.1.1[0] fc[1]",
        "24 prunable: block2.branch3.0.0[0] block2.branch3.0.1[0] block2.branch3.1.0[1]",
        "8 prunable: block2.branch5.0.0[0] block2.branch5.0.1[0] block2.branch5.1.0[1]",
        "16 prunable: block2.branch5.1.0[0] block2.branch5.1.1[0] block2.branch5.2.0[1]",
        "10 frozen: fc[0]",
    ],
    "se_resnet": [
        "16 prunable: bn1[0] conv1[0] layer1.0.bn2[0] layer1.0.conv1[1] layer1.0.conv2[0] layer1.0.se.fc1[1] layer1.0.se.fc2[0] layer2.0.conv1[1] layer2.0.downsample.0[1]",
        "3 frozen: conv1[1]",
        "16 prunable: layer1.0.bn1[0] layer1.0.conv1[0] layer1.0.conv2[1]",
        "4 prunable: layer1.0.se.fc1[0] layer1.0.se.fc2[1]",
        "32 prunable: layer2.0.bn1[0] layer2.0.conv1[0] layer2.0.conv2[1]",
        "32 prunable: fc[1] layer2.0.bn2[0] layer2.0.conv2[0] layer2.0.downsample.0[0] layer2.0.downsample.1[0] layer2.0.se.fc1[1] layer2.0.se.fc2[0]",
        "8 prunable: layer2.0.se.fc1[0] layer2.0.se.fc2[1]",
        "10 frozen: fc[0]",
    ],
    "unet": [
        "8 prunable: enc1.0[0] enc1.1[0] enc1.3[1]",
        "3 frozen: enc1.0[1]",
        "16 prunable: dec1.0[1] enc1.3[0] enc1.4[0] enc2.0[1] up1[1]",
        "16 prunable: enc2.0[0] enc2.1[0] enc2.3[1]",
        "32 prunable: bottleneck.0[1] dec2.0[1] enc2.3[0] enc2.4[0] up2[1]",
        "32 prunable: bottleneck.0[0] bottleneck.1[0] bottleneck.3[1]",
        "32 prunable: bottleneck.3[0] bottleneck.4[0] up2[0]",
        "16 prunable: dec2.0[0] dec2.1[0] dec2.2[0] dec2.3[1]",
        "16 prunable: dec2.3[0] dec2.4[0] dec2.5[0] up1[0]",
        "8 prunable: dec1.0[0] dec1.1[0] dec1.2[0] dec1.3[1]",
        "8 prunable: dec1.3[0] dec1.4[0] dec1.5[0] head[1]",
        "2 frozen: head[0]",
    ],
    "vit": [
        "64 prunable: blocks.0.attn.in_proj_weight[1] blocks.0.attn.out_proj[0] blocks.0.gamma1[0] blocks.0.gamma2[0] blocks.0.mlp.0[1] blocks.0.mlp.2[0] blocks.0.norm1[0] blocks.0.norm2[0] blocks.1.attn.in_proj_weight[1] blocks.1.attn.out_proj[0] blocks.1.gamma1[0] blocks.1.gamma2[0] blocks.1.mlp.0[1] blocks.1.mlp.2[0] blocks.1.norm1[0] blocks.1.norm2[0] cls_token[2] head[1] norm[0] patch_embed[0] pos_embed[2]",
        "3 frozen: patch_embed[1]",
        "256 prunable: blocks.0.mlp.0[0] blocks.0.mlp.2[1]",
        "256 prunable: blocks.1.mlp.0[0] blocks.1.mlp.2[1]",
        "10 frozen: head[0]",
        "3 frozen: blocks.0.attn.in_proj_bias[0] blocks.0.attn.in_proj_weight[0]",
        "4 prunable: blocks.0.attn.in_proj_bias[0] blocks.0.attn.in_proj_weight[0] blocks.0.attn.out_proj[1]",
        "16 prunable: blocks.0.attn.in_proj_bias[0] blocks.0.attn.in_proj_weight[0] blocks.0.attn.out_proj[1]",
        "3 frozen: blocks.1.attn.in_proj_bias[0] blocks.1.attn.in_proj_weight[0]",
        "4 prunable: blocks.1.attn.in_proj_bias[0] blocks.1.attn.in_proj_weight[0] blocks.1.attn.out_proj[1]",
        "16 prunable: blocks.1.attn.in_proj_bias[0] blocks.1.attn.in_proj_weight[0] blocks.1.attn.out_proj[1]",
    ],
    "gpt": [
        "96 frozen: lm_head[0] transformer.wte[0]",
        "64 prunable: lm_head[1] transformer.h.0.attn.c_attn[1] transformer.h.0.attn.c_proj[0] transformer.h.0.ln_1[0] transformer.h.0.ln_2[0] transformer.h.0.mlp.c_fc[1] transformer.h.0.mlp.c_proj[0] transformer.h.1.attn.c_attn[1] transformer.h.1.attn.c_proj[0] transformer.h.1.ln_1[0] transformer.h.1.ln_2[0] transformer.h.1.mlp.c_fc[1] transformer.h.1.mlp.c_proj[0] transformer.ln_f[0] transformer.wpe[1] transformer.wte[1]",
        "32 frozen: transformer.wpe[0]",
        "256 prunable: transformer.h.0.mlp.c_fc[0] transformer.h.0.mlp.c_proj[1]",
        "256 prunable: transformer.h.1.mlp.c_fc[0] transformer.h.1.mlp.c_proj[1]",
        "4 prunable: transformer.h.0.attn.c_attn[0] transformer.h.0.attn.c_proj[1]",
        "16 prunable: transformer.h.0.attn.c_attn[0] transformer.h.0.attn.c_proj[1]",
        "4 prunable: transformer.h.1.attn.c_attn[0] transformer.h.1.attn.c_proj[1]",
        "16 prunable: transformer.h.1.attn.c_attn[0] transformer.h.1.attn.c_proj[1]",
    ],
    "llama": [
        "96 frozen: embed_tokens[0]",
        "64 prunable: embed_tokens[1] layers.0.input_layernorm[0] layers.0.mlp.down_proj[0] layers.0.mlp.gate_proj[1] layers.0.mlp.up_proj[1] layers.0.post_attention_layernorm[0] layers.0.self_attn.k_proj[1] layers.0.self_attn.o_proj[0] layers.0.self_attn.q_proj[1] layers.0.self_attn.v_proj[1] layers.1.input_layernorm[0] layers.1.mlp.down_proj[0] layers.1.mlp.gate_proj[1] layers.1.mlp.up_proj[1] layers.1.post_attention_layernorm[0] layers.1.self_attn.k_proj[1] layers.1.self_attn.o_proj[0] layers.1.self_attn.q_proj[1] layers.1.self_attn.v_proj[1] lm_head[1] norm[0]",
        "128 prunable: layers.0.mlp.down_proj[1] layers.0.mlp.gate_proj[0] layers.0.mlp.up_proj[0]",
        "128 prunable: layers.1.mlp.down_proj[1] layers.1.mlp.gate_proj[0] layers.1.mlp.up_proj[0]",
        "96 frozen: lm_head[0]",
        "8 prunable: inv_freq[0] layers.0.self_attn.k_proj[0] layers.0.self_attn.q_proj[0] layers.1.self_attn.k_proj[0] layers.1.self_attn.q_proj[0]",
        "2 prunable: layers.0.self_attn.k_proj[0] layers.0.self_attn.o_proj[1] layers.0.self_attn.q_proj[0] layers.0.self_attn.v_proj[0]",
        "16 prunable: layers.0.self_attn.o_proj[1] layers.0.self_attn.v_proj[0]",
        "2 prunable: layers.0.self_attn.o_proj[1] layers.0.self_attn.q_proj[0]",
        "2 prunable: layers.1.self_attn.k_proj[0] layers.1.self_attn.o_proj[1] layers.1.self_attn.q_proj[0] layers.1.self_attn.v_proj[0]",
        "16 prunable: layers.1.self_attn.o_proj[1] layers.1.self_attn.v_proj[0]",
        "2 prunable: layers.1.self_attn.o_proj[1] layers.1.self_attn.q_proj[0]",
    ],
}


def test_every_zoo_model_has_a_golden() -> None:
    assert set(GOLDEN) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_golden_groups(name: str, zoo_graphs: dict[str, gp.DependencyGraph]) -> None:
    dg = zoo_graphs[name]
    assert [g.compact() for g in dg.groups] == GOLDEN[name]
    assert dg.diagnostics == []  # every op in the zoo has a rule


@pytest.mark.parametrize("name", sorted(MODELS))
def test_index_maps_cover_members(name: str, zoo_graphs: dict[str, gp.DependencyGraph]) -> None:
    """Every position of a member maps to a channel of the group, and every channel is used."""
    for g in zoo_graphs[name].groups:
        used: set[int] = set()
        for m in g.members:
            assert m.index_map.max() < g.size
            used |= set(m.index_map[m.index_map >= 0].tolist())
        assert used == set(range(g.size)), (g.id, g.compact())

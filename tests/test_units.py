"""Plans mean what they say: a ratio applies to every layer (pruning unit), never compounded.

On real torchvision architectures (random init, 64x64 inputs) and the zoo: with
``Plan(ratio=0.5, round_to=1)`` every conv/linear whose output is prunable keeps exactly half
its output channels (rounded up); with ``round_to=16`` widths are multiples of 16 and no layer
loses more than half; a grouped conv keeps its groups and loses channels inside them, unless
that would break the SIMD blocks of a conv group (then whole groups go).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.models import MODELS
from graphprune.planning.units import pruning_units
from tests.equivalence import outputs

IMAGE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
TORCHVISION = ["densenet121", "squeezenet1_1", "googlenet", "resnext50_32x4d", "regnet_x_400mf"]
ZOO = ["densenet", "inception", "resnext", "mobilenet_v2", "unet", "resnet_bottleneck"]


def torchvision_model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(**kwargs).eval()


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer."""
    return {
        name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    }


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if name in MODELS:
        spec = MODELS[name]
        return spec.build(), spec.example_inputs()
    return torchvision_model(name), (IMAGE,)


@pytest.mark.parametrize("name", ZOO + TORCHVISION)
def test_every_layer_loses_exactly_the_ratio(name: str) -> None:
    model, x = build(name)
    before = layer_widths(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)
    after = layer_widths(pruned)
    report = gp.report(pruned)
    assert outputs(pruned, x).shape == outputs(model, x).shape
    pruned_layers = 0
    for layer, width in before.items():
        kept = after[layer]
        if kept == width:
            continue  # a frozen output (the classifier), or a layer fed by frozen input only
        pruned_layers += 1
        assert kept == width - width // 2, f"{layer}: {width} -> {kept}"
    assert pruned_layers >= len(before) // 2
    # the report says the same per unit (layer)
    assert report.units and all(u.kept == u.total - u.total // 2 for u in report.units)


@pytest.mark.parametrize("name", ["densenet121", "regnet_x_400mf", "resnext50_32x4d"])
def test_round_to_gives_simd_multiples_and_never_removes_more(name: str) -> None:
    model, x = build(name)
    before = layer_widths(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=16), x)
    after = layer_widths(pruned)
    changed = [layer for layer in before if after[layer] != before[layer]]
    assert len(changed) >= len(before) // 3
    for layer in changed:
        assert after[layer] % 16 == 0, f"{layer}: {after[layer]}"
        assert after[layer] >= before[layer] / 2, f"{layer}: {before[layer]} -> {after[layer]}"
    assert gp.report(pruned).macs_ratio < 0.5


def test_grouped_conv_keeps_its_groups_and_half_its_channels() -> None:
    model = torchvision_model("resnext50_32x4d")
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), (IMAGE,))
    conv = pruned.layer1[0].conv2
    assert (conv.groups, conv.in_channels, conv.out_channels) == (32, 64, 64)  # was 32, 128, 128
    held = gp.report(pruned).resolution["held"]
    assert held and all("kept whole" in why for why in held.values())


def test_whole_groups_are_removed_when_rounding_leaves_no_room_inside() -> None:
    """RegNetX-400MF's last stage: 25 groups x 16 channels. round_to=16 cannot shrink a 16-wide
    part, so whole groups go: 25 -> 13 groups of 16 (208 channels, a multiple of 16)."""
    model = torchvision_model("regnet_x_400mf")
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=16), (IMAGE,))
    conv = pruned.trunk_output.block4[0].f.b[0]
    assert model.trunk_output.block4[0].f.b[0].groups == 25
    assert (conv.groups, conv.out_channels) == (13, 208)


def grouped_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
    }


@pytest.mark.parametrize("name", ["regnet_x_400mf", "resnext50_32x4d"])  # 16 and 16/32 per group
def test_grouped_convs_keep_whole_simd_blocks_per_group(name: str) -> None:
    """A conv group of 16 channels is not cut to 8 (onnxruntime would drop the conv out of its
    NCHWc layout): groups whose channels were a multiple of 16 still are, in and out."""
    model, x = build(name)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=16), x)
    before, after = grouped_convs(model), dict(pruned.named_modules())
    aligned = 0
    for layer, conv in before.items():
        new = after[layer]
        assert isinstance(new, nn.Conv2d)
        assert new.out_channels >= conv.out_channels / 2, layer
        for side in ("in_channels", "out_channels"):
            if getattr(conv, side) // conv.groups % 16 == 0:
                aligned += 1
                per_group = getattr(new, side) // new.groups
                assert per_group % 16 == 0, f"{layer}.{side}: {per_group} per group"
    assert aligned >= 4
    if name == "resnext50_32x4d":  # 4 per group (layer1) cannot hold a block: cut inside
        assert after["layer1.0.conv2"].groups == 32


def test_pruned_regnet_stays_in_onnxruntime_blocked_layout(tmp_path: object) -> None:
    """Measured where it matters, onnxruntime's optimised graph: the pruned RegNetX-400MF
    (round_to="auto") runs as many convs outside the NCHWc layout as the original (none) and
    adds no layout reorders; with exact counts (round_to=1) export_onnx reports the convs that
    left the layout and says how to fix it."""
    from pathlib import Path

    from graphprune.onnx.layout import measure_layout

    tmp = Path(str(tmp_path))
    model, x = build("regnet_x_400mf")
    auto = gp.compile(model, gp.Plan(ratio=0.5), x)  # this CPU's block
    exact = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)
    report = gp.export_onnx(exact, x, tmp / "exact.onnx", baseline=model, bench_runs=3)
    original, odd = report.baseline_layout, report.layout
    assert original is not None and odd is not None
    if original.blocked == 0:
        pytest.skip("onnxruntime has no blocked conv layout on this CPU")
    gp.export_onnx(auto, x, tmp / "auto.onnx", verify=False)
    blocked = measure_layout(tmp / "auto.onnx")
    assert (len(blocked.plain), blocked.reorders) == (len(original.plain), original.reorders)
    assert blocked.convs == original.convs and gp.report(auto).macs_ratio < 0.4
    assert len(odd.plain) > len(original.plain) and odd.reorders > original.reorders
    assert "round_to='auto'" in report.table() and odd.plain[0] in report.table()
    grouped = dict(exact.named_modules())[odd.plain[0]]  # named by module, not ONNX node
    assert isinstance(grouped, nn.Conv2d) and grouped.groups > 1


def test_densenet_concat_slices_are_units_with_their_offsets() -> None:
    model, x = build("densenet121")
    dg = gp.analyze(model, x)
    modules = dict(model.named_modules())
    block = dg.groups_of("features.denseblock1.denselayer6.conv2")[0]
    units = pruning_units(dg, [block], modules).units
    names = [u.name for u in units]
    assert names[0] == "features.conv0" and units[0].channels == list(range(64))
    for k in range(1, 7):  # each dense layer writes its own 32 channels after the stem's 64
        unit = units[names.index(f"features.denseblock1.denselayer{k}.conv2")]
        assert unit.channels == list(range(64 + 32 * (k - 1), 64 + 32 * k))


def test_global_scope_respects_max_ratio_per_layer() -> None:
    model, x = build("densenet121")
    before = layer_widths(model)
    plan = gp.Plan(ratio=0.6, scope="global", max_ratio=0.7, round_to=1)
    pruned = gp.compile(model, plan, x)
    after = layer_widths(pruned)
    fractions = [after[k] / before[k] for k in before if after[k] != before[k]]
    assert min(fractions) >= 0.3 - 1e-9  # no layer loses more than max_ratio
    assert max(fractions) - min(fractions) > 0.1  # global: layers differ
    report = gp.report(pruned)
    removed = sum((u.total - u.kept) * u.multiplier for u in report.units)
    total = sum(u.total * u.multiplier for u in report.units)
    assert removed == math.floor(0.6 * total)


def test_min_channels_is_a_floor_per_layer() -> None:
    model, x = build("squeezenet1_1")
    before = layer_widths(model)
    pruned = gp.compile(model, gp.Plan(ratio=0.95, round_to=1, min_channels=8), x)
    after = layer_widths(pruned)
    assert all(after[k] >= min(8, before[k]) for k in before)
    assert min(after[k] for k in before) == 8


@pytest.mark.parametrize("name", ["vit", "gpt", "llama"])
def test_heads_plan_halves_every_attention(name: str) -> None:
    spec = MODELS[name]
    pruned = gp.compile(
        spec.build(), gp.Plan(ratio=0.5, granularity="heads"), spec.example_inputs()
    )
    report = gp.report(pruned)
    assert report.units and all(u.kind in ("heads", "kv_heads") for u in report.units)
    assert all(u.kept * 2 == u.total for u in report.units)


def test_old_records_load_and_newer_ones_are_refused(tmp_path: object) -> None:
    from pathlib import Path

    spec = MODELS["resnet18"]
    x = spec.example_inputs()
    pruned = gp.compile(spec.build(), gp.Plan(ratio=0.5, round_to=1), x)
    path = Path(str(tmp_path)) / "pruned.pt"
    gp.save(pruned, path)
    payload = torch.load(path, weights_only=True)
    record = json.loads(payload["graphprune"])
    assert record["format"] == 2
    record["format"] = 1  # what graphprune wrote before pruning units
    record["resolution"].pop("units")
    record["resolution"].pop("held")
    payload["graphprune"] = json.dumps(record)
    torch.save(payload, path)
    restored = gp.load(spec.build(), path, x)
    assert torch.equal(outputs(restored, x), outputs(pruned, x))
    record["format"] = 99
    payload["graphprune"] = json.dumps(record)
    torch.save(payload, path)
    with pytest.raises(gp.InputError, match="format 99 is newer"):
        gp.load(spec.build(), path, x)

"""One-shot pruning: wanda importance, least-squares reconstruction, SparseGPT."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.analysis import analyze
from graphprune.cli import main as cli_main
from graphprune.models.cnn import BasicBlock, ResNet
from graphprune.models.transformers import GPT
from graphprune.oneshot import calibration
from graphprune.oneshot.reconstruct import Statistics
from graphprune.planning.importance import score_groups


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(b) for b in batches])


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    calib = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    # a trained network's BatchNorm statistics match its data: estimate them on these batches
    gp.recalibrate_norms(model, calib)
    return model, torch.randn(2, 3, 32, 32), calib


@pytest.fixture(scope="module")
def gpt() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64).eval()
    return model, torch.randint(0, 96, (2, 16)), [torch.randint(0, 96, (8, 32)) for _ in range(4)]


# -- structured reconstruction --------------------------------------------------------------------
def test_refit_lowers_every_layer_error_and_the_output_error(cnn: Any) -> None:
    model, x, calib = cnn
    plain = gp.compile(model, gp.Plan(ratio=0.5, importance="wanda"), x, calibration=calib)
    rebuilt = gp.compile(
        model, gp.Plan(ratio=0.5, importance="wanda", reconstruct=True), x, calibration=calib
    )
    fits = gp.report(rebuilt).reconstruction
    convs = [
        f for f in fits if "conv" in f.module or "downsample.0" in f.module or f.module == "fc"
    ]
    assert len(convs) >= 8  # every layer whose inputs were pruned
    for f in fits:
        assert f.method == "least squares", f
        assert f.error_after <= f.error_before + 1e-12, f  # never worse
    assert sum(f.error_after < 0.8 * f.error_before for f in convs) >= len(convs) - 1
    # kept-weight structure is the same: reconstruction changes values, not shapes
    assert [p.shape for p in plain.parameters()] == [p.shape for p in rebuilt.parameters()]
    reference = _outputs(model, calib)
    before = _relative_error(_outputs(plain, calib), reference)
    after = _relative_error(_outputs(rebuilt, calib), reference)
    assert after < 0.5 * before, (before, after)
    # the last layer's reported error is its real error in the final model (fc is the output)
    fc = next(f for f in fits if f.module == "fc")
    assert math.isclose(after, fc.error_after, rel_tol=1e-3), (after, fc.error_after)


def test_refit_heads_and_output_layer_of_a_transformer(gpt: Any) -> None:
    model, x, calib = gpt
    rebuilt = gp.compile(
        model, gp.Plan(granularity="heads", ratio=0.5, reconstruct=True), x, calibration=calib
    )
    plain = gp.compile(model, gp.Plan(granularity="heads", ratio=0.5), x, calibration=calib)
    fits = {f.module: f for f in gp.report(rebuilt).reconstruction}
    assert set(fits) == {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}
    assert all(f.error_after < 0.5 * f.error_before for f in fits.values())
    reference = _outputs(model, calib)
    assert _relative_error(_outputs(rebuilt, calib), reference) < 0.5 * _relative_error(
        _outputs(plain, calib), reference
    )


class _Pair(nn.Module):
    """Two layers; the removed hidden channels are linear combinations of the kept ones."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        if conv:
            self.first: nn.Module = nn.Conv2d(3, 16, 3, padding=1)
            self.second: nn.Module = nn.Conv2d(16, 4, 3, padding=1)
        else:
            self.first, self.second = nn.Linear(6, 16), nn.Linear(16, 4)
        with torch.no_grad():
            mix = 0.1 * torch.randn(8, 8)  # small: the combined channels score lowest (l2)
            w = self.first.weight  # (16, in, ...)
            w[8:] = torch.einsum("rk,k...->r...", mix, w[:8])
            self.first.bias[8:] = mix @ self.first.bias[:8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@pytest.mark.parametrize("conv", [False, True])
def test_linear_dependent_channels_are_reconstructed_exactly(conv: bool) -> None:
    model = _Pair(conv).eval()
    shape = (32, 3, 8, 8) if conv else (64, 6)
    calib = [torch.randn(*shape) for _ in range(4)]
    plan = gp.Plan(ratio=0.5, round_to=1, importance="l2", reconstruct=True)
    rebuilt = gp.compile(model, plan, calib[0][:2], calibration=calib)
    plain = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), calib[0][:2], calibration=calib)
    assert rebuilt.first.weight.shape[0] == 8
    kept = gp.report(rebuilt).resolution
    assert kept  # the 8 independent channels are the ones kept
    test = torch.randn(*shape)
    with torch.no_grad():
        expected, got, naive = model(test), rebuilt(test), plain(test)
    assert (naive - expected).abs().max() > 1e-2  # pruning alone changes the output
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_one_layer_of_statistics_at_a_time(cnn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, calib = cnn
    alive: list[int] = []
    original_init = Statistics.__init__

    def counting_init(self: Statistics, columns: int, outputs: int) -> None:
        original_init(self, columns, outputs)
        alive.append(len(Statistics.live))

    monkeypatch.setattr(Statistics, "__init__", counting_init)
    gp.compile(model, gp.Plan(ratio=0.5, reconstruct=True), x, calibration=calib)
    assert len(alive) >= 8 and max(alive) == 1, alive


def test_save_load_and_target_macs_with_reconstruction(cnn: Any, tmp_path: Any) -> None:
    model, x, calib = cnn
    plan = gp.Plan(target_macs=0.5, importance="wanda", reconstruct=True)
    rebuilt = gp.compile(model, plan, x, calibration=calib)
    assert gp.report(rebuilt).macs_ratio <= 0.5
    assert gp.report(rebuilt).reconstruction
    gp.save(rebuilt, tmp_path / "m.pt")
    fresh = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    loaded = gp.load(fresh, tmp_path / "m.pt", x)
    torch.testing.assert_close(_outputs(loaded, calib[:1]), _outputs(rebuilt, calib[:1]))


def test_pruner_steps_reconstruct(cnn: Any) -> None:
    model, x, calib = cnn
    pruner = gp.Pruner(
        model, gp.Plan(ratio=0.5, reconstruct=True), x, steps=2, calibration=calib, progress=False
    )
    final = pruner.run()
    assert gp.report(final).reconstruction  # the last step refit its layers too
    reference = _outputs(model, calib)
    plain = gp.Pruner(model, gp.Plan(ratio=0.5), x, steps=2, calibration=calib, progress=False)
    assert _relative_error(_outputs(final, calib), reference) < _relative_error(
        _outputs(plain.run(), calib), reference
    )


# -- SparseGPT ----------------------------------------------------------------------------
def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.bool() for n, m in gp.masked_layers(model).items()}


def test_sparsegpt_keeps_n_m_pattern_and_masks_exact(gpt: Any) -> None:
    model, x, calib = gpt
    rebuilt = gp.compile(model, gp.Plan(granularity="n:m", reconstruct=True), x, calibration=calib)
    plain = gp.compile(model, gp.Plan(granularity="n:m"), x, calibration=calib)
    masks = _masks(rebuilt)
    assert len(masks) == 8  # c_attn, c_proj, c_fc, mlp.c_proj of 2 blocks (lm_head is tied)
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), name  # exactly 2 of every 4 inputs kept
        weight = rebuilt.get_submodule(name).weight
        assert (weight[~mask] == 0).all()
    fits = gp.report(rebuilt).reconstruction
    assert len(fits) == 8 and all(f.error_after < f.error_before for f in fits)
    reference = _outputs(model, calib)
    assert _relative_error(_outputs(rebuilt, calib), reference) < 0.5 * _relative_error(
        _outputs(plain, calib), reference
    )
    # baking keeps the pattern (finalize) and the numbers
    baked = gp.finalize(rebuilt)
    torch.testing.assert_close(_outputs(baked, calib[:1]), _outputs(rebuilt, calib[:1]))


def test_sparsegpt_unstructured_counts_and_conv_n_m(gpt: Any, cnn: Any) -> None:
    model, x, calib = gpt
    rebuilt = gp.compile(
        model, gp.Plan(granularity="unstructured", ratio=0.5, reconstruct=True), x,
        calibration=calib,
    )  # fmt: skip
    for name, mask in _masks(rebuilt).items():
        assert int((~mask).sum()) == math.floor(0.5 * mask.numel()), name
    conv, cx, ccalib = cnn
    nm = gp.compile(conv, gp.Plan(granularity="n:m", reconstruct=True), cx, calibration=ccalib)
    masks = _masks(nm)
    assert masks
    for name, mask in masks.items():
        if mask.dim() == 4:  # (out, in, kh, kw): groups of 4 consecutive inputs per position
            groups = mask.permute(0, 2, 3, 1).reshape(mask.shape[0], -1, 4)
        else:
            groups = mask.reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), name
    assert all(f.error_after <= f.error_before for f in gp.report(nm).reconstruction)


@pytest.mark.parametrize("case", ["gpt", "cnn"])
def test_sparsegpt_in_one_forward_equals_a_forward_per_layer(
    case: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacked batches run once (each layer pruned in its pre-hook) give the masks and
    weights of the per-layer forwards: the same sequential SparseGPT, L forwards fewer."""
    model, x, calib = request.getfixturevalue(case)
    plan = gp.Plan(granularity="unstructured", ratio=0.5, reconstruct=True)
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        stacked = gp.compile(model, plan, x, calibration=calib)
        one_forward = len(forwards)
        forwards.clear()
        monkeypatch.setattr(calibration, "STACK_BYTES", 0)  # too large to stack: per layer
        per_layer = gp.compile(model, plan, x, calibration=calib)
    finally:
        hook.remove()
    layers = len(gp.report(per_layer).reconstruction)
    assert len(forwards) - one_forward >= (layers - 1) * len(calib)  # L x batches forwards
    a, b = _masks(stacked), _masks(per_layer)
    assert a.keys() == b.keys() and len(a) >= 4
    for name in a:
        agree = float((a[name] == b[name]).float().mean())
        assert agree > 0.99, (name, agree)  # float32 Hessians of other row sums: ties may flip
    fits_a = {f.module: f for f in gp.report(stacked).reconstruction}
    for f in gp.report(per_layer).reconstruction:
        assert fits_a[f.module].rows == f.rows
        assert fits_a[f.module].error_after == pytest.approx(f.error_after, rel=0.05, abs=1e-6)


@pytest.mark.parametrize("case", ["gpt", "cnn"])
def test_refit_in_lockstep_equals_a_forward_per_layer(
    case: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structured reconstruction with the original and the pruned model run side by side
    once (the original one layer ahead, in a worker thread) fits what a forward per layer
    and batch fits."""
    model, x, calib = request.getfixturevalue(case)
    plan = gp.Plan(ratio=0.5, importance="wanda", reconstruct=True)
    lockstep = gp.compile(model, plan, x, calibration=calib)
    monkeypatch.setattr(calibration, "STACK_BYTES", 0)
    per_layer = gp.compile(model, plan, x, calibration=calib)
    fits = {f.module: f for f in gp.report(lockstep).reconstruction}
    assert len(fits) >= 4 and fits.keys() == {f.module for f in gp.report(per_layer).reconstruction}
    for f in gp.report(per_layer).reconstruction:
        got = fits[f.module]
        assert (got.method, got.rows) == (f.method, f.rows), f.module
        assert got.error_after == pytest.approx(f.error_after, rel=1e-3, abs=1e-9, nan_ok=True)
    torch.testing.assert_close(
        _outputs(lockstep, calib), _outputs(per_layer, calib), rtol=1e-3, atol=1e-4
    )


def test_stack_batches() -> None:
    a, b = torch.randn(2, 3), torch.randn(5, 3)
    stacked = calibration.stack_batches([a, b])
    assert stacked is not None and stacked.sizes == [2, 5]
    assert isinstance(stacked.inputs, tuple) and torch.equal(stacked.inputs[0], torch.cat([a, b]))
    parts = stacked.parts(torch.arange(7.0))  # dim 0 = the stacked batch: split per batch
    assert [len(p) for p in parts] == [2, 5]
    assert [len(p) for p in stacked.parts(torch.arange(10.0))] == [5, 5]  # else equal chunks
    kw = calibration.stack_batches([{"x": a, "flag": True}, {"x": b, "flag": True}])
    assert kw is not None and kw.inputs["flag"] is True and kw.inputs["x"].shape == (7, 3)
    assert calibration.stack_batches([a, torch.randn(2, 4)]) is None  # other widths
    assert calibration.stack_batches([{"x": a, "n": 1}, {"x": b, "n": 2}]) is None
    assert calibration.stack_batches([(a, torch.randn(3, 3)), (a, torch.randn(3, 3))]) is None
    assert calibration.stack_batches([(a, None), (b, a)]) is None  # a tensor in one batch only
    arrays = [(a, np.zeros(2)), (b, np.zeros(2))]  # == is not a bool: not stacked, no error
    assert calibration.stack_batches(arrays) is None
    one = calibration.stack_batches([a])  # one batch: itself, not copied
    assert one is not None and one.inputs[0] is a


def test_lockstep_raises_the_reference_forwards_error_and_cleans_up() -> None:
    """An error in the original's forward (worker thread) reaches the caller as itself, and
    neither model keeps a hook; a forward that calls the layers in another order is an
    error, not a silent wrong fit."""

    class Boom(nn.Module):
        def __init__(self, fail: bool) -> None:
            super().__init__()
            self.a, self.b, self.fail = nn.Linear(4, 4), nn.Linear(4, 4), fail

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise ValueError("original broke")
            return self.b(self.a(x))

    class Swapped(Boom):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(self.b(x))

    batches = [torch.randn(2, 4), torch.randn(3, 4)]
    pruned = Boom(False)
    order = calibration.call_order(pruned, ["a", "b"], batches[0])
    seen: list[str] = []

    def visit(name: str, layer: nn.Module, parts: list[torch.Tensor], ref: Any) -> None:
        seen.append(name)

    def reference(name: str, layer: nn.Module, parts: list[torch.Tensor]) -> str:
        return name

    with pytest.raises(ValueError, match="original broke"):
        calibration.in_lockstep(Boom(True), pruned, order, batches, reference, visit)
    with pytest.raises(gp.GraphPruneError, match="different orders"):
        calibration.in_lockstep(Swapped(False), pruned, order, batches, reference, visit)
    for m in (pruned.a, pruned.b):
        assert not m._forward_pre_hooks
    assert calibration.in_lockstep(Boom(False), pruned, order, batches, reference, visit)
    assert seen[-2:] == ["a", "b"]


def test_sparse_pruner_steps_keep_masks_nested(gpt: Any) -> None:
    model, x, calib = gpt
    plan = gp.Plan(granularity="unstructured", ratio=0.6, reconstruct=True)
    pruner = gp.Pruner(model, plan, x, steps=2, calibration=calib, progress=False)
    steps = list(pruner)
    assert len(steps) == 2
    final = _masks(pruner.model)
    for name, mask in final.items():
        weight = pruner.model.get_submodule(name).weight
        assert (weight[~mask] == 0).all()
        assert int((~mask).sum()) == math.floor(0.6 * mask.numel())


# -- wanda --------------------------------------------------------------------------------
def test_wanda_group_scores_are_weight_times_input_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    batches = [torch.randn(10, 5) for _ in range(3)]
    dg = analyze(model, batches[0])
    group = next(g for g in dg.groups if g.prunable and g.size == 6)
    scores = score_groups(model, dg, [group], "wanda", batches=batches)[group.id]
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](b)) for b in batches]).double()
    norms = hidden.norm(dim=0)  # ||x_j|| of the consumer's inputs
    consumer = model[2].weight.detach().double().abs().sum(0) * norms
    producer = model[0].weight.detach().double().pow(2).sum(1)
    bias = model[0].bias.detach().double().pow(2)
    expected = sum(t / t.mean() for t in (consumer, producer, bias))
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-9)


def test_wanda_masks_compare_per_output_row_with_input_norms(gpt: Any) -> None:
    model, x, calib = gpt
    pruned = gp.compile(
        model, gp.Plan(granularity="unstructured", ratio=0.5, importance="wanda"), x,
        calibration=calib,
    )  # fmt: skip
    name = "transformer.h.1.mlp.c_fc"
    inputs: list[torch.Tensor] = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    _outputs(model, calib)
    hook.remove()
    norms = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double().norm(dim=0)
    score = model.get_submodule(name).weight.detach().double().abs() * norms
    mask = _masks(pruned)[name]
    assert ((~mask).sum(1) == score.shape[1] // 2).all()  # per output row
    kept_min = torch.where(mask, score, torch.inf).min(1).values
    cut_max = torch.where(~mask, score, -torch.inf).max(1).values
    assert (cut_max <= kept_min).all()


# -- plan and CLI -----------------------------------------------------------------------------
def test_plan_reconstruct_round_trips_and_rejects_layers() -> None:
    plan = gp.Plan(ratio=0.3, importance="wanda", reconstruct=True)
    assert gp.Plan.from_json(plan.to_json()) == plan
    with pytest.raises(gp.PlanError, match="reconstruct"):
        gp.Plan(ratio=0.5, granularity="layers", reconstruct=True)


def test_cli_reconstruct_with_calibration_file(tmp_path: Any, capsys: Any) -> None:
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, 32, 32), data)
    code = cli_main(
        ["compile", "resnet18", "--input-shape", "3,32,32", "--ratio", "0.5",
         "--importance", "wanda", "--reconstruct", "--calibration", str(data)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "reconstructed layers:" in out and "least squares" in out
    bad = tmp_path / "bad.pt"
    bad.write_text("not a tensor")
    assert cli_main(["compile", "resnet18", "--reconstruct", "--calibration", str(bad)]) != 0
    assert "--calibration" in capsys.readouterr().err  # a clear message, not a traceback


class _GatedMLP(nn.Module):
    """gate and up read one tensor (as q, k, v do): SparseGPT needs one Hessian for both."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(32, 48), nn.Linear(32, 48), nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


def test_sparsegpt_shares_the_hessian_of_one_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers that read the very same tensor share its Hessian and inverse factor (two of
    three made here), with the weights of computing each: bit for bit."""
    from graphprune.oneshot import reconstruct

    torch.manual_seed(0)
    model, calib = _GatedMLP().eval(), [torch.randn(8, 32) for _ in range(3)]
    plan = gp.Plan(granularity="n:m", reconstruct=True)
    made: list[int] = []
    real = reconstruct._hessian
    monkeypatch.setattr(
        reconstruct,
        "_hessian",
        lambda *a: made.append(1) or real(*a),  # type: ignore[func-returns-value]
    )
    shared = gp.compile(model, plan, calib[0], calibration=calib)
    assert len(made) == 2
    made.clear()
    monkeypatch.setattr(reconstruct.SharedInput, "find", lambda *_: None)
    alone = gp.compile(model, plan, calib[0], calibration=calib)
    assert len(made) == 3
    for (name, a), (_, b) in zip(gp.finalize(shared).state_dict().items(),
                                 gp.finalize(alone).state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_stacked_forwards_stop_once_the_last_layer_is_visited() -> None:
    """What follows the last visited layer (a language model's logits: the largest activation
    of all) is never computed, by the pruned model nor by the original in lockstep; a forward
    that ends before a layer is still an error."""

    class Net(nn.Module):
        def __init__(self, skip_b: bool = False) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 64)
            self.skip_b, self.heads_run = skip_b, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            x = x if self.skip_b else self.b(x)
            self.heads_run += 1
            return self.head(x)

    batches = [torch.randn(2, 4), torch.randn(3, 4)]
    pruned, original = Net(), Net()
    order = calibration.call_order(pruned, ["a", "b"], batches[0])
    pruned.heads_run = 0
    seen: list[tuple[str, int]] = []

    def visit(name: str, layer: nn.Module, parts: list[torch.Tensor], *_: Any) -> None:
        seen.append((name, sum(len(p) for p in parts)))

    assert calibration.in_one_forward(pruned, order, batches, visit) == []
    assert seen == [("a", 5), ("b", 5)] and pruned.heads_run == 0

    def reference(name: str, layer: nn.Module, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(p) for p in parts]

    seen.clear()
    assert calibration.in_lockstep(original, pruned, order, batches, reference, visit)
    assert seen == [("a", 5), ("b", 5)]
    assert (original.heads_run, pruned.heads_run) == (0, 0)
    with pytest.raises(gp.GraphPruneError, match="different orders"):
        calibration.in_lockstep(Net(skip_b=True), pruned, order, batches, reference, visit)

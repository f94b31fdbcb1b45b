"""Latency-targeted plans: tables, their cache, allocation, compile, Pruner, CLI."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.cli import build_parser, plan_from_args
from graphprune.models.cnn import BasicBlock, ResNet
from graphprune.onnx.op_latency import LatencyCache, cpu_name
from graphprune.onnx.runtimes import RUNTIMES, get_runtime
from graphprune.planning.latency.allocate import (
    CostModel,
    PrunableUnit,
    TimedLayer,
    Width,
    allocate,
    cost_model,
)
from graphprune.planning.latency.tables import LayerTable, OpShape
from graphprune.planning.plan import LATENCY_RUNTIMES
from graphprune.planning.units import Unit


@pytest.fixture
def cache_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GRAPHPRUNE_CACHE_DIR", str(tmp_path))
    return tmp_path


def _resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    """ResNet layout, widths 32-256: every stage is wider than round_to, so the latency floor
    is far below the targets tested (the zoo's 16-wide stem stage cannot be pruned)."""
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], widths=(32, 64, 128, 256)).eval(), torch.randn(
        1, 3, 64, 64
    )


def test_tables_are_measured_once_cached_on_disk_and_reused(cache_dir: Any) -> None:
    model, x = _resnet()
    plan = gp.Plan(target_latency=0.5)
    first = LatencyCache()
    costs = cost_model(model, plan, x, [x], None, first, progress=False)
    assert first.measured > 0 and first.seconds > 0
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(costs.layers) == len(layers) == 13  # every conv and the fc
    stored = json.loads((cache_dir / "latency-tables.json").read_text())
    assert len(stored) == first.measured
    key = json.loads(next(iter(stored)))
    assert key["threads"] == 2 and key["cpu"] == cpu_name() and "ort" in key
    second = LatencyCache()
    again = cost_model(model, plan, x, [x], None, second, progress=False)
    assert second.measured == 0 and second.hits >= first.measured  # nothing timed again
    for name, table in costs.tables.items():
        np.testing.assert_array_equal(table.seconds, again.tables[name].seconds)
    # a table interpolates between its measured widths and is exact on them
    table = next(t for t in costs.tables.values() if len(t.ins) > 1 and len(t.outs) > 1)
    assert table(table.ins[-1], table.outs[-1]) == pytest.approx(table.seconds[-1, -1])
    mid = table((table.ins[0] + table.ins[1]) / 2, table.outs[0])
    lo, hi = sorted((table.seconds[0, 0], table.seconds[1, 0]))
    assert lo <= mid <= hi


def _synthetic(importance: tuple[float, float]) -> CostModel:
    """Two units of 64 channels feeding one layer each; seconds = in * out * 1e-6."""
    layers, tables, units = [], {}, {}
    widths = list(range(8, 65, 8))
    seconds = np.array([[i * o * 1e-6 for o in widths] for i in widths])
    for uid, weight in enumerate(importance):
        unit = Unit(uid, uid, list(range(64)), [f"p{uid}"], [f"p{uid}"])
        units[uid] = PrunableUnit(unit, widths, np.full(64, weight))
        op = OpShape("linear", (1,))
        layers.append(TimedLayer(f"p{uid}", op, Width(64.0), Width(0.0, {uid: 1.0})))
        layers.append(TimedLayer(f"c{uid}", op, Width(0.0, {uid: 1.0}), Width(64.0)))
        for name in (f"p{uid}", f"c{uid}"):
            tables[name] = LayerTable(name, widths, widths, seconds)
    return CostModel(layers, tables, units, {0: 64, 1: 64})


def test_allocation_meets_the_budget_and_cuts_the_least_important_unit_first() -> None:
    costs = _synthetic(importance=(0.1, 1.0))
    kept = allocate(costs, 0.6)
    assert costs.ratio(kept) <= 0.6
    assert costs.ratio(kept) > 0.6 - 0.125 / 2  # stops at the first step under the budget
    assert kept[0] < kept[1]  # unit 0 is ten times less important
    assert all(k % 8 == 0 for k in kept.values())  # round_to steps
    with pytest.raises(gp.PlanError, match=r"best achievable is 0\.125"):
        allocate(costs, 0.05)  # floors: 8 of 64 channels -> 1/8 of the time


def test_compile_to_a_latency_target_reports_prediction_and_measurement(cache_dir: Any) -> None:
    model, x = _resnet()
    pruned = gp.compile(model, gp.Plan(target_latency=0.75), x)
    report = gp.report(pruned)
    lat = report.latency
    assert lat["target"] == 0.75 and lat["original_ms"] > 0
    assert 1 <= len(lat["rounds"]) <= 4
    for r in lat["rounds"]:
        assert 0 < r["predicted"] <= r["budget"] + 1e-9  # the allocator met its budget
        assert r["measured"] > 0 and 0 < r["macs_ratio"] < 1
    assert lat["measured"] == lat["rounds"][lat["chosen"]]["measured"]
    assert report.plan["target_latency"] == 0.75  # the user's plan, not the per-unit one
    assert "latency (onnxruntime, measured)" in report.table()
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert report.macs_ratio < 1.0


def test_latency_rounds_export_the_original_once_and_refit_only_the_chosen_plan(
    cache_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original is exported once for every round's timing (and each round's model once:
    exports are reused by content); the rounds are compiled without the refit (values, not
    shapes: latency does not change) and only the chosen plan is refit, so the result is the
    chosen round's shapes with reconstructed weights."""
    from graphprune.onnx import export_cache
    from graphprune.stages import structured as structured_stage

    exported: list[torch.nn.Module] = []
    refits: list[int] = []
    real_export, real_refit = export_cache.export, structured_stage.refit_consumers
    monkeypatch.setattr(
        export_cache, "export", lambda m, *a, **k: exported.append(m) or real_export(m, *a, **k)
    )
    monkeypatch.setattr(export_cache, "EXPORTS", export_cache.ExportCache())  # none cached yet
    monkeypatch.setattr(
        structured_stage, "refit_consumers",
        lambda *a, **k: refits.append(1) or real_refit(*a, **k),
    )  # fmt: skip
    model, x = _resnet()
    calib = [torch.randn(4, 3, 64, 64) for _ in range(3)]
    plan = gp.Plan(target_latency=0.75, importance="wanda", reconstruct=True)
    pruned = gp.compile(model, plan, x, calibration=calib)
    found = gp.report(pruned)
    lat = found.latency
    assert sum(m is model for m in exported) == 1  # the original: once
    # and each round's model (rounds that made the very same model: one export)
    assert len(exported) == 1 + len({r["macs_ratio"] for r in lat["rounds"]})
    assert refits == [1]  # the chosen plan only
    assert found.reconstruction and all(
        f.error_after <= f.error_before for f in found.reconstruction if f.method != "skipped"
    )
    chosen = lat["rounds"][lat["chosen"]]
    assert found.macs_ratio == pytest.approx(chosen["macs_ratio"])  # the measured shapes


def test_unreachable_latency_names_the_best_achievable(cache_dir: Any) -> None:
    model, x = _resnet()
    with pytest.raises(gp.PlanError, match="best achievable is"):
        gp.compile(model, gp.Plan(target_latency=0.01, max_ratio=0.5), x)


def test_plan_validation_and_cli_flags() -> None:
    plan = gp.Plan(target_latency=0.5, latency_threads=1)
    assert gp.Plan.from_json(plan.to_json()) == plan
    with pytest.raises(gp.PlanError, match="exactly one"):
        gp.Plan(ratio=0.5, target_latency=0.5)
    with pytest.raises(gp.PlanError, match="granularity"):
        gp.Plan(target_latency=0.5, granularity="heads")
    with pytest.raises(gp.PlanError, match="outside"):
        gp.Plan(target_latency=1.5)
    with pytest.raises(gp.PlanError, match="latency targets do not apply"):
        gp.Plan(granularity="unstructured", ratio=0.5, target_latency=0.5)
    args = build_parser().parse_args(["compile", "resnet18", "--target-latency", "0.5"])
    parsed = plan_from_args(args)
    assert parsed.target_latency == 0.5 and parsed.ratio is None
    args = build_parser().parse_args(["compile", "resnet18", "--target-latency-ms", "3"])
    assert plan_from_args(args).target_latency_ms == 3.0
    with pytest.raises(gp.PlanError, match="latency_runtime='tensorrt'"):
        gp.Plan(target_latency=0.5, latency_runtime="tensorrt")
    args = build_parser().parse_args(
        ["compile", "resnet18", "--target-latency", "0.5", "--latency-runtime", "openvino"]
    )
    assert plan_from_args(args).latency_runtime == "openvino"
    assert tuple(RUNTIMES) == LATENCY_RUNTIMES  # the plan knows every runtime there is


@pytest.mark.skipif(not get_runtime("openvino").available(), reason="openvino not installed")
def test_latency_tables_and_targets_in_openvino(cache_dir: Any) -> None:
    """The same plan, planned and measured in OpenVINO: its own tables (cache keys name the
    runtime), its own measured rounds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # wide enough that compute, not call overhead, is timed
        torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
        torch.nn.ReLU(), torch.nn.Linear(2048, 10),
    ).eval()  # fmt: skip
    x = torch.randn(32, 512)
    plan = gp.Plan(target_latency=0.7, latency_runtime="openvino")
    cache = LatencyCache(runtime="openvino")
    costs = cost_model(model, plan, x, [x], None, cache, progress=False)
    assert cache.measured > 0 and len(costs.layers) == 3
    keys = [json.loads(k) for k in json.loads((cache_dir / "latency-tables.json").read_text())]
    assert keys and all(k["runtime"] == "openvino" and "ort" not in k for k in keys)
    pruned = gp.compile(model, plan, x)
    lat = gp.report(pruned).latency
    assert lat is not None and lat.runtime == "openvino"
    assert "latency (openvino, measured)" in gp.report(pruned).table()
    assert 0 < lat.measured < 1.0 and gp.report(pruned).macs_ratio < 0.9


def test_pruner_steps_end_at_the_latency_target(
    cache_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphprune.finetune import pruner as pruner_module

    measured: list[float] = []  # the current model's ms, as each step measures it
    real = pruner_module.measure_ratio

    def recording(*args: Any, **kwargs: Any) -> tuple[float, float]:
        ratio, ms = real(*args, **kwargs)
        measured.append(ms)
        return ratio, ms

    monkeypatch.setattr(pruner_module, "measure_ratio", recording)
    model, x = _resnet()
    pruner = gp.Pruner(model, gp.Plan(target_latency=0.75), x, steps=2, progress=False)
    planned: list[tuple[gp.Plan, float]] = []  # each step's plan, with the ms it was given for
    compile_step, prune_step = pruner._compile, pruner._prune_to
    currents: list[float] = []  # the current model's ms each step used (the last one measured)
    monkeypatch.setattr(
        pruner, "_compile", lambda p: planned.append((p, measured[-1])) or compile_step(p)
    )
    monkeypatch.setattr(
        pruner, "_prune_to", lambda *a: (prune_step(*a), currents.append(measured[-1]))[0]
    )
    final = pruner.run()
    # the first step prunes the original, timed once at the start: it always compiles
    assert len(pruner.history) == 2 and planned and planned[0][1] == measured[0]
    # each step asks for its scheduled share of the *original's* latency, as a fraction of the
    # model it prunes; the last share is the target, 0.75
    budgets = [(1 - r) * pruner._latency_ms0 for r in pruner.ratios]
    assert budgets[-1] == pytest.approx(0.75 * pruner._latency_ms0)
    for plan, current in planned:
        assert any(plan.target_latency * current == pytest.approx(b) for b in budgets)
    # a step that did not compile found its budget met already (within the 2 % it allows) by
    # the measurement of the current model; each model is timed once
    assert len(measured) == 2  # the original at the start, then step 0's model in step 1
    for budget, current in zip(budgets, currents, strict=True):
        if not any(plan.target_latency * c == pytest.approx(budget) for plan, c in planned):
            assert 0.98 * current <= budget
    if len(planned) == 2:  # the last step compiled to the target itself
        assert planned[-1][0].target_latency * planned[-1][1] == pytest.approx(budgets[-1])
    assert gp.report(final).latency["target"] == planned[-1][0].target_latency
    assert pruner.history[-1].macs < pruner._macs0

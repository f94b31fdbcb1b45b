"""advise: every kind of pruning built one-shot, exported, verified and measured per runtime.

A real run on a CNN trained on the digits data (accuracy through each exported file, both
runtimes), the Pareto marking and the recommendation on a synthetic table, candidate
generation, a missing runtime, a runtime that cannot load a candidate, an evaluate that
fails, the budget, the CLI, and int8 weights stored compactly.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.advise import Advice, Candidate, advise, default_candidates, pareto_front
from graphprune.advise.candidates import ORIGINAL, check_candidates
from graphprune.advise.measure import Row, RuntimeResult
from graphprune.advise.memory import MemoryProbe
from graphprune.advise.plot import plot_advice
from graphprune.advise.quality import OnnxModule, Quality
from graphprune.cli import main
from graphprune.models import MODELS
from graphprune.onnx.export import export
from graphprune.onnx.quantize import quantize
from graphprune.onnx.runtimes import OpenVinoCPU, RuntimeLoadError, get_runtime
from graphprune.onnx.sparse_storage import pack_sparse_weights
from tests.digits import digits_cnn

HAS_OPENVINO = get_runtime("openvino").available()


@pytest.fixture
def cache_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GRAPHPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


# -- candidates ---------------------------------------------------------------------------------
def test_default_candidates_cover_every_kind_cheapest_first() -> None:
    found = default_candidates(runtime="openvino", threads=3)
    names = [c.name for c in found]
    assert names == [
        "original (fp32)", "int8", "unstructured 50%", "unstructured 75%", "unstructured 90%",
        "2:4", "unstructured 90% + int8", "structured 75% latency", "structured 50% latency",
        "structured 35% latency", "structured 50% latency + int8",
    ]  # fmt: skip
    by_name = {c.name: c for c in found}
    assert [c.cost for c in found[:6]] == sorted(c.cost for c in found[:6])
    for s in (0.5, 0.75, 0.9):
        c = by_name[f"unstructured {s:.0%}"]
        assert c.plan is not None and c.plan.granularity == "unstructured"
        assert c.plan.ratio == s and c.plan.reconstruct and c.compact  # SparseGPT, compact
    two_four = by_name["2:4"].plan
    assert two_four is not None and two_four.nm == [2, 4] and two_four.reconstruct
    structured = by_name["structured 50% latency"].plan
    assert structured is not None and structured.target_latency == 0.5
    assert structured.importance == "wanda" and structured.reconstruct
    assert structured.latency_runtime == "openvino" and structured.latency_threads == 3
    combined = by_name["structured 50% latency + int8"]
    assert combined.int8 and combined.base == "structured 50% latency" and combined.plan is None
    assert by_name["unstructured 90% + int8"].base == "unstructured 90%"


def test_candidate_lists_are_checked() -> None:
    int8 = Candidate("int8", "dense", int8=True)
    assert check_candidates([int8])[0] == ORIGINAL  # the reference is added, first
    with pytest.raises(gp.InputError, match="two candidates are named 'int8'"):
        check_candidates([int8, int8])
    with pytest.raises(gp.InputError, match="reuses 'nope'"):
        check_candidates([Candidate("x", "dense", int8=True, base="nope")])
    with pytest.raises(gp.InputError, match="kind="):
        check_candidates([Candidate("x", "sparse", int8=True)])
    with pytest.raises(gp.InputError, match="the original's weights unchanged"):
        check_candidates([ORIGINAL, Candidate("again", "dense")])
    plan = gp.Plan(granularity="n:m", nm=[2, 4])
    with pytest.raises(gp.InputError, match=r"would write 2-4\.onnx"):
        check_candidates([Candidate("2:4", "2:4", plan), Candidate("2-4", "2:4", plan)])
    with pytest.raises(gp.InputError, match="original's export"):
        check_candidates([Candidate("Original", "dense", int8=True)])


# -- Pareto and the recommendation, on a synthetic table ---------------------------------------
def test_pareto_front_of_points() -> None:
    # (cost, quality): b dominates c; a and d trade off; e equals a (neither dominates)
    points = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (4.0, 0.95), (1.0, 0.5)]
    assert pareto_front(points) == [True, True, False, True, True]
    assert pareto_front([]) == []


def _row(name: str, kind: str, quality: float, ms: float, size: int, **kw: Any) -> Row:
    candidate = Candidate(name, kind, **kw)
    timed = RuntimeResult("onnxruntime", {1: ms}, {1: 10.0})
    return Row(
        candidate, "measured", file_bytes=size, macs=100, quality=Quality(quality, "accuracy"),
        runtimes={"onnxruntime": timed},
    )  # fmt: skip


def _synthetic_advice(reference_ms: float = 10.0) -> Advice:
    rows = [
        _row("original (fp32)", "dense", 0.95, reference_ms, 4000),
        _row("int8", "dense", 0.948, 7.0, 1000, int8=True),
        _row("unstructured 90%", "unstructured", 0.90, 9.9, 600,
             plan=gp.Plan(granularity="unstructured", ratio=0.9)),
        _row("structured 50% latency", "structured", 0.946, 5.0, 2000,
             plan=gp.Plan(target_latency=0.5)),
        _row("structured 35% latency", "structured", 0.80, 3.0, 1500,
             plan=gp.Plan(target_latency=0.35)),
        Row(Candidate("2:4", "2:4"), reason="budget: expected ~60 s, 10 s left"),
    ]
    return Advice(rows, ["onnxruntime"], {"openvino": "not installed (pip install openvino)"},
                  (1,), 2, "test CPU", 0.01, 900.0, 12.0)  # fmt: skip


def test_budget_estimate_learns_from_measured_candidates_of_the_same_making() -> None:
    """Before any candidate of its making ran, a candidate is expected to cost its relative
    cost times the original's row; after, what that one took, less its one-time latency
    tables (cached: the next target reads them)."""
    from graphprune.advise import _estimate

    plan = gp.Plan(target_latency=0.5)
    first = Candidate("structured 75%", "structured", plan, cost=10)
    second = Candidate("structured 50%", "structured", plan, cost=10)
    sparse = Candidate("unstructured 50%", "unstructured", gp.Plan(ratio=0.5), compact=True)
    assert _estimate(second, [], 20.0) == 200.0
    done = Row(first, status="measured", seconds=260.0, setup_seconds=180.0)
    assert _estimate(second, [done], 20.0) == pytest.approx(80.0)
    assert _estimate(sparse, [done], 20.0) == pytest.approx(20.0)  # another making: its cost
    failed = Row(first, status="failed", seconds=5.0)
    assert _estimate(second, [failed], 20.0) == 200.0  # a failure says nothing about cost


def test_pareto_marks_and_recommendation_on_a_synthetic_table() -> None:
    advice = _synthetic_advice()
    marks = {r.name: r.pareto for r in advice.rows}
    latency = {name: m.get("latency:onnxruntime") for name, m in marks.items()}
    # (ms, quality): unstructured 90 % (9.9, 0.90) is dominated by int8 (7.0, 0.948); int8
    # is not by structured 50 % (5.0, 0.946), which is faster but not as good
    assert latency == {
        "original (fp32)": True, "int8": True, "unstructured 90%": False,
        "structured 50% latency": True, "structured 35% latency": True, "2:4": None,
    }  # fmt: skip
    size = {name: m.get("size") for name, m in marks.items()}
    assert size["unstructured 90%"] and size["int8"] and size["original (fp32)"]
    assert not size["structured 50% latency"]  # int8 is smaller and better
    text = advice.recommendation()
    # the fastest within 1 % of the original's quality; the faster one at 0.80 is named apart
    assert "onnxruntime (batch 1, 2 threads): structured 50% latency, 2.00x faster" in text
    assert "fastest at any quality: structured 35% latency, 3.33x" in text
    assert "for disk size: int8, 4.0x smaller" in text  # 0.90 is not within 1 %
    table = advice.table()
    assert "2:4: not measured: budget" in table
    assert "runtime openvino skipped: not installed" in table
    assert "file size (storage, not speed)" in table
    facts = advice.facts()
    assert any("unstructured 90% 1.01x; none is faster than dense" in f for f in facts)


def test_speedups_within_the_timing_noise_are_no_speedup() -> None:
    advice = _synthetic_advice(reference_ms=9.0)  # the original against itself: 1.11x
    assert advice.noise("onnxruntime") == pytest.approx(10.0 / 9.0 - 1)
    assert not advice.faster(1.15, "onnxruntime") and advice.faster(1.3, "onnxruntime")
    assert "no speed-up on onnxruntime (1.43x)" not in advice.recommendation()
    assert "int8, 4.0x smaller (0.00 MB), accuracy 0.9480; speed 1.43x" in advice.recommendation()


# -- a real run: trained CNN, accuracy through each exported file, both runtimes --------------
@pytest.mark.slow
def test_advise_on_a_trained_cnn(tmp_path: Path, cache_dir: Any) -> None:
    model, images, labels, test = digits_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images[test[:32]]  # batch 32: the latency tables measure compute, not fixed overhead
    calibration = [images[i * 64 : (i + 1) * 64] for i in range(4)]
    held = test[32:]

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(images[held]).argmax(1) == labels[held]).float().mean())

    runtimes = ("onnxruntime", "openvino") if HAS_OPENVINO else ("onnxruntime",)
    # 0.9: within reach of this small CNN's floors however the shared machine times its ops
    # (at 0.8 a busy run's tables predicted the floor above it and the row was not measured)
    candidates = default_candidates(latency_targets=(0.9,), sparsities=(0.5,), two_four=False)
    advice = advise(
        model, x, calibration=calibration, evaluate=accuracy, runtimes=runtimes, threads=2,
        candidates=candidates, batch_sizes=(1, 16), runs=5, out=tmp_path / "advise",
    )  # fmt: skip
    rows = {r.name: r for r in advice.rows}
    assert list(rows) == [c.name for c in candidates]
    assert all(r.measured for r in advice.rows), [(r.name, r.reason) for r in advice.rows]
    dense = accuracy(model)
    ref = rows["original (fp32)"].quality
    assert ref is not None and ref.value == pytest.approx(dense, abs=1e-9)  # the file = torch
    assert dense > 0.9
    # each row's accuracy is the one of the model it names: compiled here the same way (three
    # calibration batches, the fourth held back), torch against the file (argmax ties: 1 image)
    sparse = candidates[2].plan
    assert sparse is not None
    pruned = gp.finalize(gp.compile(model, sparse, x, calibration=calibration[:3]))
    quality = {name: r.quality.value for name, r in rows.items() if r.quality is not None}
    assert quality["unstructured 50%"] == pytest.approx(accuracy(pruned), abs=1.5 / len(held))
    assert quality["int8"] >= dense - 0.03  # static int8: close to fp32
    assert quality["unstructured 50% + int8"] >= quality["unstructured 50%"] - 0.03
    for row in advice.rows:
        for rt in runtimes:
            timed = row.runtimes[rt]
            assert timed.error is None and set(timed.latency_ms) == {1, 16}
            assert all(ms > 0 for ms in timed.latency_ms.values())
            assert timed.memory_mb is not None and timed.memory_mb >= 0  # a fresh process's
    size = rows["original (fp32)"].file_bytes
    assert rows["unstructured 50%"].file_bytes < 0.75 * size  # values + bitmask
    assert rows["int8"].file_bytes < 0.4 * size
    assert rows["unstructured 50% + int8"].file_bytes < rows["int8"].file_bytes
    assert rows["structured 90% latency"].macs < rows["original (fp32)"].macs
    assert rows["unstructured 50%"].macs == rows["original (fp32)"].macs  # masks keep MACs
    for objective in advice.objectives:
        assert any(r.pareto.get(objective) for r in advice.rows), objective
    text = advice.recommendation()
    assert all(f"for latency on this CPU with {rt}" in text for rt in runtimes)
    assert "for disk size" in text
    saved = json.loads(advice.save_json(tmp_path / "advice.json").read_text())
    assert [r["name"] for r in saved["rows"]] == list(rows)
    assert saved["rows"][2]["plan"]["granularity"] == "unstructured"
    png = plot_advice(advice, tmp_path / "advice.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert not model.training


# -- bad input and missing pieces, on one small run ---------------------------------------------
def test_missing_runtime_failing_runtime_failing_evaluate_and_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = MODELS["resnet18"]
    torch.manual_seed(0)
    model, x = spec.build().eval(), spec.example_inputs(2)
    monkeypatch.setattr(OpenVinoCPU, "available", lambda self: False)
    calls: list[str] = []

    def evaluate(m: nn.Module) -> float:
        assert isinstance(m, OnnxModule)
        calls.append(m.path.name)
        if "int8" in m.path.name:
            raise RuntimeError("no labels for this one")
        return math.nan if "unstructured" in m.path.name else 0.5

    candidates = [
        Candidate("int8", "dense", int8=True),
        Candidate("unstructured 50%", "unstructured",
                  gp.Plan(granularity="unstructured", ratio=0.5), compact=True),
        Candidate("structured 50%", "structured", gp.Plan(ratio=0.5), cost=1e6),
    ]  # fmt: skip
    advice = advise(
        model, x, evaluate=evaluate, runtimes=("onnxruntime", "openvino"), threads=1,
        candidates=candidates, batch_sizes=(1,), runs=3, budget_s=600,
    )  # fmt: skip
    assert advice.skipped_runtimes == {"openvino": "not installed (pip install openvino)"}
    assert advice.runtimes == ["onnxruntime"]
    rows = {r.name: r for r in advice.rows}
    assert rows["int8"].measured and rows["int8"].quality is not None
    assert rows["int8"].quality.error == "RuntimeError: no labels for this one"
    q = rows["unstructured 50%"].quality
    assert q is not None and q.error is not None and "not a finite number" in q.error
    assert rows["structured 50%"].status == "not measured"
    assert (rows["structured 50%"].reason or "").startswith("budget: expected")
    assert "error" in advice.table()  # the failed quality shows in the table
    with pytest.raises(gp.InputError, match="none of the runtimes"):
        advise(model, x, runtimes=("openvino",))
    with pytest.raises(gp.InputError, match="not one graphprune measures on"):
        advise(model, x, runtimes=("tensorrt",))


@pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")
def test_a_runtime_that_cannot_load_a_candidate_is_a_row_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = MODELS["resnet18"]
    torch.manual_seed(0)
    model, x = spec.build().eval(), spec.example_inputs(2)
    load = OpenVinoCPU.load

    def refuse_int8(self: Any, path: Any, threads: int) -> Any:
        if "int8" in str(path):
            raise RuntimeLoadError(f"{path}: OpenVINO cannot load it (test)")
        return load(self, path, threads)

    monkeypatch.setattr(OpenVinoCPU, "load", refuse_int8)
    advice = advise(
        model, x, candidates=[Candidate("int8", "dense", int8=True)],
        runtimes=("onnxruntime", "openvino"), batch_sizes=(1,), runs=3, threads=1,
    )  # fmt: skip
    row = advice.rows[1]
    assert row.measured and row.runtimes["onnxruntime"].error is None
    assert "cannot load it (test)" in (row.runtimes["openvino"].error or "")
    assert "OpenVINO cannot load it (test)" in advice.table()
    assert row.pareto.get("latency:openvino") is None  # not timed there: not on its front


# -- int8 weights stored compactly --------------------------------------------------------------
def test_int8_weights_with_zeros_pack_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[torch.rand_like(layer.weight) < 0.8] = 0.0
    x = torch.randn(8, 64)
    export(model, x, tmp_path / "m.onnx")
    int8 = quantize(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", "static",
                    [{"input": torch.randn(8, 64).numpy()} for _ in range(4)]).path  # fmt: skip
    proto = onnx.load(str(int8))
    report = pack_sparse_weights(proto, storage="auto")
    assert len(report.weights) == 2
    assert all(w.sparsity > 0.75 for w in report.weights)
    assert report.packed_bytes < 0.4 * report.dense_bytes  # 1 byte + 1 bit per weight, 80 % 0
    onnx.save(proto, str(tmp_path / "packed.onnx"))
    outs = []
    for path in (int8, tmp_path / "packed.onnx"):
        loaded = get_runtime("onnxruntime").load(path, 1)
        outs.append(loaded.run({loaded.input_names[0]: x.numpy()})[0])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_memory_at_session_start_is_measured_in_a_fresh_process(
    tmp_path: Path, runtime: str
) -> None:
    """A 64 MB model costs about 64 MB more than an idle process, a 0.3 MB one about nothing."""
    if not get_runtime(runtime).available():
        pytest.skip(f"{runtime} not installed")
    x = torch.randn(1, 256)
    big = nn.Sequential(nn.Linear(256, 4096), nn.Linear(4096, 4096)).eval()  # 17.8 M floats
    small = nn.Sequential(nn.Linear(256, 256)).eval()
    export(big, x, tmp_path / "big.onnx")
    export(small, x, tmp_path / "small.onnx")
    probe = MemoryProbe(runtime, {"input": x.numpy()}, threads=1)
    try:
        big_mb, small_mb = probe.memory_mb(tmp_path / "big.onnx"), probe.memory_mb(
            tmp_path / "small.onnx"
        )
    finally:
        probe.close()
    weights_mb = sum(p.numel() for p in big.parameters()) * 4 / 2**20
    assert 0.8 * weights_mb < big_mb < 3.0 * weights_mb, (big_mb, weights_mb)
    assert small_mb < 0.3 * weights_mb, small_mb


@pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")
def test_openvino_runs_an_export_like_torch(tmp_path: Path) -> None:
    """Same outputs as torch, and the process's float state untouched: OpenVINO sets FTZ/DAZ
    on the calling thread and leaves it (hypothesis, numpy, torch all see it afterwards)."""
    subnormal = sys.float_info.min / 2  # nonzero unless the thread flushes subnormals
    assert subnormal * 1.0 != 0.0
    spec = MODELS["resnet18"]
    torch.manual_seed(0)
    model, (x,) = spec.build().eval(), spec.example_inputs(2)
    export(model, x, tmp_path / "m.onnx")
    module = OnnxModule(tmp_path / "m.onnx", threads=2, runtime="openvino")
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=1e-4)
    bigger = torch.randn(5, *x.shape[1:])  # a dynamic batch
    with torch.no_grad():
        torch.testing.assert_close(module(bigger), model(bigger), atol=1e-4, rtol=1e-4)
    assert subnormal * 1.0 != 0.0 and (torch.tensor([1e-40]) * 1.0).item() != 0.0


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_advise_on_a_small_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "advise"
    code = main([
        "advise", "resnet18", "--runtimes", "onnxruntime", "--latency-targets", "",
        "--sparsities", "0.5", "--no-2-4", "--runs", "3", "--batch-sizes", "1",
        "--calibration-batches", "2", "--threads", "1", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "recommendation: for latency on this CPU with onnxruntime" in printed
    saved = json.loads((out / "advice.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [
        "original (fp32)", "int8", "unstructured 50%", "unstructured 50% + int8"
    ]
    assert all(r["status"] == "measured" for r in saved["rows"])
    assert saved["rows"][0]["quality"]["name"].startswith("top-1 agreement (held-back")
    assert (out / "advice.png").exists() and (out / "original.onnx").exists()
    assert main(["advise", "resnet18", "--runtimes", "nope", "--out", str(out)]) == 2

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from graphprune.cli import main


def test_analyze_zoo_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "groups.json"
    assert main(["analyze", "resnet18", "--explain", "fc", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14 groups (12 prunable)" in text
    assert "fc.weight[1]" in text
    assert json.loads(out.read_text())["groups"][0]["size"] == 16


def test_analyze_factory_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["analyze", "graphprune.models.cnn:vgg", "--input-shape", "3,32,32", "--prunable-only"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "frozen" not in text.split("groups (")[0]
    assert "7 groups (5 prunable)" in text


def test_bad_model_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "resnet19"]) == 2
    assert "unknown model 'resnet19'" in capsys.readouterr().err
    assert main(["analyze", "graphprune.models.cnn:vgg"]) == 2
    assert "needs --input-shape" in capsys.readouterr().err


def test_models_lists_the_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "llama" in capsys.readouterr().out


def test_compile_prints_the_table_and_saves(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"ratio": 0.3, "importance": "l1", "round_to": 4}')
    out = tmp_path / "pruned.pt"
    assert main(["compile", "resnet18", "--plan", str(plan), "--ratio", "0.5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ratio=0.5" in text and "importance=l1" in text and "round_to=4" in text
    assert "params" in text and "MACs" in text and out.exists()


def test_compile_attention_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """--attention keep leaves the zoo ViT's attention whole (its heads/head_dim unpruned)."""
    assert main(["compile", "vit", "--ratio", "0.5", "--attention", "keep"]) == 0
    kept = capsys.readouterr().out
    assert "attention=keep" in kept and "(heads)" not in kept
    assert main(["compile", "vit", "--ratio", "0.5"]) == 0
    assert "(heads)" in capsys.readouterr().out  # the default takes whole heads along
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["compile", "vit", "--ratio", "0.5", "--attention", "width"])
    assert "auto" in capsys.readouterr().err


def test_compile_bad_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "resnet18", "--ratio", "1.5"]) == 2
    assert "ratio=1.5 is outside [0, 1)" in capsys.readouterr().err


def test_export_and_bench(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", "vgg", "--ratio", "0.5", "-o", str(out), "--quantize", "dynamic"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and (tmp_path / "m.int8.onnx").exists()
    assert "pruned vs torch" in text and "original vs torch" in text and "int8 vs torch" in text
    results = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "se_resnet",
                "--ratio",
                "0.5",
                "--runs",
                "4",
                "--batch-sizes",
                "1,2",
                "--json",
                str(results),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "speedup" in text and "effic." in text
    data = json.loads(results.read_text())
    assert [r["batch"] for r in data["latency"]["results"]] == [1, 2]


def test_sparsity_reports_storage_and_both_speeds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, onnx_path = tmp_path / "report.json", tmp_path / "compact.onnx"
    args = ["sparsity", "gpt", "--tokens", "96", "--granularity", "unstructured", "--ratio", "0.9"]
    args += ["--batch-sizes", "1,4", "--runs", "3", "--json", str(out), "-o", str(onnx_path)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "this is storage, not speed" in text and "speed, torch" in text
    report = json.loads(out.read_text())
    assert len(report["layers"]) == 9  # 8 masked Linear layers + the tied (dense) lm_head
    masked = [layer for layer in report["layers"] if layer["sparsity"] > 0.5]
    assert all(layer["disk_bytes"] * 6 < layer["dense_bytes"] for layer in masked)
    assert report["onnx_compact_bytes"] < report["onnx_dense_bytes"] / 2  # embeddings: dense
    assert report["onnx_max_abs_error"] < 1e-4
    assert [r["batch"] for r in report["torch_latency"]["results"]] == [1, 4]
    assert onnx_path.stat().st_size == report["onnx_compact_bytes"]


def test_sparsity_needs_a_sparse_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sparsity", "gpt", "--tokens", "96", "--ratio", "0.5"]) == 2
    assert "needs a sparse plan" in capsys.readouterr().err


def test_export_two_four_with_sparse_storage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "m.onnx"
    args = ["export", "vgg", "--granularity", "n:m", "--nm", "2:4", "-o", str(path)]
    assert main([*args, "--sparse-storage", "auto"]) == 0
    text = capsys.readouterr().out
    assert "n:m" in text and "sparse storage:" in text and "ok" in text


def test_demo_commands_print_verification_and_speedup(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`make demo`'s three commands, on the small zoo ResNet: the verification error and the
    measured speed-up next to the MACs ideal are printed and parse; lines fit 80 columns."""
    saved, onnx_path = tmp_path / "m.pt", tmp_path / "m.onnx"
    assert main(["analyze", "resnet18", "--summary"]) == 0
    assert main(["compile", "resnet18", "--ratio", "0.5", "-o", str(saved)]) == 0
    assert main(["export", "resnet18", "--load", str(saved), "-o", str(onnx_path), "--bench",
                 "--runs", "3"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "14 groups of coupled channels: 12 prunable, 2 frozen" in text
    error = re.search(r"pruned vs torch\s+max \|Δ\| (\S+)", text)
    assert error is not None and float(error.group(1)) < 1e-4
    row = re.search(r"^\s+1\s+(\S+)\s+\S+\s+(\S+)\s+\S+\s+(\S+)x\s+(\S+)\s+(\S+)$", text, re.M)
    assert row is not None
    base_ms, pruned_ms, speedup, ideal, efficiency = (float(v) for v in row.groups())
    assert speedup == pytest.approx(base_ms / pruned_ms, rel=0.02) and ideal > 1.5
    assert efficiency == pytest.approx(speedup / ideal, abs=0.01)
    assert onnx_path.exists()
    assert all(len(line) <= 80 for line in text.splitlines() if str(tmp_path) not in line)

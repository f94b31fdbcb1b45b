"""Sparse-kernel modules equal the dense masked layers; the sparsify pass decides by measurement;
ONNX export of masked models stores sparse weights compactly and verifies in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.kernels.crossover import square_block
from graphprune.kernels.sparse_modules import SparseConv1x1, SparseLinear
from graphprune.models import MODELS
from graphprune.models.transformers import GPT
from graphprune.sparsity.convert import layer_rows
from tests.equivalence import outputs


def _masked_gpt(plan: gp.Plan, n_embd: int = 64) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(n_embd=n_embd, n_head=4)
    x = (torch.randint(0, 96, (2, 16)),)
    return gp.compile(model, plan, x), x


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_sparse_linear_equals_the_dense_masked_layer(layout: str) -> None:
    plan = gp.Plan(granularity="block", ratio=0.75, block=[16, 16])
    pruned, _ = _masked_gpt(plan, n_embd=128)
    dense = gp.finalize(pruned).transformer.h[0].mlp.c_fc  # (512, 128), 16x16 blocks
    assert square_block(dense.weight.detach()) == 16
    sparse = SparseLinear(dense, layout, blocksize=16 if layout == "bsr" else None)
    x = torch.randn(3, 7, 128)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
    back = sparse.to_dense()
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)


def test_sparse_pointwise_conv_equals_the_dense_masked_conv() -> None:
    spec = MODELS["mobilenet_v2"]  # inverted residuals: 1x1 expand / project convs
    x = spec.example_inputs()
    pruned = gp.finalize(
        gp.compile(spec.build(), gp.Plan(granularity="unstructured", ratio=0.9), x)
    )
    convs = [
        m
        for m in pruned.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
    ]
    assert convs
    for conv in convs:
        sparse = SparseConv1x1(conv, "csr")
        inp = torch.randn(2, conv.in_channels, 5, 6)
        with torch.no_grad():
            torch.testing.assert_close(sparse(inp), conv(inp), atol=1e-5, rtol=1e-5)


def test_sparsify_converts_forced_layers_and_keeps_outputs() -> None:
    pruned, x = _masked_gpt(gp.Plan(granularity="unstructured", ratio=0.9))
    forced = {"transformer.h.0.mlp.c_fc": "csr", "transformer.h.1.attn.c_attn": "csr"}
    # only the forced layers are candidates: which others a timing would convert is not tested
    fast = gp.sparsify(pruned, x, layers=list(forced), force=forced)
    assert isinstance(fast.transformer.h[0].mlp.c_fc, SparseLinear)
    assert gp.masked_layers(pruned)  # the input model is untouched (still masked)
    report = gp.sparsify_report(fast)
    assert report.converted == forced
    torch.testing.assert_close(outputs(fast, x), outputs(pruned, x), atol=1e-5, rtol=1e-5)
    assert report.max_abs_error <= 1e-5
    with pytest.raises(gp.InputError, match="sparsify again after load"):
        gp.save(fast, Path("/tmp/never-written.pt"))


def test_sparsify_decisions_follow_the_measured_times() -> None:
    pruned, x = _masked_gpt(gp.Plan(granularity="unstructured", ratio=0.95), n_embd=128)
    fast = gp.sparsify(pruned, x, batch_sizes=[1, 8], min_speedup=1.2)
    report = gp.sparsify_report(fast)
    assert len(report.decisions) == 9  # 8 masked Linear layers + the dense lm_head
    rows = layer_rows(pruned, x, [1, 8])
    for d in report.decisions:
        layer = fast.get_submodule(d.module)
        if d.sparsity < 0.5:  # the tied lm_head: not even timed
            assert d.layout == "dense" and "below 50%" in d.reason and not d.times
            continue
        assert [t.rows for t in d.times] == rows[d.module] == [16, 128]  # batch x 16 tokens
        worst = min(t.speedup("csr") for t in d.times)
        assert (d.layout == "csr") == (worst >= 1.2), d.reason
        assert isinstance(layer, SparseLinear) == (d.layout == "csr")
    torch.testing.assert_close(outputs(fast, x), outputs(pruned, x), atol=1e-5, rtol=1e-5)
    assert "converted" in report.table()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 kernels need a CUDA GPU")
def test_two_four_runs_on_semi_structured_kernels_on_cuda() -> None:
    pruned, _ = _masked_gpt(gp.Plan(granularity="n:m"), n_embd=256)
    model = gp.finalize(pruned).half().cuda()
    x = (torch.randint(0, 96, (8, 32), device="cuda"),)
    fast = gp.sparsify(model, x, force={"transformer.h.0.mlp.c_fc": "semi_structured"})
    torch.testing.assert_close(outputs(fast, x), outputs(model, x), atol=2e-2, rtol=2e-2)


def test_export_stores_sparse_weights_compactly_and_verifies(tmp_path: Path) -> None:
    pruned, x = _masked_gpt(gp.Plan(granularity="unstructured", ratio=0.9), n_embd=128)
    dense = gp.export_onnx(gp.finalize(pruned), x, tmp_path / "dense.onnx")
    packed = gp.export_onnx(pruned, x, tmp_path / "packed.onnx", sparse_storage="auto")
    assert packed.verification is not None and packed.verification.ok  # onnxruntime == torch
    assert packed.verification.max_abs <= 1e-4
    onnx.checker.check_model(str(packed.exported.path), full_check=True)
    packing = packed.exported.packing
    assert packing is not None and len(packing.weights) == 8
    assert packing.dense_bytes / packing.packed_bytes > 7.0  # 90 %: 4 B -> 0.4 B + 1 bit
    assert dense.exported.bytes / packed.exported.bytes > 4.0  # embeddings and norms stay dense
    standard = {n.domain for n in onnx.load(str(packed.exported.path)).graph.node}
    assert standard <= {"", "ai.onnx"}  # standard opset only
    assert "sparse storage" in packed.table()


def test_auto_storage_uses_onnx_sparse_tensors_where_smaller(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x = (torch.randn(2, 256),)
    plan = gp.Plan(granularity="unstructured", ratio=0.99)
    pruned = gp.compile(model, plan, x)
    report = gp.export_onnx(pruned, x, tmp_path / "m.onnx", sparse_storage="auto")
    assert report.verification is not None and report.verification.ok
    packing = report.exported.packing
    assert packing is not None
    assert {w.storage for w in packing.weights} == {"sparse_tensor"}  # 99 %: 12 B/nnz wins
    bitmask = gp.export_onnx(pruned, x, tmp_path / "b.onnx", sparse_storage="bitmask")
    assert bitmask.exported.packing is not None
    assert packing.packed_bytes < bitmask.exported.packing.packed_bytes


def test_export_of_a_two_four_model_is_smaller_and_exact(tmp_path: Path) -> None:
    pruned, x = _masked_gpt(gp.Plan(granularity="n:m"), n_embd=128)
    report = gp.export_onnx(pruned, x, tmp_path / "m.onnx", sparse_storage="auto")
    assert report.verification is not None and report.verification.ok
    packing = report.exported.packing
    assert packing is not None and packing.weights
    for w in packing.weights:  # 50 %: half the values + 1 bit per weight = 0.53 of dense
        assert w.packed_bytes / w.dense_bytes == pytest.approx(0.5 + 1 / 32, abs=1e-3)

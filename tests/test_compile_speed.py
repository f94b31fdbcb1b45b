"""What makes compile fast without making it less safe (the compile-time issue):

- the verification reads each shape constant from the rewritten model's eager forward (the
  ints its torch calls get) and re-captures only what it could not read -- and still catches
  a rewrite that left an attribute stale;
- capture and analysis are reused across compiles of the same model structure (latency
  rounds, Pruner steps, repeated plans) and recomputed after any change to it;
- the MACs come from the check's and the verification's forwards.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import graphprune as gp
import graphprune.passes.verify as verify_module
from graphprune.analysis import cache
from graphprune.analysis.macs import count_macs
from graphprune.models import MODELS
from graphprune.passes.base import RewriteFailure
from graphprune.passes.tensors import cut, uncut
from graphprune.stages import freeze_retry
from tests.equivalence import check_dead_channels
from tests.test_shape_relations import Picky


class InferredHeadDim(nn.Module):
    """Attention whose head width is inferred (``view(B, T, n_head, -1)``): a stale
    ``n_head`` still runs -- with heads regrouped, a wrong model of the right shape."""

    def __init__(self, width: int = 64, n_head: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.n_head = n_head

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, nh * hd)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.attn = InferredHeadDim()
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        return self.head(h + self.attn(h))


def _without_shape_attributes(heads: bool = False) -> list[object]:
    """The structured rewrite minus the pass that updates ints behind shape constants."""
    return [p for p in gp.passes.structured_rewrite(heads) if p.name != "shape_attributes"]


def _count_captures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = verify_module.capture

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(verify_module, "capture", counting)
    return calls


def test_heads_plan_verified_without_recapture_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, x = TinyEncoder().eval(), torch.randn(2, 5, 16)
    captures = _count_captures(monkeypatch)
    pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity="heads", round_to=1), x)
    assert pruned.attn.n_head == 2
    assert not captures  # every constant was read from the eager forward
    check_dead_channels(TinyEncoder().eval(), (x,), {"heads"}, "heads")  # and exact


def test_a_stale_attribute_is_caught_from_the_eager_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model, x = TinyEncoder().eval(), torch.randn(2, 5, 16)
    monkeypatch.setattr(freeze_retry, "structured_rewrite", _without_shape_attributes)
    captures = _count_captures(monkeypatch)
    plan = gp.Plan(ratio=0.5, granularity="heads", round_to=1)
    with pytest.raises(RewriteFailure, match=r"view .*size\[2\] is 4 after pruning but the kept"):
        gp.compile(model, plan, x, strict=True)
    assert not captures
    # without strict: the heads are frozen with that reason, nothing is left to prune
    with pytest.raises(gp.PruneError, match="hard-coded or derived"):
        gp.compile(model, plan, x)


def test_a_stale_attribute_that_breaks_the_forward_names_its_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GPT's head_dim is explicit: a stale n_head makes the view fail; the re-capture then
    names the line and the groups, and freeze-and-retry prunes the rest."""
    spec = MODELS["gpt"]
    model, x = spec.build().eval(), spec.example_inputs()
    monkeypatch.setattr(freeze_retry, "structured_rewrite", _without_shape_attributes)
    with pytest.raises(RewriteFailure, match=r"no longer runs at .*transformers.py:72"):
        gp.compile(model, gp.Plan(ratio=0.5, granularity="heads", round_to=1), x, strict=True)


def test_analysis_reused_until_the_structure_changes() -> None:
    spec = MODELS["resnet18"]
    model, x = spec.build().eval(), spec.example_inputs()
    plan = gp.Plan(ratio=0.5, round_to=1)
    first = gp.compile(model, plan, x)
    assert "capture" in gp.report(first).seconds
    second = gp.compile(model, plan, x)
    assert set(gp.report(second).seconds) >= {"reuse analysis"}
    assert "capture" not in gp.report(second).seconds
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # new weight values: same structure, reused, and scored from the new values
    with torch.no_grad():
        model.conv1.weight.mul_(-1.0).add_(torch.randn_like(model.conv1.weight))
    assert "capture" not in gp.report(gp.compile(model, plan, x)).seconds
    # anything the capture depends on changes: captured again
    changes = [
        lambda: setattr(model.conv1, "padding", (2, 2)),  # a module attribute
        lambda: setattr(model, "conv1", nn.Conv2d(3, 16, 3, 1, 1, bias=False)),  # a module
        lambda: model.fc.register_forward_hook(lambda m, i, o: o * 2),  # a hook
    ]
    for change in changes:
        change()
        assert "capture" in gp.report(gp.compile(model, plan, x)).seconds
    assert "capture" in gp.report(gp.compile(model, plan, spec.example_inputs(batch=3))).seconds


def test_the_cache_holds_no_model_and_no_inplace_entry() -> None:
    spec = MODELS["resnet18"]
    model, x = spec.build().eval(), spec.example_inputs()
    gp.compile(model, gp.Plan(ratio=0.5), x)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the entry did not keep the model (or its weights) alive
    model = spec.build().eval()
    gp.compile(model, gp.Plan(ratio=0.5), x)
    assert model in cache._entries
    gp.compile(model, gp.Plan(ratio=0.5), x, inplace=True)
    assert model not in cache._entries  # its old tensors are not kept after the rewrite


@pytest.mark.parametrize("name", ["resnet18", "densenet", "vit", "llama"])
def test_macs_from_the_verifying_forward_match_an_independent_count(name: str) -> None:
    spec = MODELS[name]
    model, x = spec.build().eval(), spec.example_inputs()
    pruned = gp.compile(model, gp.Plan(ratio=0.5, round_to=1), x)
    found = gp.report(pruned)
    assert found.macs_before == count_macs(model, x)
    assert found.macs_after == count_macs(pruned, x) < found.macs_before


def test_inplace_trials_rewrite_the_model_and_undo_a_failure() -> None:
    """inplace=True rewrites the user's model directly (no rehearsal on a copy): a trial that
    fails verification is undone, the retry prunes the rest, as compile on a copy does."""
    plan, x = gp.Plan(ratio=0.5, round_to=1), torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    reference = gp.compile(Picky().eval(), plan, x)
    torch.manual_seed(0)
    model = Picky().eval()
    assert gp.compile(model, plan, x, inplace=True) is model
    assert [f.name for f in gp.report(model).frozen] == ["stem.0.weight[0]"]
    pairs = zip(reference.state_dict().items(), model.state_dict().items(), strict=True)
    for (k, a), (_, b) in pairs:
        assert torch.equal(a, b), k
    # a failure with strict=True: the model is exactly as it was, the same parameter objects
    torch.manual_seed(0)
    model = Picky().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = [id(p) for p in model.parameters()] + [id(m) for m in model.modules()]
    with pytest.raises(gp.PruneError, match="view"):
        gp.compile(model, plan, x, inplace=True, strict=True)
    assert objects == [id(p) for p in model.parameters()] + [id(m) for m in model.modules()]
    assert model.width == 16 and model.stem[0].out_channels == 16
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_inplace_rewrite_frees_each_original_tensor_as_it_is_sliced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The undo of an in-place rewrite keeps only what slicing cut away: when the rewritten
    model is verified, no original tensor of a sliced parameter is alive (peak: the model
    plus one tensor, not two models), and the failure path still restores every value."""
    spec = MODELS["llama"]
    model, x = spec.build().eval(), spec.example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {n: weakref.ref(p.untyped_storage()) for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    alive_at_verify: list[str] = []
    real = freeze_retry.make_verifier

    def watching(*args: object, **kwargs: object) -> object:
        check = real(*args, **kwargs)

        def verify(ctx: object) -> None:
            gc.collect()
            alive_at_verify.extend(n for n, ref in storages.items() if ref() is not None)
            now = dict(model.named_parameters())
            # what is still alive was not sliced
            assert all(now[n].shape == shapes[n] for n in alive_at_verify)
            raise RewriteFailure("refused by the test")

        return verify if check else check

    monkeypatch.setattr(freeze_retry, "make_verifier", watching)
    with pytest.raises(gp.PruneError, match="refused by the test"):
        gp.compile(model, gp.Plan(ratio=0.5), x, inplace=True, strict=True)
    sliced = [n for n, p in model.named_parameters() if n not in alive_at_verify]
    assert len(sliced) > len(storages) // 2, alive_at_verify  # most weights lose channels
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_cut_and_uncut_give_back_every_element(data: st.DataObject) -> None:
    """An undo rebuilds a tensor from its slices along any dims, in any order."""
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    t = torch.randn(shape)
    dims = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape)))
    current, cuts = t, []
    for d in dims:
        kept = data.draw(st.lists(st.integers(0, shape[d] - 1), unique=True, max_size=shape[d]))
        current, taken = cut(current, d, sorted(kept))
        cuts.append(taken)
        assert current.shape[d] == len(kept)
    for taken in reversed(cuts):
        current = uncut(current, taken)
    assert torch.equal(current, t)


def test_exports_are_reused_for_models_of_the_same_content(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The latency stage's export cache: the same model, or a copy equal to it (a round
    compiled again to the same plan), is exported once; a weight changed in place, an
    attribute, or other input shapes are a new export."""
    from graphprune.onnx import export_cache

    made: list[str] = []
    real = export_cache.export

    def counting(model: nn.Module, inputs: Any, path: Any, **kw: Any) -> Any:
        made.append(str(path))
        return real(model, inputs, path, **kw)

    monkeypatch.setattr(export_cache, "export", counting)
    monkeypatch.setattr(export_cache, "EXPORTS", export_cache.ExportCache())
    cache = export_cache.EXPORTS
    spec = MODELS["resnet18"]
    model, x = spec.build().eval(), spec.example_inputs()
    first = cache.path(model, x, tmp_path / "a.onnx")
    assert cache.path(model, x, tmp_path / "b.onnx") == first and len(made) == 1
    pruned = [gp.compile(model, gp.Plan(ratio=0.3), x) for _ in range(2)]  # equal copies
    assert cache.path(pruned[0], x, tmp_path / "c.onnx") == cache.path(pruned[1], x, tmp_path)
    assert len(made) == 2
    with torch.no_grad():
        next(model.parameters())[0, 0, 0, 0] += 1.0  # a weight changed in place
    assert cache.path(model, x, tmp_path / "d.onnx") != first and len(made) == 3
    image = x[0] if isinstance(x, tuple) else x
    assert cache.path(model, (torch.randn(1, *image.shape[1:]),), tmp_path) and len(made) == 4
    model.extra_setting = 2  # an attribute the forward could read
    cache.path(model, x, tmp_path / "e.onnx")
    assert len(made) == 5 and cache.hits == 2 and all(p.is_file() for p in cache.files.values())

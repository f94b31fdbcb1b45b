"""Dead-channel oracle: zero the channels a plan will remove, then pruning must not change the
output. Channels are made dead by zeroing every tensor position that *produces* them (weight
rows, biases, norm affine terms, embedding columns, standalone parameters); what consumes
them then reads zeros. Groups normalised by LayerNorm/RMSNorm get a masked reference: those
norms compute their statistics over the live channels only.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import graphprune as gp
from graphprune.hf import is_pretrained
from graphprune.models.transformers import RMSNorm
from graphprune.passes.tensors import get_tensor
from graphprune.planning.resolve import Resolution, attention_kinds, is_output_dim
from graphprune.planning.units import pruning_units
from graphprune.record import RECORD_ATTRIBUTE as RECORD

EXACT_KINDS = {"channels", "heads", "kv_heads", "heads_per_kv"}


def choose_dead(
    model: nn.Module,
    dg: gp.DependencyGraph,
    kinds: set[str],
    ratio: float,
    rng: np.random.Generator,
) -> dict[int, list[int]]:
    """For every pruning unit (layer) of the prunable groups of these kinds: floor(ratio *
    size) random channels -- what a local plan with ``round_to=1`` removes from each unit.
    Groups held whole (conv groups of a grouped conv) get none."""
    groups = [g for g in dg.groups if g.prunable and g.kind in kinds and g.size > 1]
    units = pruning_units(dg, groups, dict(model.named_modules()), ratio, 1)
    dead: dict[int, list[int]] = {}
    for u in units.units:
        n = int(np.floor(ratio * u.size + 1e-9))
        if n:
            chosen = rng.choice(u.channels, size=n, replace=False).tolist()
            dead[u.group] = sorted(dead.get(u.group, []) + chosen)
    return dead


def make_dead(model: nn.Module, dg: gp.DependencyGraph, dead: dict[int, list[int]]) -> None:
    sizes = {g.id: g.size for g in dg.groups}
    kept = {g: sorted(set(range(sizes[g])) - set(d)) for g, d in dead.items()}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in dg.groups:
            if g.id not in dead:
                continue
            for m in g.members:
                if not is_output_dim(modules.get(m.module), m):
                    continue
                alive = set(dg.kept_positions(m.fqn, m.dim, kept).tolist())
                positions = [p for p in range(m.index_map.shape[0]) if p not in alive]
                if positions:
                    t = get_tensor(model, m.fqn)
                    t.index_fill_(m.dim, torch.tensor(positions), 0.0)


class MaskedLayerNorm(nn.Module):
    """LayerNorm / RMSNorm over the live channels only; dead channels output 0."""

    def __init__(self, norm: nn.Module, live: Tensor) -> None:
        super().__init__()
        self.norm, self.live = norm, live

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        xs = x[..., self.live]
        w = self.norm.weight[self.live]
        if isinstance(self.norm, nn.LayerNorm):
            b = self.norm.bias[self.live] if self.norm.bias is not None else None
            out[..., self.live] = F.layer_norm(xs, (xs.shape[-1],), w, b, self.norm.eps)
        else:  # RMSNorm (ours: eps; Hugging Face's: variance_epsilon)
            eps = getattr(self.norm, "eps", None) or self.norm.variance_epsilon
            out[..., self.live] = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps) * w
        return out


def masked_reference(model: nn.Module, dg: gp.DependencyGraph, kept: dict[int, list[int]]) -> None:
    """Swap every LayerNorm/RMSNorm whose channels are pruned for a masked one (in place)."""
    for path, module in list(model.named_modules()):
        is_rms = isinstance(module, RMSNorm) or type(module).__name__.endswith("RMSNorm")
        if not (isinstance(module, nn.LayerNorm) or is_rms):
            continue
        fqn = f"{path}.weight"
        live = dg.kept_positions(fqn, 0, kept)
        if len(live) == module.weight.shape[0]:
            continue
        parent, _, name = path.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            name,
            MaskedLayerNorm(module, torch.as_tensor(live)),
        )


def dead_first(dead: dict[int, list[int]]) -> Any:
    """An importance callable that ranks dead channels last."""

    def importance(group: gp.Group, tensors: Any, grads: Any) -> np.ndarray:
        scores = np.ones(group.size)
        scores[dead.get(group.id, [])] = 0.0
        return scores

    return importance


def outputs(model: nn.Module, inputs: Any) -> Tensor:
    """The model's output tensor (keyword inputs, HF ``logits`` or ``last_hidden_state``)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)  # type: ignore[no-any-return]
    return out


def check_dead_channels(
    model: nn.Module, x: Any, kinds: set[str], granularity: str, seed: int = 0
) -> gp.CompileReport:
    """Make half of some groups' channels dead, prune with them ranked first, and compare with
    the masked unpruned model (the equivalence oracle). Mutates ``model`` (makes channels dead).
    A channel plan prunes the attention inner width too: its kinds join ``kinds``. The plan
    allows any widths (``config="free"``): the oracle checks the analysis, not the config."""
    dg = gp.analyze(model, x)
    if granularity == "channels":
        kinds = kinds | attention_kinds(dg, "auto", is_pretrained(model))
    dead = choose_dead(model, dg, kinds, 0.5, np.random.default_rng(seed))
    assert dead, f"{type(model).__name__} has no prunable {kinds} group"
    make_dead(model, dg, dead)
    plan = gp.Plan(
        ratio=0.5, importance=dead_first(dead), granularity=granularity, round_to=1,
        config="free",
    )  # fmt: skip
    pruned = gp.compile(model, plan, x)
    resolution = Resolution.from_dict(getattr(pruned, RECORD)["resolution"])
    kept = resolution.kept
    for gid, channels in dead.items():  # every dead channel is gone unless a part needed one
        if gid not in resolution.frozen:  # (frozen groups keep theirs, with a reason)
            assert len(set(channels) & set(kept[gid])) <= 1 + len(channels) // 4
    reference = copy.deepcopy(model)
    masked_reference(reference, dg, kept)
    expected = outputs(reference, x)
    assert expected.std() > 1e-3  # the oracle is not trivial: live channels still carry signal
    torch.testing.assert_close(outputs(pruned, x), expected, atol=1e-5, rtol=1e-4)
    report = gp.report(pruned)
    assert report.params_after < report.params_before
    return report

"""Importance criteria: pure functions from a group to one score per channel.

A criterion scores each *member* tensor position (a row of a weight along the member's dim),
then adds the scores of every position that maps to a channel, over all members of the group
(not just the first layer). Each member's scores are divided by their mean so that a wide
layer does not drown a narrow one. Nothing here mutates the model.

Criteria: ``l1``/``l2`` magnitude; ``bn_scale`` |gamma| of the group's BatchNorms (falls back to
``l1`` where the group has none); ``random`` (seeded); ``taylor`` |w * dL/dw| and ``fisher`` (alias
``hessian``) ½ w² E[(dL/dw)²], the diagonal OBD estimate, both from calibration batches;
``fpgm``, the distance of each channel's weights to the others (near the geometric median =
redundant); ``wanda`` (Sun et al., 2023) |W|·||x||: a consumer layer's input channel j scores
sum_i |W_ij| · ||x_j|| with ||x_j|| its input norm over the calibration batches, so a channel
with large weights but small activations ranks low; the group's other members (producers,
norms, biases) contribute their squared weight norms as ``l2`` does. A callable
``(group, tensors, grads) -> scores`` may replace any of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from graphprune.analysis import DependencyGraph, Group, Member
from graphprune.capture import LabelledBatch, normalize_inputs
from graphprune.oneshot.calibration import input_norms, rows_unsupported
from graphprune.oneshot.distributed import refuse
from graphprune.planning.plan import PlanError

Tensors = Mapping[str, Tensor]
LossFn = Callable[..., Tensor]  # loss_fn(output), or loss_fn(output, target) for LabelledBatch


@dataclass
class ScoringInputs:
    tensors: Tensors  # FQN -> parameter/buffer (detached)
    grads: dict[str, list[Tensor]]  # FQN -> per-batch gradients (taylor/fisher only)
    modules: dict[str, nn.Module]
    rng: np.random.Generator
    input_norms: dict[str, Tensor] = field(default_factory=dict)  # wanda: consumer -> ||x_j||
    # FQN -> the dims the scored groups read it along: each weight is read once for all
    dims: dict[str, set[int]] = field(default_factory=dict)
    _sums: dict[tuple[str, int, int], np.ndarray] = field(default_factory=dict)

    def power_sums(self, fqn: str, dim: int, p: int) -> np.ndarray:
        """:func:`power_sums` of a tensor, computed with the other dims it is scored along
        (one pass over the weight) and kept for the groups that ask again."""
        t = self.tensors[fqn]
        dim = dim % max(t.dim(), 1)
        if (fqn, dim, p) not in self._sums:
            dims = {d % max(t.dim(), 1) for d in self.dims.get(fqn, set())} | {dim}
            self._sums.update({(fqn, d, p): v for d, v in power_sums_along(t, dims, p).items()})
        return self._sums[(fqn, dim, p)]


def _rows(t: Tensor, dim: int) -> np.ndarray:
    """(size, -1) view of ``t`` with ``dim`` first, as float64 numpy."""
    return t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1).double().cpu().numpy()


def _accumulate(group: Group, per_member: Iterable[tuple[Member, np.ndarray]]) -> np.ndarray:
    scores = np.zeros(group.size, dtype=np.float64)
    for m, position_scores in per_member:
        mean = float(np.mean(position_scores))
        if mean > 0:
            position_scores = position_scores / mean
        mapped = m.index_map >= 0
        np.add.at(scores, m.index_map[mapped], position_scores[mapped])
    return scores


def _weights(group: Group, inputs: ScoringInputs) -> list[Member]:
    """Members that are parameters (running stats and other buffers do not vote)."""
    return [m for m in group.members if m.is_parameter and m.fqn in inputs.tensors]


def power_sums(t: Tensor, dim: int, p: int) -> np.ndarray:
    """sum of |t|^p over every dim but ``dim``, per index of ``dim`` (float64)."""
    dim = dim % max(t.dim(), 1)
    return power_sums_along(t, {dim}, p)[dim]


# elements widened at once: a block of rows that stays in cache (1 MiB of float32) while it
# is squared and summed, 2x faster than a 64 MiB block that streams through memory each time
WIDEN_CHUNK = 1 << 18


def power_sums_along(t: Tensor, dims: set[int], p: int) -> dict[int, np.ndarray]:
    """:func:`power_sums` for each of ``dims``, from one |t|^p: in float64 for float32/64
    tensors, in float32 for 16-bit ones (their 8-11 bits of mantissa are far below float32's
    rounding), summed in that type (a float64 sum of a float32 tensor is 20x slower on CPU).
    A 1 B-parameter model in bf16 is so read once, not once per dim in float64, a block of
    ``WIDEN_CHUNK`` elements' rows at a time: the block is squared and summed while in cache,
    and an 8 B model's embedding never takes 2 GB more as float32."""
    x = t.detach()
    if x.dim() <= 1:  # a vector: each entry is its own channel
        return {d: (x.double().abs() ** p).cpu().numpy() for d in dims}
    wide = torch.float32 if x.is_floating_point() and x.element_size() <= 2 else torch.float64
    if x.numel() == 0:
        return {d: np.zeros(x.shape[d]) for d in dims}
    rows = max(1, WIDEN_CHUNK // max(1, x[0].numel()))
    firsts: list[Tensor] = []  # dim 0: each block's rows, in order
    totals: dict[int, Tensor] = {}  # other dims: summed over the blocks as they come
    for start in range(0, x.shape[0], rows):
        powered = x[start : start + rows].to(wide, copy=True)
        powered = powered.square_() if p == 2 else powered.abs_().pow_(p)
        for d in dims:
            part = powered.sum(dim=[o for o in range(x.dim()) if o != d])
            if d == 0:
                firsts.append(part)
            else:
                totals[d] = totals[d] + part if d in totals else part
        del powered
    return {
        d: (torch.cat(firsts) if d == 0 else totals[d]).double().cpu().numpy() for d in dims
    }


def magnitude(group: Group, inputs: ScoringInputs, p: int) -> np.ndarray:
    def member_scores() -> Iterable[tuple[Member, np.ndarray]]:
        for m in _weights(group, inputs):
            yield m, inputs.power_sums(m.fqn, m.dim, p)

    return _accumulate(group, member_scores())


def bn_scale(group: Group, inputs: ScoringInputs) -> np.ndarray:
    norms = [
        m
        for m in _weights(group, inputs)
        if m.fqn.endswith(".weight")
        and isinstance(inputs.modules.get(m.module), nn.modules.batchnorm._BatchNorm)
    ]
    if not norms:
        return magnitude(group, inputs, 1)
    return _accumulate(
        group, ((m, np.abs(_rows(inputs.tensors[m.fqn], m.dim))[:, 0]) for m in norms)
    )


def random_scores(group: Group, inputs: ScoringInputs) -> np.ndarray:
    return inputs.rng.random(group.size)


def taylor(group: Group, inputs: ScoringInputs) -> np.ndarray:
    def member_scores() -> Iterable[tuple[Member, np.ndarray]]:
        for m in _weights(group, inputs):
            w = inputs.tensors[m.fqn]
            total = sum(np.abs(_rows(w * g, m.dim)).sum(axis=1) for g in inputs.grads[m.fqn])
            yield m, np.asarray(total)

    return _accumulate(group, member_scores())


def fisher(group: Group, inputs: ScoringInputs) -> np.ndarray:
    def member_scores() -> Iterable[tuple[Member, np.ndarray]]:
        for m in _weights(group, inputs):
            w = inputs.tensors[m.fqn]
            grads = inputs.grads[m.fqn]
            g2 = sum(g.double() ** 2 for g in grads) / max(len(grads), 1)
            yield m, 0.5 * _rows(w.double() ** 2 * g2, m.dim).sum(axis=1)

    return _accumulate(group, member_scores())


def fpgm(group: Group, inputs: ScoringInputs) -> np.ndarray:
    def member_scores() -> Iterable[tuple[Member, np.ndarray]]:
        for m in _weights(group, inputs):
            rows = _rows(inputs.tensors[m.fqn], m.dim)
            if rows.shape[1] < 2:  # a vector (bias, norm scale): no geometry to compare
                continue
            distances = np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))
            yield m, distances.sum(axis=1)

    scores = _accumulate(group, member_scores())
    return scores if scores.any() else magnitude(group, inputs, 2)


def is_consumer(member: Member, modules: dict[str, nn.Module]) -> bool:
    """``member`` is the input dim of a Linear/Conv (groups=1) weight."""
    module = modules.get(member.module)
    return (
        member.dim == 1
        and member.fqn == f"{member.module}.weight"
        and module is not None
        and not rows_unsupported(module)
    )


def wanda(group: Group, inputs: ScoringInputs) -> np.ndarray:
    def member_scores() -> Iterable[tuple[Member, np.ndarray]]:
        for m in _weights(group, inputs):
            norms = inputs.input_norms.get(m.module) if is_consumer(m, inputs.modules) else None
            if norms is not None:
                yield m, inputs.power_sums(m.fqn, m.dim, 1) * norms.cpu().numpy()
            else:
                yield m, inputs.power_sums(m.fqn, m.dim, 2)

    return _accumulate(group, member_scores())


CRITERIA: dict[str, Callable[[Group, ScoringInputs], np.ndarray]] = {
    "l1": lambda g, i: magnitude(g, i, 1),
    "l2": lambda g, i: magnitude(g, i, 2),
    "bn_scale": bn_scale,
    "random": random_scores,
    "taylor": taylor,
    "fisher": fisher,
    "hessian": fisher,
    "fpgm": fpgm,
    "wanda": wanda,
}
NEEDS_GRADIENTS = {"taylor", "fisher", "hessian"}
WEIGHT_ONLY = {"l1", "l2", "fpgm", "bn_scale", "random"}  # criteria that read no data
NormSource = Callable[[list[str], list[Any]], dict[str, Tensor]]  # (layers, batches) -> norms


def default_loss(output: Any) -> Tensor:
    """Without labels: the mean squared output (a proxy that weights every output equally)."""
    if isinstance(output, Tensor):
        return output.float().pow(2).mean()
    if isinstance(output, dict):
        output = list(output.values())
    return sum((default_loss(o) for o in output), torch.zeros(()))


def gradients(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn | None, fqns: set[str]
) -> dict[str, list[Tensor]]:
    """Per-batch gradients of ``loss_fn(model(batch))`` for the named parameters.

    The model's parameters and ``.grad`` are left as they were (gradients are read, then reset).
    """
    refuse("a gradient criterion (taylor, fisher)")
    named = dict(model.named_parameters(remove_duplicate=False))
    saved = {n: p.grad for n, p in named.items()}
    requires = {n: p.requires_grad for n, p in named.items()}
    out: dict[str, list[Tensor]] = {n: [] for n in fqns if n in named}
    loss_fn = loss_fn or cast(LossFn, default_loss)
    try:
        for p in named.values():
            p.requires_grad_(True)
        for batch in batches:
            args, kwargs = normalize_inputs(batch)
            for p in named.values():
                p.grad = None
            output = model(*args, **kwargs)
            labelled = isinstance(batch, LabelledBatch)
            loss = loss_fn(output, batch.target) if labelled else loss_fn(output)
            loss.backward()
            for n in out:
                g = named[n].grad
                out[n].append(torch.zeros_like(named[n]) if g is None else g.detach().clone())
    finally:
        for n, p in named.items():
            p.grad = saved[n]
            p.requires_grad_(requires[n])
    return out


def score_groups(
    model: nn.Module,
    dg: DependencyGraph,
    groups: list[Group],
    criterion: str | Callable[..., Any],
    *,
    batches: Iterable[Any] = (),
    loss_fn: LossFn | None = None,
    seed: int = 0,
    weights: Mapping[str, Tensor] | None = None,
    norms_from: NormSource | None = None,
) -> dict[int, np.ndarray]:
    """One score per channel for each group in ``groups`` (higher = more important).
    ``weights``: where to read the tensors by FQN instead of ``model`` (a checkpoint read
    tensor by tensor, for a model built on the meta device; weight criteria, and wanda when
    ``norms_from`` measures the input norms). ``norms_from(layers, batches)``: wanda's input
    norms (default: :func:`~graphprune.oneshot.calibration.input_norms` on ``model``)."""
    tensors: Mapping[str, Tensor]
    if weights is not None:
        data_free = criterion in WEIGHT_ONLY or (criterion == "wanda" and norms_from is not None)
        if callable(criterion) or not data_free:
            raise PlanError(
                f"importance={criterion!r} needs the model's forward on data; a model read "
                f"from a checkpoint is scored by weights alone (one of {sorted(WEIGHT_ONLY)}) "
                "or by wanda on calibration data"
            )
        tensors = weights
    else:
        tensors = {n: t.detach() for n, t in model.named_parameters(remove_duplicate=False)}
        tensors.update({n: t.detach() for n, t in model.named_buffers(remove_duplicate=False)})
    fqns = {m.fqn for g in groups for m in g.members if m.is_parameter}
    grads: dict[str, list[Tensor]] = {}
    if callable(criterion) or criterion in NEEDS_GRADIENTS:
        was_training = {m: m.training for m in model.modules()}
        model.eval()
        try:
            grads = gradients(model, batches, loss_fn, fqns)
        finally:
            for m, t in was_training.items():
                m.train(t)
    modules = dict(model.named_modules())
    norms: dict[str, Tensor] = {}
    if criterion == "wanda":
        batches = list(batches)
        consumers = {m.module for g in groups for m in g.members if is_consumer(m, modules)}
        measure = norms_from or functools.partial(input_norms, model)
        norms = measure(sorted(consumers), batches)
    inputs = ScoringInputs(tensors, grads, modules, np.random.default_rng(seed), norms)
    for g in groups:
        for member in g.members:
            inputs.dims.setdefault(member.fqn, set()).add(member.dim)
    if callable(criterion):  # the user's function gets copies: it cannot change the weights
        own = {n: t.clone() for n, t in tensors.items()}
        own_grads = {n: [g.clone() for g in gs] for n, gs in grads.items()}
    scores: dict[int, np.ndarray] = {}
    for g in groups:
        if callable(criterion):
            values = _as_scores(criterion(g, own, own_grads), g)
        else:
            values = CRITERIA[criterion](g, inputs)
        if values.shape != (g.size,):
            raise PlanError(
                f"importance for group {g.id} ({g.name}) returned shape {values.shape}, "
                f"expected ({g.size},): one score per channel"
            )
        scores[g.id] = values
    return scores


def _as_scores(values: Any, group: Group) -> np.ndarray:
    try:
        if isinstance(values, Tensor):
            values = values.detach().cpu().double().numpy()
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PlanError(
            f"the importance callable returned {type(values).__name__} for group {group.id} "
            f"({group.name}), not numbers ({exc}); return one float per channel"
        ) from None


def nonfinite_groups(scores: dict[int, np.ndarray]) -> dict[int, int]:
    """Group id -> how many of its channels scored NaN or inf."""
    return {g: int((~np.isfinite(s)).sum()) for g, s in scores.items() if not np.isfinite(s).all()}

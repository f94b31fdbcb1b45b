"""Sparse masks: which single weights (or n:m groups, or blocks) of each layer are zeroed.

Every Linear/Conv weight is seen as a matrix so one code path serves all layers:

* ``block`` and ``unstructured``: the natural (out, in * k) view -- for Linear and 1x1 convs
  that is exactly the (out, in) matrix a CSR/BSR kernel multiplies;
* ``n:m``: the (out, k * in) view with input channels last (conv weights permuted to
  (out, kh, kw, in)), so every group of m consecutive weights shares an output channel and a
  kernel position and spans m input channels, as sparse tensor cores expect.

Scores are per weight (higher = keep): ``l1`` |w|, ``l2`` w², ``random`` (seeded), ``taylor``
|w · E[dL/dw]|, ``fisher``/``hessian`` ½ w² E[(dL/dw)²] over the calibration batches, ``wanda``
|w_ij| · ||x_j|| (x_j: the layer's input channel j over the calibration batches). Counts are
exact: a local plan zeroes ``floor(ratio · n)`` weights (or blocks) of every layer -- with
``wanda`` unstructured, ``floor(ratio · n_row)`` of every output row, Wanda's per-output
comparison; a global plan zeroes ``floor(ratio · N)`` of all of them, never more than
``max_ratio`` of any one layer.
Nothing here changes the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from graphprune.capture import tensor_aliases
from graphprune.modules import weight_of
from graphprune.oneshot.calibration import input_norms
from graphprune.planning.importance import LossFn, gradients
from graphprune.planning.plan import Plan

MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerMask:
    """The mask of one layer's weight: True = kept."""

    module: str  # FQN of the Linear/Conv module
    pattern: str  # "unstructured", "n:m" or "block"
    mask: Tensor  # bool, the weight's shape

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())


@dataclass
class MaskSet:
    layers: dict[str, LayerMask] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # module FQN -> why it stays dense


def maskable_layers(
    model: nn.Module, plan: Plan, previous: dict[str, Tensor] | None = None
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Linear/Conv modules the sparse ``plan`` masks, and the ones it leaves dense (with why).
    Layers in ``previous`` (masked already) may be masked again."""
    previous = previous or {}
    aliases = tensor_aliases(model)
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, MASKABLE):
            continue
        if plan.include and not any(fnmatchcase(name, p) for p in plan.include):
            continue
        if any(fnmatchcase(name, p) for p in plan.ignore):
            skipped[name] = "ignored by the plan"
        elif len(shared := aliases.get(f"{name}.weight", [])) > 1:
            other = next(n for n in shared if n != f"{name}.weight")
            skipped[name] = (
                f"weight tied with {other}: a mask on one user of a shared "
                "weight would untie it; left dense"
            )
        elif parametrize.is_parametrized(module) and name not in previous:
            skipped[name] = "weight already parametrized (masked?): finalize() it first"
        else:
            chosen[name] = module
    return chosen, skipped


def compute_masks(
    model: nn.Module,
    plan: Plan,
    *,
    batches: Iterable[Any] = (),
    loss_fn: LossFn | None = None,
    previous: dict[str, Tensor] | None = None,
) -> MaskSet:
    """Masks for every layer the sparse ``plan`` selects (see the module docstring).

    ``previous``: masks from an earlier step (iterative pruning); weights they cut are cut
    first again, so each step's mask is a subset of the last one.
    """
    assert plan.is_sparse, plan.granularity
    layers, skipped = maskable_layers(model, plan, previous)
    result = MaskSet(skipped=skipped)
    scores = _scores(model, layers, plan, list(batches), loss_fn)
    for name, mask in (previous or {}).items():
        if name in scores:  # every score is >= 0: -1 ranks the cut weights below all others
            scores[name][~mask.cpu().numpy()] = -1.0
    if plan.scope != "global":
        for name, module in layers.items():
            found = layer_mask(name, module, plan, scores[name])
            if isinstance(found, str):
                result.skipped[name] = found
            else:
                result.layers[name] = found
        return result
    units: dict[str, np.ndarray] = {}  # per layer: scores of the units that are zeroed together
    for name, module in layers.items():
        matrix = _units(scores[name], plan, weight_of(module))
        if isinstance(matrix, str):
            result.skipped[name] = matrix
        else:
            units[name] = matrix
    if not units:  # every layer ignored, tied or unfit: nothing to rank
        return result
    for name, kept in _global_keep(units, plan.ratio or 0.0, plan.max_ratio).items():
        weight = weight_of(layers[name])
        result.layers[name] = LayerMask(name, plan.granularity, _from_units(kept, plan, weight))
    return result


def layer_mask(name: str, module: nn.Module, plan: Plan, scores: np.ndarray) -> LayerMask | str:
    """One layer's mask under a local sparse ``plan`` from its per-weight ``scores`` (higher =
    keep), or why the layer stays dense (a shape the pattern does not tile)."""
    weight = weight_of(module)
    if plan.granularity == "n:m":
        why = unfit(plan, tuple(weight.shape))
        if why:
            return why
        n, m = plan.nm
        kept = _nm_keep(_matrix(scores, "n:m"), n, m)
        return LayerMask(name, "n:m", _unmatrix(kept, weight, "n:m"))
    units = _units(scores, plan, weight)
    if isinstance(units, str):
        return units
    per_row = plan.importance == "wanda" and plan.granularity == "unstructured"
    kept = _local_keep(units, plan.ratio_for([name]), per_row=per_row)
    return LayerMask(name, plan.granularity, _from_units(kept, plan, weight))


def _units(scores: np.ndarray, plan: Plan, weight: Tensor) -> np.ndarray | str:
    """The scores of the units zeroed together (single weights, or summed over each block),
    as a matrix; or why a block pattern does not tile the weight."""
    why = unfit(plan, tuple(weight.shape))
    if why:
        return why
    matrix = _matrix(scores, plan.granularity)
    if plan.granularity != "block":
        return matrix
    r, c = plan.block
    return matrix.reshape(matrix.shape[0] // r, r, -1, c).sum(axis=(1, 3))


def unfit(plan: Plan, shape: tuple[int, ...]) -> str:
    """Why the sparse ``plan``'s pattern does not fit a weight of ``shape`` ("" when it does):
    n:m groups must not straddle kernel positions; blocks must tile the (out, in * k) matrix."""
    if plan.granularity == "n:m" and shape[1] % plan.nm[1]:
        return f"{shape[1]} input channels are not a multiple of m={plan.nm[1]}"
    if plan.granularity == "block":
        r, c = plan.block
        rows, cols = shape[0], math.prod(shape[1:])
        if rows % r or cols % c:
            return f"weight ({rows}, {cols}) does not tile into {r}x{c} blocks"
    return ""


def _from_units(kept: np.ndarray, plan: Plan, weight: Tensor) -> Tensor:
    if plan.granularity == "block":
        r, c = plan.block
        kept = np.repeat(np.repeat(kept, r, axis=0), c, axis=1)
    return _unmatrix(kept, weight, plan.granularity)


# -- scores ---------------------------------------------------------------------------------
WEIGHT_CRITERIA = ("l1", "l2")  # scores from the weight alone, one layer at a time


def weight_scores(weight: Tensor, criterion: str) -> np.ndarray:
    """Per-weight scores from the weight alone: |w| (l1) or w^2 (l2), in float64."""
    w = weight.detach().double()
    return (w.abs() if criterion == "l1" else w * w).numpy()


def wanda_scores(module: nn.Module, weight: Tensor, norms: Tensor | None) -> np.ndarray:
    """|W_ij| * ||x_j||, in float64 (``norms``: the layer's input norms; None: never called)."""
    w = weight.detach().double()
    return (w.abs() * _input_scale(module, w, norms)).numpy()


def _scores(
    model: nn.Module,
    layers: dict[str, nn.Module],
    plan: Plan,
    batches: list[Any],
    loss_fn: LossFn | None,
) -> dict[str, np.ndarray]:
    weights = {n: weight_of(m).detach().double() for n, m in layers.items()}
    criterion = plan.importance
    if criterion in WEIGHT_CRITERIA:
        return {n: weight_scores(w, criterion) for n, w in weights.items()}
    if criterion == "random":
        rng = np.random.default_rng(plan.seed)
        return {n: rng.random(tuple(w.shape)) for n, w in weights.items()}
    if not batches:
        raise ValueError(f"importance={criterion!r} needs calibration batches")
    if criterion == "wanda":
        norms = input_norms(model, list(layers), batches)
        return {n: wanda_scores(layers[n], w, norms.get(n)) for n, w in weights.items()}
    fqns = {f"{n}.weight" for n in layers}
    grads = gradients(model, batches, loss_fn, fqns)
    out = {}
    for n, w in weights.items():
        g = torch.stack([x.double() for x in grads[f"{n}.weight"]])  # (batches, *w.shape)
        if criterion == "taylor":
            out[n] = (w * g.mean(0)).abs().numpy()
        else:  # fisher / hessian: the diagonal OBD saliency
            out[n] = (0.5 * w * w * (g * g).mean(0)).numpy()
    return out


# -- matrix views -----------------------------------------------------------------------------
def _matrix(scores: np.ndarray, pattern: str) -> np.ndarray:
    """(out, -1) view; for n:m with input channels last (see the module docstring)."""
    if pattern == "n:m" and scores.ndim > 2:
        scores = np.moveaxis(scores, 1, -1)  # (out, in, *k) -> (out, *k, in)
    return scores.reshape(scores.shape[0], -1)


def _unmatrix(kept: np.ndarray, weight: Tensor, pattern: str) -> Tensor:
    """The inverse of :func:`_matrix`: a bool mask in ``weight``'s shape."""
    shape = tuple(weight.shape)
    if pattern == "n:m" and len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        kept = np.moveaxis(kept.reshape(moved), -1, 1)
    return torch.from_numpy(np.ascontiguousarray(kept.reshape(shape))).to(torch.bool)


# -- selection ---------------------------------------------------------------------------------
def _input_scale(module: nn.Module, weight: Tensor, norms: Tensor | None) -> Tensor:
    """||x_j|| broadcast to ``weight``'s shape (grouped convs: each output row sees its group's
    inputs); ones for a layer the forward never called."""
    if norms is None:
        return torch.ones_like(weight)
    groups = getattr(module, "groups", 1)
    per_group = norms.reshape(groups, -1)  # (groups, in / groups)
    rows = per_group.repeat_interleave(weight.shape[0] // groups, dim=0)  # (out, in / groups)
    return rows.reshape(*rows.shape, *([1] * (weight.dim() - 2)))


def _local_keep(scores: np.ndarray, ratio: float, per_row: bool = False) -> np.ndarray:
    """Zero exactly floor(ratio * n) of the lowest scores (ties: earliest index first); with
    ``per_row``, floor(ratio * n_row) of each row."""
    if per_row:
        matrix = scores.reshape(scores.shape[0], -1)
        k = math.floor(ratio * matrix.shape[1] + 1e-9)
        rows = np.ones(matrix.shape, dtype=bool)
        np.put_along_axis(rows, np.argsort(matrix, axis=1, kind="stable")[:, :k], False, axis=1)
        return rows.reshape(scores.shape)
    flat = scores.ravel()
    k = math.floor(ratio * flat.size + 1e-9)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep.reshape(scores.shape)


def _global_keep(
    units: dict[str, np.ndarray], ratio: float, max_ratio: float
) -> dict[str, np.ndarray]:
    """One threshold over all layers; each layer's top (1 - max_ratio) is protected."""
    names = list(units)
    flats = [units[n].ravel() for n in names]
    total = sum(f.size for f in flats)
    k = math.floor(ratio * total + 1e-9)
    candidates = []  # (score, layer, index) of every unprotected unit
    for li, flat in enumerate(flats):
        protect = math.ceil((1.0 - max_ratio) * flat.size - 1e-9)
        order = np.argsort(flat, kind="stable")
        free = order[: flat.size - protect]
        candidates.append((flat[free], np.full(free.size, li), free))
    scores = np.concatenate([c[0] for c in candidates])
    layer = np.concatenate([c[1] for c in candidates])
    index = np.concatenate([c[2] for c in candidates])
    drop = np.lexsort((index, layer, scores))[:k]  # lowest score first, then a fixed order
    keeps = [np.ones(f.size, dtype=bool) for f in flats]
    for li, i in zip(layer[drop], index[drop], strict=True):
        keeps[li][i] = False
    return {n: keeps[i].reshape(units[n].shape) for i, n in enumerate(names)}


def _nm_keep(matrix: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n highest of every m consecutive scores in each row (ties: earliest)."""
    groups = matrix.reshape(matrix.shape[0], -1, m)  # (out, cols / m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep.reshape(matrix.shape)


# -- model facts ------------------------------------------------------------------------------

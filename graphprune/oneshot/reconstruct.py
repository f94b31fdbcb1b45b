"""Reconstruction: update the kept weights so each pruned layer reproduces its original output.

Both methods go layer by layer in forward order, and each layer sees the activations of the
model as pruned *and reconstructed so far* (as SparseGPT does), so errors upstream are
compensated downstream. Only one layer's statistics are alive at a time (:class:`Statistics`).

* **Structured** (:func:`refit_consumers`): every Linear/Conv whose input channels were removed
  is refit by ridge least squares on its kept inputs: with A the pruned layer's input rows (and
  a column of ones for the bias: bias compensation, the removed channels' mean contribution
  folds into it) and Y the original layer's output on the original model's activations (its
  kept output channels), ``B = (A^T A + lam I)^-1 A^T Y``. ``lam`` is chosen by two-fold
  cross-validation on the calibration batches from ``RIDGE`` (relative to the mean diagonal of
  A^T A; the bias is not penalised), so few calibration rows do not overfit and exact
  dependencies are recovered exactly. Every BatchNorm (affine) on the way is refit the same
  way, per channel: its scale and shift by 1-D least squares of the original BN output on its
  normalised input -- the least-squares form of recalibration (a BN whose input did not change
  keeps its values exactly; one whose input drifted is re-centred and re-scaled).
* **Sparse** (:func:`sparsegpt`): SparseGPT (Frantar & Alistarh, 2023): with the layer Hessian
  H = X^T X damped by 1 % of its mean diagonal, columns are processed in blocks of 128; each
  zeroed weight's error is spread over the not yet processed columns through the Cholesky factor
  of H^-1. Unstructured and n:m masks are chosen on the way by the OBS saliency
  w^2 / [H^-1]_jj^2 (per column block; n:m per group of m, so the pattern is exact); block masks
  and masks given by an earlier step are kept as they are.

A layer never ends up worse on the calibration data than without reconstruction: when an update
would raise its error, the layer keeps the plain pruned weights (the report says so).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from graphprune.capture import eval_mode, tensor_aliases
from graphprune.errors import InputError
from graphprune.memory import release_freed_memory
from graphprune.modules import stored_weight
from graphprune.oneshot.calibration import (
    CallOrder,
    call_order,
    channel_rows,
    in_lockstep,
    in_one_forward,
    input_rows,
    layer_inputs,
    rows_unsupported,
)
from graphprune.oneshot.distributed import (
    all_sum,
    batch_total,
    fold_of,
    same_everywhere,
    sum_int,
)
from graphprune.progress import track


@dataclass
class LayerFit:
    """How reconstruction changed one layer's output on the calibration data.

    Errors are relative: ||Y - Y_pruned||^2 / ||Y||^2 over every calibration row, where Y is
    the original layer's output (structured: on the original model's activations) and
    Y_pruned the pruned layer's, before and after its weights were updated (SparseGPT: over
    at most ``ERROR_ROWS`` evenly spaced output channels of the layer).
    """

    module: str
    method: str  # "least squares", "sparsegpt", or "skipped"
    error_before: float
    error_after: float
    rows: int  # calibration rows (tokens or conv output positions) the fit used
    note: str = ""


NORMS = nn.modules.batchnorm._BatchNorm
RIDGE = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)  # lam / mean(diag(A^T A)) tried by validation
PERCDAMP = 0.01  # SparseGPT's Hessian damping, relative to its mean diagonal
BLOCK = 128  # SparseGPT's column block
ERROR_ROWS = 512  # output rows a SparseGPT fit's errors are measured on (evenly spaced)


class Statistics:
    """Normal equations of one layer in two folds: G = A^T A, C = A^T Y, yy = ||Y||^2 (float64).

    Every live instance is tracked (``Statistics.live``) so tests can check that only one
    layer's statistics exist at a time.
    """

    live: ClassVar[weakref.WeakSet[Statistics]] = weakref.WeakSet()

    def __init__(self, columns: int, outputs: int) -> None:
        self.G = torch.zeros(2, columns, columns, dtype=torch.float64)
        self.C = torch.zeros(2, columns, outputs, dtype=torch.float64)
        self.yy = torch.zeros(2, dtype=torch.float64)
        self.rows = 0
        Statistics.live.add(self)

    def add(self, a: Tensor, y: Tensor, fold: int) -> None:
        a, y = a.double(), y.double()
        self.G[fold] += a.T @ a
        self.C[fold] += a.T @ y
        self.yy[fold] += (y * y).sum()
        self.rows += a.shape[0]

    def gather(self) -> None:
        """Sum the statistics over every process's share of the batches."""
        all_sum(self.G, self.C, self.yy)
        self.rows = sum_int(self.rows)

    def error(self, b: Tensor, fold: int | None = None) -> float:
        """||Y - A B||^2 from the statistics (both folds when ``fold`` is None)."""
        g, c, yy = (
            (self.G.sum(0), self.C.sum(0), self.yy.sum())
            if fold is None
            else (self.G[fold], self.C[fold], self.yy[fold])
        )
        return float(((b * (g @ b)).sum() - 2 * (b * c).sum() + yy).clamp_min(0))

    def solve(self, lam_rel: float, fold: int | None, penalised: int) -> Tensor:
        """Ridge solution on one fold (or both); the first ``penalised`` columns carry the
        ridge (the bias column does not)."""
        g = self.G.sum(0) if fold is None else self.G[fold]
        c = self.C.sum(0) if fold is None else self.C[fold]
        diag = torch.diagonal(g)[:penalised]
        lam = lam_rel * float(diag.mean()) if penalised else 0.0
        reg = torch.zeros(g.shape[0], dtype=g.dtype)
        reg[:penalised] = max(lam, 1e-12 * float(diag.max()) if penalised else 0.0)
        system = g + torch.diag(reg)
        solution, info = torch.linalg.solve_ex(system, c)
        if int(info) != 0:  # singular (a dead input with no ridge): least norm instead
            solution = torch.linalg.lstsq(system, c).solution
        return solution


def _split(a: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    half = a.shape[0] // 2
    return [(a[:half], y[:half]), (a[half:], y[half:])]


def ridge_refit(stats: Statistics, penalised: int) -> tuple[Tensor, float]:
    """The ridge solution on all rows, its relative lam chosen from ``RIDGE`` by two-fold
    cross-validation (fit on one fold, error on the other, both ways)."""
    scores = [
        (sum(stats.error(stats.solve(lam, fold, penalised), 1 - fold) for fold in (0, 1)), lam)
        for lam in RIDGE
    ]
    best = min(scores)[1]
    return stats.solve(best, None, penalised), best


# -- structured: least-squares refit of the consumers --------------------------------------------
def consumers(original: nn.Module, pruned: nn.Module) -> dict[str, str]:
    """Layers of ``pruned`` whose input channels were removed -> "" or why they are not refit."""
    before = dict(original.named_modules())
    aliases = tensor_aliases(pruned)
    found: dict[str, str] = {}
    for name, module in pruned.named_modules():
        old = before.get(name)
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            continue
        if old is None or not isinstance(old, type(module)):
            continue
        w, w0 = module.weight, old.weight
        if w.shape[1] == w0.shape[1]:
            continue  # inputs kept: nothing removed from this layer's input
        why = rows_unsupported(module)
        shared = [n for n in aliases.get(f"{name}.weight", []) if n != f"{name}.weight"]
        if shared:
            why = f"weight tied with {shared[0]}: a refit would change it there too"
        found[name] = why
    return found


def refit_consumers(
    original: nn.Module,
    pruned: nn.Module,
    output_index: Callable[[str], Tensor | None],
    batches: Sequence[Any],
    *,
    progress: bool = True,
    order: CallOrder | None = None,
    one_forward: bool = False,
    skip: Collection[str] = (),
) -> list[LayerFit]:
    """Refit every consumer of a pruned group in ``pruned`` (in place; see the module doc).

    ``output_index(name)``: the original output channels layer ``name`` kept (None: all).
    ``order``: the call order of :func:`refit_layers` when the caller has it (a model whose
    weights stream in as the forward goes: from a forward on shapes); ``one_forward`` raises
    instead of running the forwards per layer (such a model); ``skip``: layers left as they
    are (fit by an interrupted run).
    """
    todo = {n: why for n, why in consumers(original, pruned).items() if n not in skip}
    layers = refit_layers(original, pruned, skip)
    norms = [n for n in layers if isinstance(pruned.get_submodule(n), NORMS)]
    found = order if order is not None else call_order(pruned, layers, batches[0])
    fits = [LayerFit(n, "skipped", math.nan, math.nan, 0, why) for n, why in todo.items() if why]
    for name in found.order:
        if found.calls[name] != 1:
            fits.append(
                LayerFit(name, "skipped", math.nan, math.nan, 0, f"called {found.calls[name]} "
                         "times per forward (a shared layer has no single input to fit)")
            )  # fmt: skip
    todo_names = [n for n in found.order if found.calls[n] == 1]
    same_everywhere(todo_names, "the layers to refit, in forward order")
    steps = iter(track(todo_names, "reconstructing layers", progress))
    is_norm = set(norms)

    def refit(
        name: str, module: nn.Module, pairs: Iterable[tuple[Tensor, Tensor]], by_batch: bool
    ) -> None:
        next(steps, None)  # advance the progress bar
        fit = (
            _refit_norm(module, name, pairs)
            if name in is_norm
            else _refit_layer(module, name, pairs, by_batch=by_batch)
        )
        if fit is not None:
            fits.append(fit)

    def reference(name: str, old: nn.Module, parts: list[Tensor]) -> list[Tensor]:
        kept = output_index(name)  # the original layer's output rows, per batch
        return [_kept(channel_rows(old(part), old), kept) for part in parts]

    def visit(name: str, new: nn.Module, parts: list[Tensor], targets: list[Tensor]) -> None:
        pairs = list(zip(targets, parts, strict=True))
        refit(name, new, pairs, batch_total(len(pairs)) > 1)

    if not in_lockstep(original, pruned, found, batches, reference, visit):
        if one_forward and todo_names:
            raise InputError(
                "reconstruct=True here fits the layers in one forward of the original and the "
                "pruned model side by side: give calibration batches of one shape (they are "
                "stacked) whose activations fit 512 MiB per layer"
            )
        for name in todo_names:
            pairs = _targets(original, pruned, name, output_index(name), batches)
            refit(name, pruned.get_submodule(name), pairs, batch_total(len(batches)) > 1)
    for _ in steps:  # drain the bar
        pass
    return in_forward_order(fits, found.order)


def refit_layers(original: nn.Module, pruned: nn.Module, skip: Collection[str] = ()) -> list[str]:
    """The layers :func:`refit_consumers` fits: the consumers it can refit and the affine
    BatchNorms that track statistics (not those in ``skip``)."""
    todo = consumers(original, pruned)
    norms = [
        n
        for n, m in pruned.named_modules()
        if isinstance(m, NORMS) and m.affine and m.track_running_stats
    ]
    return [n for n in [*(n for n, why in todo.items() if not why), *norms] if n not in skip]


def in_forward_order(fits: list[LayerFit], order: list[str]) -> list[LayerFit]:
    """The fits in the order the forward calls their layers (layers it never calls last)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(fits, key=lambda f: rank.get(f.module, len(rank)))


def _kept(y: Tensor, kept: Tensor | None) -> Tensor:
    return y if kept is None else y[:, kept]


def _targets(
    original: nn.Module,
    pruned: nn.Module,
    name: str,
    kept: Tensor | None,
    batches: Sequence[Any],
) -> Iterator[tuple[Tensor, Tensor]]:
    """Per batch: the original layer's output rows on the original model's activations (its
    ``kept`` output channels; None: all) and the pruned layer's input."""
    old = original.get_submodule(name)
    old_inputs = layer_inputs(original, name, batches)
    for x_old, x_new in zip(old_inputs, layer_inputs(pruned, name, batches), strict=True):
        with eval_mode(old), torch.no_grad():  # a BatchNorm in train mode would update stats
            y = channel_rows(old(x_old), old)  # (rows, channels of the original)
        yield _kept(y, kept), x_new


def _refit_norm(
    new: nn.Module, name: str, pairs: Iterable[tuple[Tensor, Tensor]]
) -> LayerFit | None:
    """Per-channel least squares of a BatchNorm's weight and bias from (original output,
    pruned input) pairs (None: nothing changed)."""
    assert isinstance(new, NORMS) and isinstance(new.running_mean, Tensor)
    assert isinstance(new.running_var, Tensor)
    channels = new.num_features
    sums = torch.zeros(5, channels, dtype=torch.float64)  # u, u^2, z, u z, z^2 per channel
    rows = 0
    with torch.no_grad():
        scale = (new.running_var.double() + new.eps).rsqrt()
        for z, x_new in pairs:
            z = z.double()
            u = (channel_rows(x_new, new).double() - new.running_mean.double()) * scale
            sums += torch.stack([u.sum(0), (u * u).sum(0), z.sum(0), (u * z).sum(0),
                                 (z * z).sum(0)])  # fmt: skip
            rows += u.shape[0]
    all_sum(sums)  # over every process's share of the batches
    rows = sum_int(rows)
    su, suu, sz, suz, szz = sums
    n = float(rows)
    var_u = suu - su * su / n
    gain = torch.where(var_u > 1e-12 * n, (suz - su * sz / n) / var_u.clamp_min(1e-30), 0.0)
    shift = (sz - gain * su) / n

    def error(g: Tensor, b: Tensor) -> float:  # sum over rows of (z - g u - b)^2
        return float((szz - 2 * g * suz - 2 * b * sz + g * g * suu + 2 * g * b * su
                      + n * b * b).sum())  # fmt: skip

    assert isinstance(new.weight, Tensor) and isinstance(new.bias, Tensor)
    g0, b0 = new.weight.detach().double(), new.bias.detach().double()
    total = max(float(szz.sum()), 1e-30)
    before, after = error(g0, b0) / total, error(gain, shift) / total
    if before <= 1e-12:
        return None  # the input did not change (rounding only): nothing to fit
    note = "per-channel scale and shift"
    if after > before:
        gain, shift, after, note = g0, b0, before, "a refit would not lower the error: kept"
    with torch.no_grad():
        new.weight.copy_(gain.to(new.weight.dtype))
        new.bias.copy_(shift.to(new.bias.dtype))
    return LayerFit(name, "least squares", before, after, rows, note)


def _refit_layer(
    new: nn.Module, name: str, pairs: Iterable[tuple[Tensor, Tensor]], *, by_batch: bool
) -> LayerFit:
    """Ridge refit of one layer from (original output, pruned input) pairs, one per batch:
    the folds are alternate batches (``by_batch``), or the two halves of the only one."""
    weight = new.weight
    assert isinstance(weight, Tensor)
    out, columns = weight.shape[0], weight[0].numel()
    has_bias = isinstance(new.bias, Tensor)
    stats = Statistics(columns + int(has_bias), out)
    with torch.no_grad():
        for b, (y, x_new) in enumerate(pairs):
            a = input_rows(new, x_new)  # (rows, columns)
            if has_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            if by_batch:  # the folds: alternate batches (of all processes')
                stats.add(a, y, fold_of(b))
            else:  # one batch: its two halves are the folds
                for fold, (a_part, y_part) in enumerate(_split(a, y)):
                    stats.add(a_part, y_part, fold)
        stats.gather()
        current = weight.detach().reshape(out, -1).double().T  # (columns, out)
        if has_bias:
            assert isinstance(new.bias, Tensor)
            current = torch.cat([current, new.bias.detach().double()[None]], dim=0)
        solution, lam = ridge_refit(stats, columns)
        total = max(float(stats.yy.sum()), 1e-30)
        before, after = stats.error(current) / total, stats.error(solution) / total
        note = f"ridge {lam:g}"
        if after > before:
            solution, after, note = current, before, "a refit would not lower the error: kept"
        if stats.rows < columns:
            note += f"; {stats.rows} rows for {columns} inputs (more calibration data helps)"
        weight.copy_(solution[:columns].T.reshape(weight.shape).to(weight.dtype))
        if has_bias:
            assert isinstance(new.bias, Tensor)
            new.bias.copy_(solution[columns].to(new.bias.dtype))
    rows = stats.rows
    del stats
    return LayerFit(name, "least squares", before, after, rows, note)


# -- sparse: SparseGPT ------------------------------------------------------------------------
def obs_prune(
    w: Tensor,
    h: Tensor,
    *,
    mask: Tensor | None = None,
    zeros: int | None = None,
    nm: tuple[int, int] | None = None,
    factor: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """SparseGPT on one (out, columns) weight with Hessian ``h`` (columns, columns).

    Exactly one of: ``mask`` (bool, True = kept: held fixed), ``zeros`` (unstructured: that
    many weights zeroed, spread over the column blocks in proportion), ``nm`` (n of every m
    consecutive columns kept per row). Returns the updated weight (zero off the mask) and
    the mask. ``factor``: :func:`inverse_factor` of ``h`` when the caller has it.
    """
    work = torch.promote_types(w.dtype, torch.float32)  # float32, as SparseGPT itself
    dead, hinv = factor if factor is not None else inverse_factor(h, work)
    w = w.to(work).clone()
    columns = w.shape[1]
    w[:, dead] = 0.0
    pruned = torch.zeros_like(w, dtype=torch.bool) if mask is None else ~mask.clone()
    step = BLOCK if nm is None else nm[1] * math.ceil(BLOCK / nm[1])
    for i1 in range(0, columns, step):
        i2 = min(i1 + step, columns)
        # the block transposed, (block, out): a column per row, contiguous, so each column's
        # update of the columns after it is one rank-1 BLAS update (ger)
        w1, hinv1 = w[:, i1:i2].T.contiguous(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        d = torch.diagonal(hinv1)
        if zeros is not None:  # this block's share of the zeros, cumulative so the total is exact
            k = math.floor(zeros * i2 / columns + 1e-9) - math.floor(zeros * i1 / columns + 1e-9)
            saliency = (w1.T * w1.T / (d * d)[None]).flatten()  # in (out, block) order
            block = torch.zeros(saliency.numel(), dtype=torch.bool)
            block[torch.argsort(saliency, stable=True)[:k]] = True
            pruned[:, i1:i2] = block.reshape(w1.T.shape)
        pruned1 = pruned[:, i1:i2].T.contiguous()  # (block, out)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = w1[i : i + m].T ** 2 / d[i : i + m][None] ** 2  # (out, m)
                drop = torch.topk(saliency, m - n, dim=1, largest=False).indices
                group = torch.zeros_like(saliency, dtype=torch.bool)
                group.scatter_(1, drop, True)
                pruned1[i : i + m] = group.T
            col = w1[i]
            q = torch.where(pruned1[i], torch.zeros_like(col), col)
            q1[i] = q
            e = (col - q) / d[i]
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1)  # -= hinv1[i, i:] (x) e
            err1[i] = e
        w[:, i1:i2] = q1.T
        pruned[:, i1:i2] = pruned1.T
        w[:, i2:] -= err1.T @ hinv[i1:i2, i2:]
    return w, ~pruned


def inverse_factor(h: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor]:
    """The columns no input reaches (zero diagonal) and the upper Cholesky factor of the
    damped H^-1 (1 % of the mean diagonal; a dead column's diagonal set to 1), in ``work``."""
    h = h.to(work).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(PERCDAMP * float(torch.diagonal(h).mean()))  # no (columns, columns) eye
    return dead, _inverse_cholesky(h).to(work)


def _inverse_cholesky(h: Tensor) -> Tensor:
    """Upper Cholesky factor of H^-1; in float64 where H (damped) is not positive definite in
    float32 (SparseGPT's known failure on wide layers)."""
    for dtype in dict.fromkeys((h.dtype, torch.float64)):
        factor, info = torch.linalg.cholesky_ex(h.to(dtype))
        if int(info) == 0:
            full = torch.cholesky_inverse(factor)
            del factor  # (columns, columns) each: at most two alive at a time
            inverse, info = torch.linalg.cholesky_ex(full, upper=True)
            if int(info) == 0:
                return inverse
    raise torch.linalg.LinAlgError("the damped Hessian is not positive definite, even in float64")


def _relative_errors(w: Tensor, plain: Tensor, new: Tensor, h: Tensor) -> tuple[float, float]:
    """||(W - W') X||^2 / ||W X||^2 from H = X^T X for the plain mask (``plain``) and the
    update (``new``). Each output row's error is its own, so they are measured on at most
    ``ERROR_ROWS`` evenly spaced rows (all of a smaller layer): three (rows, columns) products
    with H instead of three (out, columns) ones, which on a wide layer cost more than
    SparseGPT itself."""
    out = w.shape[0]
    if out > ERROR_ROWS:
        index = torch.linspace(0, out - 1, ERROR_ROWS).round().long()
        w, plain, new = w[index], plain[index], new[index]
    w32 = w.float()
    stacked = torch.cat([w32, w32 - plain.float(), w32 - new.float()])  # (3 rows, columns)
    forms = (stacked * (stacked @ h.float())).sum(1, dtype=torch.float64)  # float32 products
    total, before, after = (float(part.sum()) for part in forms.chunk(3))
    return before / max(total, 1e-30), after / max(total, 1e-30)


def nm_columns(weight: Tensor) -> Tensor:
    """Column permutation from the channel-major (in, *k) order of ``weight.reshape(out, -1)``
    to the (*k, in) order of n:m groups (m consecutive input channels at one kernel position)."""
    channels, kernel = weight.shape[1], math.prod(weight.shape[2:])
    return torch.arange(channels * kernel).reshape(channels, kernel).T.reshape(-1)


def sparsegpt(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: Sequence[Any],
    *,
    adaptive: str | None,
    nm: tuple[int, int] | None = None,
    progress: bool = True,
    order: CallOrder | None = None,
    one_forward: bool = False,
    pruned: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], list[LayerFit]]:
    """SparseGPT on every layer in ``masks`` (bool, True = kept), in forward order, in place.

    ``adaptive``: "unstructured" or "n:m" chooses each layer's mask on the way (as many zeros
    as its given mask has; the n:m pattern ``nm``); None keeps the given masks. The weights of
    ``model`` are updated (zero off the masks) and the masks of the layers it pruned are
    returned. Each layer's Hessian is taken on its input in the model as pruned so far: in one
    forward of the stacked batches when they stack (each layer pruned in a pre-hook, before it
    runs), else one forward up to each layer per batch.

    ``masks`` is read for a layer only when that layer is pruned (a mapping that computes it
    then sees the layer's weights as loaded); ``order`` is the layers' call order when the
    caller has it; ``one_forward`` raises instead of running a forward per layer (a model whose
    weights stream in and out as the forward goes); ``pruned`` receives each layer's mask as
    soon as it is pruned (the returned dict).
    """
    found = order if order is not None else call_order(model, list(masks), batches[0])
    todo, fits = sparsegpt_layers(model, list(masks), found)
    same_everywhere(todo, "the layers SparseGPT prunes, in forward order")
    doing = set(todo)
    steps = iter(track(todo, "SparseGPT", progress))
    out: dict[str, Tensor] = pruned if pruned is not None else {}
    shared = SharedInput()  # q, k and v (gate and up) read one tensor: one Hessian

    def prune(name: str, module: nn.Module, parts: Iterable[Tensor]) -> None:
        next(steps, None)  # advance the progress bar
        kept, fit = _sparsegpt_layer(module, name, parts, masks[name], adaptive, nm, shared)
        out[name] = kept
        fits.append(fit)
        release_freed_memory()  # the Hessian's and its factor's pages (graphprune.memory)

    def visit(name: str, module: nn.Module, parts: list[Tensor]) -> None:
        if name in doing:  # per-batch parts: unfold memory as per batch
            prune(name, module, parts)

    missed = in_one_forward(model, found, batches, visit)
    rest = todo if missed is None else [n for n in todo if n in missed]
    if rest and one_forward:
        raise InputError(
            "SparseGPT here needs the calibration batches in one forward: give batches of one "
            "shape (they are stacked) whose activations fit 512 MiB per layer, or pass "
            "offload_dir= (a forward per batch, activations in files)"
            + ("" if missed is None else f"; the stacked forward did not reach {rest[:3]}")
        )
    same_everywhere(rest, "the layers SparseGPT prunes one batch at a time")
    for name in rest:
        prune(name, model.get_submodule(name), layer_inputs(model, name, batches))
    for _ in steps:  # drain the bar
        pass
    return out, in_forward_order(fits, found.order)


def sparsegpt_layers(
    model: nn.Module, names: list[str], found: CallOrder
) -> tuple[list[str], list[LayerFit]]:
    """The layers SparseGPT can prune, in forward order, and a fit saying why for each other
    (never called; called more than once; an input it cannot read as rows)."""
    fits = [
        LayerFit(n, "skipped", math.nan, math.nan, 0, "not called in the forward")
        for n in names
        if n not in found.calls
    ]
    wanted = set(names)
    for name in found.order:
        if name not in wanted:
            continue
        why = rows_unsupported(model.get_submodule(name)) or (
            f"called {found.calls[name]} times per forward" if found.calls[name] != 1 else ""
        )
        if why:
            fits.append(LayerFit(name, "skipped", math.nan, math.nan, 0, why))
    skipped = {f.module for f in fits}
    return [n for n in found.order if n in wanted and n not in skipped], fits


@dataclass
class Hessian:
    """H = X^T X of one layer input (in the working dtype), its rows, and its inverse factor
    once made."""

    h: Tensor
    rows: int
    factor: tuple[Tensor, Tensor] | None = None


def _hessian(module: nn.Module, inputs: Iterable[Tensor], work: torch.dtype) -> Hessian:
    columns = stored_weight(module)[0].numel()
    h = torch.zeros(columns, columns, dtype=torch.float64)
    rows = 0
    with torch.no_grad():
        for x in inputs:  # per batch: a process's share of the batches sums the same products
            a = input_rows(module, x).float()  # (rows, columns)
            h.add_(a.T @ a)  # one batch in float32 (SparseGPT's own), summed in double (cast
            # element by element: no float64 copy of the (columns, columns) product)
            rows += a.shape[0]
    all_sum(h)  # over every process's share of the batches
    hp = h.to(work)  # (columns, columns); the float64 sums go before anything else is made
    del h
    return Hessian(hp, sum_int(rows))


class SharedInput:
    """The Hessian of the last Linear input seen, and that input (held, so its memory cannot
    be reused by another tensor that would then look the same): a Linear called on the very
    same tensor, unchanged since (its version counter), has the same Hessian and factor."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.key: list[tuple[Any, ...]] = []
        self.found: Hessian | None = None

    @staticmethod
    def _key(inputs: list[Tensor]) -> list[tuple[Any, ...]]:
        return [(x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version) for x in inputs]

    def find(self, module: nn.Module, inputs: Iterable[Tensor]) -> Hessian | None:
        """The kept Hessian when ``module`` reads the kept input; else None (and the kept one
        is freed before the next is made)."""
        usable = (
            isinstance(module, nn.Linear) and isinstance(inputs, list) and bool(inputs)
            and not any(x.is_inference() for x in inputs)  # (no version counter to compare)
        )  # fmt: skip
        if usable and self.found is not None and self._key(list(inputs)) == self.key:
            return self.found
        self.inputs, self.key, self.found = [], [], None
        return None

    def keep(self, module: nn.Module, inputs: list[Tensor], found: Hessian) -> None:
        if isinstance(module, nn.Linear) and inputs and not any(x.is_inference() for x in inputs):
            self.inputs, self.key, self.found = inputs, self._key(inputs), found


def _sparsegpt_layer(
    module: nn.Module,
    name: str,
    inputs: Iterable[Tensor],
    mask: Tensor,
    adaptive: str | None,
    nm: tuple[int, int] | None,
    shared: SharedInput | None = None,
) -> tuple[Tensor, LayerFit]:
    """SparseGPT on one layer from its inputs: its weight updated in place; the mask that
    holds and the fit. ``shared`` holds the Hessian of the last Linear input seen, for the
    next Linear that reads the very same tensor (q, k, v; gate, up)."""
    found = shared.find(module, inputs) if shared is not None else None
    if found is None:
        found = layer_hessian(module, inputs)
        if shared is not None and isinstance(inputs, list):  # (a generator streams batches)
            shared.keep(module, inputs, found)
    return sparsegpt_from(module, name, found, mask, adaptive, nm)


def layer_hessian(module: nn.Module, inputs: Iterable[Tensor]) -> Hessian:
    """H = X^T X of ``module``'s inputs (summed over the batches and every process's share),
    in SparseGPT's working dtype: float32 (a float64 model keeps its own)."""
    work = torch.promote_types(stored_weight(module).dtype, torch.float32)
    return _hessian(module, inputs, work)


def sparsegpt_from(
    module: nn.Module,
    name: str,
    found: Hessian,
    mask: Tensor,
    adaptive: str | None,
    nm: tuple[int, int] | None,
) -> tuple[Tensor, LayerFit]:
    """SparseGPT on one layer from the Hessian of its input (:func:`layer_hessian`; its
    inverse factor made once and kept in ``found`` for the layers that share it)."""
    weight = stored_weight(module)
    work = torch.promote_types(weight.dtype, torch.float32)  # float32; a float64 model keeps its
    hp, rows = found.h, found.rows
    perm = nm_columns(weight) if adaptive == "n:m" and weight.dim() > 2 else None
    w = weight.detach().reshape(weight.shape[0], -1).to(work)
    given = mask.reshape(weight.shape[0], -1)
    factor = None
    if perm is not None:  # n:m groups of m consecutive input channels at one kernel position
        w, given, hp = w[:, perm], given[:, perm], hp[perm][:, perm]
    else:  # the inverse factor depends on H alone: made once for the layers sharing it
        factor = found.factor = found.factor or inverse_factor(hp, work)
    if adaptive == "unstructured":
        new, kept = obs_prune(w, hp, zeros=int((~given).sum()), factor=factor)
    elif adaptive == "n:m":
        assert nm is not None
        new, kept = obs_prune(w, hp, nm=nm, factor=factor)
    else:
        new, kept = obs_prune(w, hp, mask=given, factor=factor)
    before, after = _relative_errors(w, w * given, new, hp)
    note = "mask: OBS saliency" if adaptive else "mask: as given"
    if after > before:
        new, kept, after = w * given, given, before
        note = "the update would not lower the error: plain mask kept"
    if perm is not None:
        inverse = torch.argsort(perm)
        new, kept = new[:, inverse], kept[:, inverse]
    with torch.no_grad():
        weight.copy_(new.reshape(weight.shape).to(weight.dtype))
    return kept.reshape(weight.shape), LayerFit(name, "sparsegpt", before, after, rows, note)

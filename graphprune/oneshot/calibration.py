"""Calibration activations: what each Linear/Conv layer sees on the calibration batches.

A layer's input is read as the rows its weight matrix multiplies (``rows @ W.T`` is the layer):

* Linear: ``x (..., in)`` -> ``(N, in)``, N = every token of every batch;
* Conv1d/Conv2d with ``groups=1``: unfolded patches ``(N * L, in * kh * kw)`` in the column
  order of ``weight.reshape(out, -1)`` (channel-major), L = output positions.

:func:`input_norms` (Wanda's ||x_j|| per input channel; conv channels over batch and positions)
hooks every layer at once: O(in) memory per layer. Sequential passes (each layer sees the
activations of the model as changed so far) take one of two routes:

* :func:`in_one_forward` -- the calibration batches stacked into one batch and run once; each
  layer is visited in a pre-hook, *before* it runs, so a change to its weights is what the
  rest of the forward sees. One forward in all, when the batches stack and their activations
  fit (``STACK_BYTES``).
* :func:`in_lockstep` -- the same for two models at once (the original and the pruned model,
  for reconstruction targets): the original runs in a worker thread at most one layer ahead.
* :func:`layer_inputs` -- otherwise: the model runs up to one layer -- the forward stops
  there -- and that layer's input is yielded batch by batch (a forward per layer and batch).

Either way only one layer's statistics are alive at a time.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from graphprune.capture import normalize_inputs, own_thread, run_eval
from graphprune.errors import GraphPruneError, InputError

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
STACK_BYTES = 1 << 29  # the largest layer input of the stacked batches, at most (512 MiB)


class _Reached(BaseException):
    """Stops a forward at the hooked layer (BaseException: a model's ``except Exception``
    must not swallow it)."""


def rows_unsupported(module: nn.Module) -> str:
    """Why ``module``'s input cannot be read as weight-matrix rows ("" when it can)."""
    if not isinstance(module, LAYERS):
        return f"{type(module).__name__} is not a Linear/Conv1d/Conv2d layer"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1:
            return f"grouped conv (groups={module.groups}): each group sees other inputs"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return ""


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows ``module``'s weight matrix multiplies: ``(N, in)`` or ``(N * L, in * k)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(module, nn.Conv1d | nn.Conv2d), type(module)
    one_d = isinstance(module, nn.Conv1d)
    if one_d:  # (N, C, W) -> (N, C, 1, W): a 1 x k kernel
        x = x.unsqueeze(-2)
    kernel = (1, *module.kernel_size) if one_d else module.kernel_size
    stride = (1, *module.stride) if one_d else module.stride
    dilation = (1, *module.dilation) if one_d else module.dilation
    padding: Any = module.padding
    if isinstance(padding, str):  # "valid" -> none; "same" -> pad as torch does (extra right)
        if padding == "same":
            pads = []
            for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        padding = 0
    elif one_d:
        padding = (0, *padding)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N * L, C * kh * kw)


def channel_rows(t: Tensor, module: nn.Module) -> Tensor:
    """``(N, channels)`` rows of a tensor ``module`` reads or writes: channels are the last dim
    for a Linear, dim 1 for convs and norms."""
    if isinstance(module, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def input_norms(
    model: nn.Module, names: Iterable[str], batches: Sequence[Any]
) -> dict[str, Tensor]:
    """||x_j||_2 per input channel of each named layer over every calibration row (float64)."""
    sums: dict[str, Tensor] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            channels = channel_rows(args[0].detach().double(), module)  # (rows, in)
            total = (channels * channels).sum(0)
            sums[name] = sums[name] + total if name in sums else total

        return record

    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(own_thread(hook(name))))
    try:
        for batch in batches:
            run_eval(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def layer_inputs(model: nn.Module, name: str, batches: Sequence[Any]) -> Iterator[Tensor]:
    """The input of layer ``name`` for each batch; each forward stops at the layer."""
    module = model.get_submodule(name)
    seen: list[Tensor] = []

    def stop(_: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        raise _Reached

    for batch in batches:
        seen.clear()
        handle = module.register_forward_pre_hook(own_thread(stop))
        try:
            run_eval(model, batch)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not seen:
            raise InputError(f"layer {name!r} is not called in the forward")
        yield seen[0]


@dataclass
class CallOrder:
    """The named layers in the order one forward first calls them, how often each is called (a
    layer called twice -- a shared module -- cannot be refit for one input), and the largest
    input one of them reads (bytes, for this batch)."""

    order: list[str]
    calls: dict[str, int]
    largest_input: int


def call_order(model: nn.Module, names: Iterable[str], batch: Any) -> CallOrder:
    """One forward of ``batch`` with a counting pre-hook on every named layer."""
    wanted = set(names)
    found = CallOrder([], {}, 0)
    handles = []
    for name, module in model.named_modules():
        if name in wanted:

            def count(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                found.calls[name] = found.calls.get(name, 0) + 1
                if found.calls[name] == 1:
                    found.order.append(name)
                if args and isinstance(args[0], Tensor):
                    size = args[0].numel() * args[0].element_size()
                    found.largest_input = max(found.largest_input, size)

            handles.append(module.register_forward_pre_hook(own_thread(count)))
    try:
        run_eval(model, batch)
    finally:
        for h in handles:
            h.remove()
    return found


def stack_batches(batches: Sequence[Any]) -> Any | None:
    """The batches as one, every tensor concatenated along dim 0 (args as a tuple, keyword
    inputs as a dict), or None when they do not stack: different structures, non-tensor values
    that differ, or tensors whose dim 0 is not each batch's one batch size."""
    flat = [pytree.tree_flatten(normalize_inputs(b)) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        return None
    columns = list(zip(*(leaves for leaves, _ in flat), strict=True))
    for leaves, _ in flat:
        sizes = {t.shape[0] for t in leaves if isinstance(t, Tensor) and t.dim() > 0}
        if len(sizes) != 1 or any(isinstance(t, Tensor) and t.dim() == 0 for t in leaves):
            return None
    joined = []
    for column in columns:
        if not isinstance(column[0], Tensor):
            if any(v is not column[0] and v != column[0] for v in column):
                return None
            joined.append(column[0])
            continue
        if any(t.shape[1:] != column[0].shape[1:] or t.dtype != column[0].dtype for t in column):
            return None
        joined.append(torch.cat(column))
    args, kwargs = pytree.tree_unflatten(joined, spec)
    return tuple(args) if args or not kwargs else dict(kwargs)


Visit = Callable[[str, nn.Module, Tensor], None]


def in_one_forward(
    model: nn.Module, order: CallOrder, batches: Sequence[Any], visit: Visit
) -> bool:
    """Call ``visit(name, layer, x)`` for every layer of ``order`` called once per forward, in
    forward order, with its input ``x`` on all ``batches`` stacked (dim 0), before the layer
    runs: one forward. False, visiting nothing, when the batches do not stack or their stacked
    activations would exceed ``STACK_BYTES`` (then use :func:`layer_inputs`)."""
    if order.largest_input * len(batches) > STACK_BYTES:
        return False
    stacked = stack_batches(batches)
    if stacked is None:
        return False
    modules = dict(model.named_modules())
    handles = []
    for name in order.order:
        if order.calls[name] == 1:

            def pre(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                visit(name, module, args[0].detach())

            handles.append(modules[name].register_forward_pre_hook(own_thread(pre)))
    try:
        run_eval(model, stacked)
    finally:
        for h in handles:
            h.remove()
    return True


Reference = Callable[[str, nn.Module, Tensor], Any]
PairedVisit = Callable[[str, nn.Module, Tensor, Any], None]


def in_lockstep(
    original: nn.Module,
    pruned: nn.Module,
    order: CallOrder,
    batches: Sequence[Any],
    reference: Reference,
    visit: PairedVisit,
) -> bool:
    """:func:`in_one_forward` on two models at once: the stacked batches run through
    ``original`` (in a worker thread) and ``pruned`` (in this one) together. At each layer of
    ``order`` called once, ``reference(name, layer, x)`` runs in the original's forward and
    its result reaches ``visit(name, layer, x, result)`` in the pruned model's, before the
    pruned layer runs (the original is at most one layer ahead). False, visiting nothing, when
    the batches do not stack or their activations in both models would exceed ``STACK_BYTES``.
    """
    if 2 * order.largest_input * len(batches) > STACK_BYTES:
        return False
    stacked = stack_batches(batches)
    if stacked is None:
        return False
    names = [n for n in order.order if order.calls[n] == 1]
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()
    worker = threading.Thread(
        target=_run_reference,
        args=(original, names, stacked, reference, handoff, stop),
        name="graphprune-reference-forward",
        daemon=True,
    )
    modules = dict(pruned.named_modules())
    handles = []
    for name in names:

        def pre(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            reached, value = _receive(handoff, worker)
            if reached != name:
                raise GraphPruneError(
                    f"the original model reached layer {reached!r} where the pruned one reached "
                    f"{name!r}: their forwards call the layers in different orders"
                )
            visit(name, module, args[0].detach(), value)

        handles.append(modules[name].register_forward_pre_hook(own_thread(pre)))
    worker.start()
    try:
        run_eval(pruned, stacked)
        reached, _ = _receive(handoff, worker)
        if reached != _DONE:
            raise GraphPruneError(f"the pruned model's forward ended before layer {reached!r}")
    finally:
        stop.set()
        for h in handles:
            h.remove()
        worker.join()
    return True


_DONE, _ERROR = "\0done", "\0error"


def _run_reference(
    original: nn.Module,
    names: list[str],
    stacked: Any,
    reference: Reference,
    handoff: queue.Queue[tuple[str, Any]],
    stop: threading.Event,
) -> None:
    """The worker of :func:`in_lockstep`: the original's forward, handing over
    ``reference(...)`` at each named layer; its end or its error is the last item."""

    def send(item: tuple[str, Any]) -> None:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return
            except queue.Full:
                continue
        raise _Reached  # the pruned side has stopped: abandon this forward

    modules = dict(original.named_modules())
    handles = []
    inside: list[str] = []  # reference() may call the layer itself: no hook in there
    for name in names:

        def pre(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if inside:
                return
            inside.append(name)
            try:
                value = reference(name, module, args[0].detach())
            finally:
                inside.pop()
            send((name, value))

        handles.append(modules[name].register_forward_pre_hook(own_thread(pre)))
    try:
        run_eval(original, stacked)
        send((_DONE, None))
    except _Reached:
        pass
    except BaseException as exc:  # handed to the pruned side, which raises it
        with contextlib.suppress(_Reached):
            send((_ERROR, exc))
    finally:
        for h in handles:
            h.remove()


def _receive(handoff: queue.Queue[tuple[str, Any]], worker: threading.Thread) -> tuple[str, Any]:
    """The next item the reference forward hands over (its error raised here)."""
    while True:
        try:
            reached, value = handoff.get(timeout=0.05)
        except queue.Empty:
            if not worker.is_alive() and handoff.empty():
                raise GraphPruneError("the reference forward ended without a result") from None
            continue
        if reached == _ERROR:
            raise value
        return reached, value

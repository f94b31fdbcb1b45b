"""Calibration activations: what each Linear/Conv layer sees on the calibration batches.

A layer's input is read as the rows its weight matrix multiplies (``rows @ W.T`` is the layer):

* Linear: ``x (..., in)`` -> ``(N, in)``, N = every token of every batch;
* Conv1d/Conv2d with ``groups=1``: unfolded patches ``(N * L, in * kh * kw)`` in the column
  order of ``weight.reshape(out, -1)`` (channel-major), L = output positions.

:func:`input_norms` (Wanda's ||x_j|| per input channel; conv channels over batch and positions)
hooks every layer at once: O(in) memory per layer. Sequential passes (each layer sees the
activations of the model as changed so far) take one of these routes:

* :func:`in_one_forward` -- the calibration batches stacked into one batch and run once; each
  layer is visited in a pre-hook, *before* it runs, so a change to its weights is what the
  rest of the forward sees. One forward in all, when the batches stack and their activations
  fit (``STACK_BYTES``).
* :func:`in_lockstep` -- the same for two models at once (the original and the pruned model,
  for reconstruction targets): the original runs in a worker thread (on its own copy of the
  inputs), handing over one layer's targets at a time.
* :func:`layer_inputs` -- otherwise: the model runs up to one layer -- the forward stops
  there -- and that layer's input is yielded batch by batch (a forward per layer and batch).

Either way only one layer's statistics are alive at a time.
"""

from __future__ import annotations

import contextlib
import functools
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
from graphprune.oneshot.distributed import all_sum, same_everywhere

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


PreHook = Callable[[str, nn.Module, tuple[Any, ...]], None]


@contextlib.contextmanager
def pre_hooks(model: nn.Module, names: Iterable[str], hook: PreHook) -> Iterator[None]:
    """``hook(name, layer, args)`` before every named layer's forward, for the forwards of the
    thread that enters (another thread's forward passes untouched); removed on exit."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name in names:
            bound = functools.partial(hook, name)
            handles.append(modules[name].register_forward_pre_hook(own_thread(bound)))
        yield
    finally:
        for h in handles:
            h.remove()


def input_norms(
    model: nn.Module, names: Iterable[str], batches: Sequence[Any]
) -> dict[str, Tensor]:
    """||x_j||_2 per input channel of each named layer over every calibration row (float64)."""
    sums: dict[str, Tensor] = {}
    input_square_sums(model, list(names), batches, sums)
    same_everywhere(sorted(sums), "the layers the calibration forward reached")
    for name in sorted(sums):  # over every process's share (the same order on every rank)
        all_sum(sums[name])
    return {name: s.sqrt() for name, s in sums.items()}


def input_square_sums(
    model: nn.Module,
    names: list[str],
    batches: Sequence[Any],
    sums: dict[str, Tensor],
    *,
    order: CallOrder | None = None,
    one_forward: bool = False,
) -> None:
    """Add sum(x_j^2) per input channel of each named layer to ``sums`` (float64, as each
    layer's input passes): several batches in one forward of them stacked where they stack
    (each batch's part summed in batch order), else -- and for layers called more than once
    a forward -- one forward per batch. ``order``: the layers' call order (else found by a
    forward of the first batch); ``one_forward`` raises instead of forwards per batch (a
    model whose weights stream in and out as the forward goes)."""

    def add(name: str, module: nn.Module, parts: list[Tensor]) -> None:
        for part in parts:
            add_square_sum(sums, name, module, part)

    rest = names
    if len(batches) > 1 or order is not None:
        found = order if order is not None else call_order(model, names, batches[0])
        missed = in_one_forward(model, found, batches, add)
        if missed is not None:  # called once in batch 0's forward and reached: done
            done = {n for n in found.order if found.calls[n] == 1} - set(missed)
            rest = [n for n in names if n not in done and (not one_forward or n in found.calls)]
    if rest and one_forward:
        raise InputError(
            "the input norms here need the calibration batches in one forward: give batches "
            "of one shape (they are stacked) whose activations fit 512 MiB per layer (or pass "
            f"offload_dir=), and layers called once per forward (not so: {rest[:3]})"
        )
    with pre_hooks(model, rest, lambda n, m, args: add(n, m, [args[0].detach()])):
        for batch in batches if rest else []:
            run_eval(model, batch)


def add_square_sum(sums: dict[str, Tensor], name: str, module: nn.Module, x: Tensor) -> None:
    """Add sum(x_j^2) per input channel of one batch's input ``x`` of layer ``name``."""
    channels = channel_rows(x.double(), module)  # (rows, in)
    total = (channels * channels).sum(0)
    sums[name] = sums[name] + total if name in sums else total


def layer_inputs(model: nn.Module, name: str, batches: Sequence[Any]) -> Iterator[Tensor]:
    """The input of layer ``name`` for each batch; each forward stops at the layer."""
    seen: list[Tensor] = []

    def stop(_: str, __: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        raise _Reached

    for batch in batches:
        seen.clear()
        with pre_hooks(model, [name], stop), contextlib.suppress(_Reached):
            run_eval(model, batch)
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
    found = CallOrder([], {}, 0)

    def count(name: str, _: nn.Module, args: tuple[Any, ...]) -> None:
        found.calls[name] = found.calls.get(name, 0) + 1
        if found.calls[name] == 1:
            found.order.append(name)
        if args and isinstance(args[0], Tensor):
            size = args[0].numel() * args[0].element_size()
            found.largest_input = max(found.largest_input, size)

    with pre_hooks(model, set(names), count):
        run_eval(model, batch)
    return found


@dataclass
class Stacked:
    """Calibration batches as one batch, and each batch's size along dim 0."""

    inputs: Any
    sizes: list[int]

    def parts(self, x: Tensor) -> list[Tensor]:
        """A layer's stacked input back in per-batch parts: split by the batch sizes where its
        dim 0 is the stacked batch, else in as many equal chunks (rows stay aligned between
        two models either way)."""
        if x.dim() > 0 and x.shape[0] == sum(self.sizes):
            return list(x.split(self.sizes))
        return list(x.chunk(len(self.sizes)))


def stack_batches(batches: Sequence[Any]) -> Stacked | None:
    """The batches as one, every tensor concatenated along dim 0 (args as a tuple, keyword
    inputs as a dict), or None when they do not stack: different structures, non-tensor values
    that differ, or tensors whose dim 0 is not each batch's one batch size."""
    flat = [pytree.tree_flatten(normalize_inputs(b)) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        return None
    sizes = []
    for leaves, _ in flat:
        found = {t.shape[0] for t in leaves if isinstance(t, Tensor) and t.dim() > 0}
        if len(found) != 1 or any(isinstance(t, Tensor) and t.dim() == 0 for t in leaves):
            return None
        sizes.append(found.pop())
    joined = []
    for column in zip(*(leaves for leaves, _ in flat), strict=True):
        value = _joined(column)
        if value is _UNSTACKABLE:
            return None
        joined.append(value)
    args, kwargs = pytree.tree_unflatten(joined, spec)
    return Stacked(tuple(args) if args or not kwargs else dict(kwargs), sizes)


_UNSTACKABLE = object()


def _joined(column: tuple[Any, ...]) -> Any:
    """One input position over the batches: tensors concatenated, equal other values as one."""
    first = column[0]
    if all(isinstance(v, Tensor) for v in column):
        same = all(
            t.shape[1:] == first.shape[1:] and t.dtype == first.dtype and t.device == first.device
            for t in column
        )
        return (torch.cat(column) if len(column) > 1 else first) if same else _UNSTACKABLE
    if any(isinstance(v, Tensor) for v in column):
        return _UNSTACKABLE
    try:
        return first if all(v is first or bool(v == first) for v in column) else _UNSTACKABLE
    except Exception:  # a value whose == is not a plain bool (arrays): not stackable
        return _UNSTACKABLE


Visit = Callable[[str, nn.Module, list[Tensor]], None]


class _Visits:
    """Which layers a stacked forward visited: each once (a layer the stacked batch reaches
    again -- a forward that depends on the batch size -- is visited the first time only)."""

    def __init__(self, names: list[str]) -> None:
        self.pending = set(names)

    def first(self, name: str) -> bool:
        if name in self.pending:
            self.pending.discard(name)
            return True
        return False


def in_one_forward(
    model: nn.Module, order: CallOrder, batches: Sequence[Any], visit: Visit
) -> list[str] | None:
    """Call ``visit(name, layer, parts)`` for every layer of ``order`` called once per forward,
    in forward order, with its input on all ``batches`` stacked (as per-batch parts), before
    the layer runs: one forward, stopped once the last layer is visited (what follows -- a
    language model's logits, the largest activation of all -- is not needed). Returns the
    layers the forward did not reach (to be done per layer), or None, visiting nothing, when
    the batches do not stack or their stacked activations would exceed ``STACK_BYTES`` (then
    use :func:`layer_inputs`)."""
    names = [n for n in order.order if order.calls[n] == 1]
    stacked = _stackable(order, batches, 1)
    if stacked is None or not names:
        return None if stacked is None else []
    visits = _Visits(names)

    def pre(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if visits.first(name):
            visit(name, module, stacked.parts(args[0].detach()))
            if not visits.pending:
                raise _Reached  # every layer visited: the rest of the forward is not needed

    with pre_hooks(model, names, pre), contextlib.suppress(_Reached):
        run_eval(model, stacked.inputs)
    return [n for n in names if n in visits.pending]


def _stackable(order: CallOrder, batches: Sequence[Any], models: int) -> Stacked | None:
    """The stacked batches when ``models`` forwards of them fit ``STACK_BYTES`` (the largest
    layer input of ``batches[0]``, scaled to every batch's rows; an original model's layers
    are up to twice a pruned one's)."""
    stacked = stack_batches(batches)
    if stacked is None:
        return None
    scale = sum(stacked.sizes) / max(stacked.sizes[0], 1)
    if order.largest_input * scale * (1 if models == 1 else 3) > STACK_BYTES:
        return None
    return stacked


Reference = Callable[[str, nn.Module, list[Tensor]], Any]
PairedVisit = Callable[[str, nn.Module, list[Tensor], Any], None]
_DONE, _ERROR = "\0done", "\0error"  # the worker's last item: its forward ended / raised


def in_lockstep(
    original: nn.Module,
    pruned: nn.Module,
    order: CallOrder,
    batches: Sequence[Any],
    reference: Reference,
    visit: PairedVisit,
) -> bool:
    """:func:`in_one_forward` on two models at once: the stacked batches run through
    ``original`` (in a worker thread, on its own copy of the inputs) and ``pruned`` (in this
    one) together. At each layer of ``order`` called once, ``reference(name, layer, parts)``
    runs in the original's forward and its result reaches ``visit(name, layer, parts,
    result)`` in the pruned model's, before the pruned layer runs; the worker computes the
    next reference only once this one is taken (one in hand at a time). Both forwards stop
    once the last layer is handed over and visited (a language model's logits, the largest
    activation of all, are never computed). False, visiting
    nothing, when the batches do not stack or would not fit ``STACK_BYTES``; a forward that
    calls the layers differently in the two models, or visits one twice, raises.
    """
    names = [n for n in order.order if order.calls[n] == 1]
    stacked = _stackable(order, batches, 2)
    if stacked is None or not names:
        return stacked is not None
    own = Stacked(pytree.tree_map_only(Tensor, torch.clone, stacked.inputs), stacked.sizes)
    channel = _Channel()
    worker = threading.Thread(
        target=_run_reference, args=(original, names, own, reference, channel),
        name="graphprune-reference-forward", daemon=True,
    )  # fmt: skip
    visits = _Visits(names)

    def pre(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not visits.first(name):
            raise _Mismatch(f"the pruned model calls layer {name!r} twice")
        reached, value = channel.receive(worker)
        if reached != name:
            raise _Mismatch(f"the original model reached {_what(reached)} where the pruned "
                            f"one reached layer {name!r}")  # fmt: skip
        visit(name, module, stacked.parts(args[0].detach()), value)
        if not visits.pending:
            raise _Reached  # every layer visited: the rest of the forward is not needed

    try:
        with pre_hooks(pruned, names, pre):
            worker.start()
            with contextlib.suppress(_Reached):
                run_eval(pruned, stacked.inputs)
            reached, _ = channel.receive(worker)
        if reached != _DONE:
            raise _Mismatch(f"the pruned model's forward ended before layer {reached!r}")
    except _Mismatch as exc:
        raise GraphPruneError(
            f"reconstruction ran the original and the pruned model side by side and {exc}: "
            "their forwards call the layers in different orders"
        ) from None
    finally:
        channel.stop.set()
        if worker.ident is not None:
            worker.join()
    return True


class _Last(BaseException):
    """Stops the reference forward once its last layer is handed over (not when the pruned
    side stopped it: that is a :class:`_Reached`)."""


class _Mismatch(BaseException):
    """The two forwards diverged (BaseException: a model's ``except Exception`` must not
    swallow it)."""


def _what(reached: str) -> str:
    return "the end of its forward" if reached == _DONE else f"layer {reached!r}"


class _Channel:
    """The worker's hand-over: one item in flight; the worker waits until it is taken before
    it computes the next (so one reference is alive besides the one being used)."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        self.taken = threading.Semaphore(1)
        self.stop = threading.Event()

    def wait_turn(self) -> None:
        while not self.taken.acquire(timeout=0.05):
            if self.stop.is_set():
                raise _Reached  # the pruned side has stopped: abandon this forward

    def send(self, item: tuple[str, Any]) -> None:
        self.items.put(item)  # never blocks: the turn was taken first

    def receive(self, worker: threading.Thread) -> tuple[str, Any]:
        """The next item (the worker's error raised here); the worker may compute the next."""
        while True:
            try:
                reached, value = self.items.get(timeout=0.05)
            except queue.Empty:
                if not worker.is_alive() and self.items.empty():
                    raise GraphPruneError(
                        "the original model's reference forward ended without a result"
                    ) from None
                continue
            self.taken.release()
            if reached == _ERROR:
                raise value
            return reached, value


def _run_reference(
    original: nn.Module,
    names: list[str],
    stacked: Stacked,
    reference: Reference,
    channel: _Channel,
) -> None:
    """The worker of :func:`in_lockstep`: the original's forward, handing over
    ``reference(...)`` at each named layer; its end (the forward's, or the last layer's
    reference handed over: the forward stops there) or its error is the last item."""
    inside: list[str] = []  # reference() may call the layer itself: no hook in there
    sent: list[str] = []

    def pre(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if inside:
            return
        channel.wait_turn()
        inside.append(name)
        try:
            value = reference(name, module, stacked.parts(args[0].detach()))
        finally:
            inside.pop()
        channel.send((name, value))
        sent.append(name)
        if len(sent) == len(names):
            raise _Last  # the rest of the forward is not needed

    try:
        with pre_hooks(original, names, pre), contextlib.suppress(_Last):
            run_eval(original, stacked.inputs)
        channel.wait_turn()
        channel.send((_DONE, None))
    except _Reached:
        pass
    except BaseException as exc:  # handed to the pruned side, which raises it
        with contextlib.suppress(_Reached):
            channel.wait_turn()
            channel.send((_ERROR, exc))

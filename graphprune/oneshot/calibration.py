"""Calibration activations: what each Linear/Conv layer sees on the calibration batches.

A layer's input is read as the rows its weight matrix multiplies (``rows @ W.T`` is the layer):

* Linear: ``x (..., in)`` -> ``(N, in)``, N = every token of every batch;
* Conv1d/Conv2d with ``groups=1``: unfolded patches ``(N * L, in * kh * kw)`` in the column
  order of ``weight.reshape(out, -1)`` (channel-major), L = output positions.

:func:`input_norms` (Wanda's ||x_j|| per input channel; conv channels over batch and positions)
hooks every layer at once: O(in) memory per layer. :func:`layer_inputs` runs the model only up
to one layer -- the forward stops there -- and yields that layer's input batch by batch, so
the sequential passes of reconstruction hold one layer's statistics at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from graphprune.capture import own_thread, run_eval
from graphprune.errors import InputError

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


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


def call_order(
    model: nn.Module, names: Iterable[str], batch: Any
) -> tuple[list[str], dict[str, int]]:
    """The named layers in the order one forward first calls them, and how often each is
    called (a layer called twice -- a shared module -- cannot be refit for one input)."""
    wanted = set(names)
    order: list[str] = []
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name in wanted:

            def count(_: nn.Module, __: Any, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
                if calls[name] == 1:
                    order.append(name)

            handles.append(module.register_forward_pre_hook(own_thread(count)))
    try:
        run_eval(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls

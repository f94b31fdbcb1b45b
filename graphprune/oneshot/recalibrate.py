"""Re-estimate BatchNorm running statistics after pruning.

Removing channels upstream changes the distribution every kept BatchNorm sees, so the running
mean/var learned before pruning no longer match. Recalibration resets them and runs forward
passes (no gradients, every other module in eval mode) with a cumulative average (momentum
None), so the new statistics are the exact average over the given batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from graphprune.capture import normalize_inputs, serialized
from graphprune.errors import InputError

_NORMS = (nn.modules.batchnorm._BatchNorm,)


@serialized
def recalibrate_norms(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    inputs: Callable[[Any], Any] | None = None,
    max_batches: int | None = None,
) -> int:
    """Reset and re-estimate every BatchNorm's running stats from ``batches``, in place.

    A batch is the model's inputs (or a :class:`graphprune.LabelledBatch`); for a DataLoader of
    ``(x, y)`` pairs pass ``inputs=lambda b: b[0]``. Train/eval flags and momenta are restored.
    Returns the number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        raise InputError("the model has no BatchNorm with running statistics to recalibrate")
    training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                args, kwargs = normalize_inputs(inputs(batch) if inputs else batch)
                model(*args, **kwargs)
                used += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for module, mode in training.items():
            module.train(mode)
    if not used:
        raise InputError("recalibrate_norms got no batches")
    return used

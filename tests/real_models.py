"""Real architectures for tests and benchmarks: torchvision and timm, randomly initialised.

torchvision's native ops do not load against the CPU torch build used here, so ``import
torchvision`` (and timm, which imports it) fails on ``torchvision::nms``. Declaring the two
missing op schemas first is enough for every classification model (they never call them).
This lives in test/benchmark setup only: users have a working torchvision.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

_LIBRARY: list[Any] = []  # keeps the torch.library.Library alive (dropping it undefines the ops)


def declare_torchvision_ops() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas if torchvision's own library cannot."""
    if _LIBRARY or importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 (loaded: a working torchvision)
        return
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.append(library)

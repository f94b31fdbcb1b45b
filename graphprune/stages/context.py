"""What every stage of one compile reads: the user's request, and the stopwatch."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graphprune.capture import ExampleInputs
from graphprune.planning.importance import LossFn
from graphprune.planning.plan import Plan


class Stopwatch:
    """Seconds per named stage, accumulated from lap to lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._clock
        self._clock = now


@dataclass
class CompileJob:
    """One compile request. ``model`` is the user's (only read unless ``inplace``);
    ``batches`` the calibration data (the example inputs when none was given)."""

    model: nn.Module
    plan: Plan
    example_inputs: ExampleInputs
    batches: list[Any]
    loss_fn: LossFn | None
    inplace: bool
    strict: bool
    calibrated: bool  # the user passed calibration data
    watch: Stopwatch = field(default_factory=Stopwatch)

    @property
    def reconstructs(self) -> bool:
        """The plan, or its sparsity plan, asks for reconstruction."""
        sparsity = self.plan.sparsity
        return self.plan.reconstruct or (sparsity is not None and sparsity.reconstruct)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        plan: Plan,
        example_inputs: ExampleInputs,
        calibration: Iterable[Any] | None,
        loss_fn: LossFn | None,
        *,
        inplace: bool,
        strict: bool,
    ) -> CompileJob:
        batches = list(calibration) if calibration is not None else [example_inputs]
        return cls(
            model, plan, example_inputs, batches, loss_fn, inplace, strict, calibration is not None
        )

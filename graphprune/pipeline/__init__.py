"""The prune -> fine-tune pipeline: schedules, recalibration, rewind, regularization, plots."""

from __future__ import annotations

from graphprune.pipeline.pruner import Pruner, StepRecord
from graphprune.pipeline.regularize import GroupLasso
from graphprune.pipeline.rewind import rewind
from graphprune.pipeline.schedule import SCHEDULES, schedule_ratios
from graphprune.recalibrate import recalibrate_norms

__all__ = [
    "SCHEDULES",
    "GroupLasso",
    "Pruner",
    "StepRecord",
    "recalibrate_norms",
    "rewind",
    "schedule_ratios",
]

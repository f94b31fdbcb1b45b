"""The prune -> fine-tune pipeline: schedules, recalibration, rewind, regularization, plots."""

from __future__ import annotations

from graphprune.finetune.pruner import Pruner, StepRecord
from graphprune.finetune.regularize import GroupLasso
from graphprune.finetune.rewind import rewind
from graphprune.finetune.schedule import SCHEDULES, schedule_ratios
from graphprune.oneshot.recalibrate import recalibrate_norms

__all__ = [
    "SCHEDULES",
    "GroupLasso",
    "Pruner",
    "StepRecord",
    "recalibrate_norms",
    "rewind",
    "schedule_ratios",
]

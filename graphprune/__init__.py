"""graphprune: a graph-rewriting compiler for neural-network pruning."""

from __future__ import annotations

from graphprune.advise import Advice, advise
from graphprune.analysis import DependencyGraph, Group, Member, analyze
from graphprune.capture import LabelledBatch, capture
from graphprune.checkpoint import CheckpointReport, compile_checkpoint
from graphprune.compile import compile
from graphprune.errors import AnalysisError, CaptureError, GraphPruneError, InputError
from graphprune.finetune import GroupLasso, Pruner, StepRecord, recalibrate_norms, rewind
from graphprune.onnx import ExportError, ExportReport, VerificationError, export_onnx
from graphprune.passes.base import PruneError
from graphprune.planning.plan import Plan, PlanError
from graphprune.planning.resolve import Resolution
from graphprune.report import CompileReport, report
from graphprune.serialize import load, save
from graphprune.sparsity import masked_layers, sparsify, sparsify_report
from graphprune.stages.sparse import finalize

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "AnalysisError",
    "CaptureError",
    "CheckpointReport",
    "CompileReport",
    "DependencyGraph",
    "ExportError",
    "ExportReport",
    "GraphPruneError",
    "Group",
    "GroupLasso",
    "InputError",
    "LabelledBatch",
    "Member",
    "Plan",
    "PlanError",
    "PruneError",
    "Pruner",
    "Resolution",
    "StepRecord",
    "VerificationError",
    "__version__",
    "advise",
    "analyze",
    "capture",
    "compile",
    "compile_checkpoint",
    "export_onnx",
    "finalize",
    "load",
    "masked_layers",
    "recalibrate_norms",
    "report",
    "rewind",
    "save",
    "sparsify",
    "sparsify_report",
]

"""graphprune.compile: the driver. It reads as the stages it runs, top to bottom:

1. check the request (plan type, a model that runs on the example inputs);
2. measure the original (parameters, MACs);
3. structured stage (:mod:`graphprune.stages.structured`): capture, analysis, resolution,
   rewrite and verify with freeze and retry, one-shot refit;
4. sparse stage (:mod:`graphprune.stages.sparse`): masks, SparseGPT, parametrization;
5. config sync (:func:`graphprune.hf.sync_config`): a Hugging Face config follows the weights;
6. the report (for the user) and the record (for save/load/rewind), attached to the model.

Latency targets wrap all of it in measured rounds (:mod:`graphprune.stages.latency`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from torch import nn

from graphprune.analysis.macs import count_macs, count_params
from graphprune.analysis.observe import Observed, observe
from graphprune.capture import ExampleInputs, copy_model, no_cache, serialized
from graphprune.checks import check_calibration, check_model
from graphprune.errors import InputError
from graphprune.hf import ConfigSync, is_pretrained, round_trip, sync_config
from graphprune.oneshot.distributed import group_size, sharing
from graphprune.planning.importance import LossFn
from graphprune.planning.plan import Plan
from graphprune.record import CompileRecord, SparsityRecord, attach_record, record_of
from graphprune.report import CompileReport, attach_report, report
from graphprune.stages.context import CompileJob
from graphprune.stages.latency import compile_to_latency
from graphprune.stages.sparse import SparseResult, mask_weights
from graphprune.stages.structured import StructuredResult, prune_structure

__all__ = ["compile", "report"]


@dataclasses.dataclass
class Size:
    """Parameters and MACs of a model at the example inputs."""

    params: int
    macs: int


@serialized
def compile(
    model: nn.Module,
    plan: Plan,
    example_inputs: ExampleInputs,
    *,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    inplace: bool = False,
    strict: bool = False,
) -> nn.Module:
    """Prune ``model`` as ``plan`` says; return a module of the same class.

    Structured plans (channels, heads, layers) make the model smaller and dense. Sparse plans
    (unstructured, n:m, block; or ``plan.sparsity`` after a structured one) mask weights with
    ``torch.nn.utils.parametrize`` so fine-tuning keeps them zero; :func:`graphprune.finalize`
    bakes the masks, :func:`graphprune.sparsify` runs them on sparse kernels where faster.

    Works on a deep copy unless ``inplace=True``; the result keeps the input's train/eval
    mode and is an ordinary module (trainable, saveable with :func:`graphprune.save`).
    ``calibration`` batches (defaults to the example inputs) feed the data-driven criteria
    (taylor, fisher, wanda), reconstruction (``Plan(reconstruct=True)``) and the layer
    contributions; ``loss_fn(output)`` defaults to the mean
    squared output (``loss_fn(output, target)`` for :class:`graphprune.LabelledBatch` batches).
    :func:`graphprune.report` returns what was done.

    What cannot be pruned safely -- a size the forward computes in a way that cannot follow
    the kept channels, a rewrite that does not run -- is frozen with its reason (in the
    report) and the rest is pruned; compile raises only when nothing is left to prune.
    ``strict=True`` raises on the first such failure instead (for debugging).
    """
    if not isinstance(plan, Plan):
        raise InputError(f"plan must be a graphprune.Plan, not {type(plan).__name__}")
    with no_cache(model):  # the check's forward also gives the outputs, MACs and torch calls
        original: Observed = check_model(model, example_inputs, forward=observe)
    job = CompileJob.of(
        model, plan, example_inputs, calibration, loss_fn, inplace=inplace, strict=strict
    )
    if job.calibrated:
        check_calibration(model, job.batches)
    if plan.targets_latency:
        if group_size() > 1:  # each rank would time its own rounds and may choose another plan
            raise InputError(
                "latency targets are measured on this machine and cannot be spread over a "
                "torch.distributed group: compile on one rank, then share the model"
            )
        return _compile_to_latency(job)
    target = model if inplace else copy_model(model)
    # the unpruned config, to sync against (inplace rewrites the model's own)
    config = getattr(model, "config", None)
    original_config = round_trip(config) if inplace and is_pretrained(model) else config
    with no_cache(target), no_cache(model):  # HF models: a KV cache output cannot be captured
        before = Size(count_params(target), original.macs)
        plan.check_patterns(_names(target))
        # in a torch.distributed group: this rank's calibration share, statistics summed
        with sharing(job.batches, job.calibrated) as share:
            job = dataclasses.replace(job, batches=share)
            structure = prune_structure(job, target, original)
            target = structure.model
            sparse = mask_weights(job, target)
        # HF: the config (and module attributes no forward reads) follow the weights
        config = sync_config(target, original_config, example_inputs, plan.config)
        after = Size(count_params(target), _macs_after(structure, before, example_inputs))
    changes = _changes(structure, sparse, config)
    attach_report(target, _report(job, before, after, structure, sparse, config, changes))
    attach_record(target, _record(job, structure, sparse, changes))
    return target


def _macs_after(structure: StructuredResult, before: Size, example_inputs: ExampleInputs) -> int:
    """The pruned model's MACs: counted by the verification of its rewrite; the original's
    when nothing was rewritten (sparsity masks keep the dense MACs)."""
    if structure.macs is not None:
        return structure.macs
    if not structure.changes and not structure.dropped:
        return before.macs
    return count_macs(structure.model, example_inputs)


def _names(model: nn.Module) -> list[str]:
    """Every module and parameter name a plan's patterns may match."""
    return [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]


def _changes(
    structure: StructuredResult, sparse: SparseResult, config: ConfigSync | None
) -> list[str]:
    """Every rewrite, in the order the stages made them (the report's and the record's)."""
    synced = [f"config.{k} = {v}" for k, v in config.changes.items()] if config else []
    return structure.changes + sparse.changes + synced + (config.attributes if config else [])


def _report(
    job: CompileJob,
    before: Size,
    after: Size,
    structure: StructuredResult,
    sparse: SparseResult,
    config: ConfigSync | None,
    changes: list[str],
) -> CompileReport:
    notes = list(structure.notes)
    if job.reconstructs and not job.calibrated:
        notes.insert(
            0,
            "reconstruct=True without calibration= fits the layers to the example inputs "
            "only; pass batches of real data",
        )
    return CompileReport(
        plan=_plan_data(job.plan),
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        groups=structure.groups,
        units=[dataclasses.replace(u) for u in structure.resolution.units],
        frozen=structure.frozen,
        notes=notes,
        changes=changes,
        dropped=structure.dropped,
        seconds=job.watch.seconds,
        resolution=structure.resolution,
        sparsity=sparse.layers,
        config=config,
        reconstruction=structure.fits + sparse.fits,
    )


def _record(
    job: CompileJob, structure: StructuredResult, sparse: SparseResult, changes: list[str]
) -> CompileRecord:
    earlier = record_of(job.model)
    return CompileRecord(
        plan=_plan_data(job.plan),
        resolution=structure.resolution,
        group_sizes=structure.group_sizes,
        dropped=structure.dropped,
        changes=list(changes),
        sparsity=SparsityRecord(sparse.masked),
        # compiling an already-compiled model (iterative pruning) chains the records, so
        # load() and rewind() replay every step from the original architecture
        previous=earlier.chain() if earlier is not None else [],
    )


def _compile_to_latency(job: CompileJob) -> nn.Module:
    """``Plan(target_latency=...)``: per-unit widths from latency tables, measured and
    corrected (:mod:`graphprune.stages.latency`); the report keeps the user's plan and says
    what was predicted and measured."""
    batches = job.batches if job.calibrated else None

    def compile_copy(m: nn.Module, p: Plan, x: ExampleInputs, **kw: Any) -> nn.Module:
        return compile(m, p, x, strict=job.strict, **kw)

    pruned, concrete, outcome = compile_to_latency(
        job.model, job.plan, job.example_inputs, compile_copy, calibration=batches,
        loss_fn=job.loss_fn,
    )  # fmt: skip
    if job.inplace or concrete.reconstruct:
        # the rounds ran on copies, without the refit (it changes values, not shapes: the
        # measured latency holds): compile the chosen plan once more, refit, in place if asked
        pruned = compile(
            job.model, concrete, job.example_inputs, calibration=batches, loss_fn=job.loss_fn,
            inplace=job.inplace, strict=job.strict,
        )  # fmt: skip
    found = report(pruned)
    found.plan = _plan_data(job.plan)
    found.latency = outcome
    measured = outcome.rounds[outcome.chosen].macs_ratio
    if abs(found.macs_ratio - measured) > 1e-9:  # the final compile is not the timed one
        found.notes.append(
            f"the returned model's MACs ratio {found.macs_ratio:.4f} differs from the measured "
            f"round's {measured:.4f}: its latency was not measured (a nondeterministic plan?)"
        )
    return pruned


def _plan_data(plan: Plan) -> dict[str, Any]:
    if callable(plan.importance):
        data = dataclasses.asdict(dataclasses.replace(plan, importance="l2"))
        data["importance"] = getattr(plan.importance, "__name__", "callable")
        return data
    return plan.to_dict()

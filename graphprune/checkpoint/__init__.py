"""Checkpoint in, checkpoint out: prune a model larger than memory.

:func:`compile_checkpoint` builds the model on the meta device from ``src``'s config, captures
and analyses it from shapes alone, scores the groups from the weights read one tensor at a
time from the memory-mapped shards, resolves the plan, rewrites and verifies the *meta*
model (the verification's forward runs on fake tensors: shapes, shape constants, MACs), and
then writes each decoder layer's tensors sliced to ``dst`` -- one layer in memory at a time;
with ``reconstruct=True`` refit on the way (:mod:`graphprune.checkpoint.refit`) -- with the
config synced to the pruned shapes. The written checkpoint is checked by building
the model from the written config on the meta device (every tensor's shape), and, when it
fits in ``verify_bytes``, by loading it with ``from_pretrained`` and running it.

In a torch.distributed process group every rank calls it with the same arguments: each runs
the one-shot forward on its share of the calibration batches with the statistics summed over
the ranks (:mod:`graphprune.oneshot.distributed`), so every rank computes the same weights;
rank 0 alone writes ``dst`` (an error it meets is raised on every rank) and every rank checks it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.analysis.macs import count_params
from graphprune.analysis.observe import observe_fake
from graphprune.capture import ExampleInputs, no_cache, serialized, tensor_aliases
from graphprune.checkpoint.offload import stream_offloaded
from graphprune.checkpoint.refit import RefitOutcome, stream_refit
from graphprune.checkpoint.source import Checkpoint, CheckpointTensors
from graphprune.checkpoint.stream import BlockStream, StreamedNorms, stream_sparse
from graphprune.checkpoint.write import (
    ShardWriter,
    Slices,
    finish,
    publish,
    reject,
    staging_dir,
    write_shards,
)
from graphprune.compile import compile, report
from graphprune.errors import InputError
from graphprune.hf import ConfigSync, round_trip, sync_config
from graphprune.oneshot.calibration import CallOrder
from graphprune.oneshot.distributed import barrier, on_rank_zero, rank, sharing
from graphprune.oneshot.reconstruct import LayerFit
from graphprune.passes.slice_channels import slice_plan
from graphprune.planning.masks import WEIGHT_CRITERIA
from graphprune.planning.plan import Plan, PlanError
from graphprune.report import LayerSparsity
from graphprune.stages import freeze_retry
from graphprune.stages.context import Stopwatch
from graphprune.stages.structured import kept_outputs

VERIFY_BYTES = 4 << 30  # a written checkpoint up to this size is loaded and run as a check

__all__ = ["CheckpointReport", "compile_checkpoint"]


@dataclass
class CheckpointReport:
    """What :func:`compile_checkpoint` did."""

    src: str
    dst: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    kept: dict[str, tuple[int, int]]  # group name -> (kept, total), for the changed groups
    config: ConfigSync | None
    verified: str  # how the written checkpoint was checked
    seconds: dict[str, float] = field(default_factory=dict)
    sparsity: list[LayerSparsity] = field(default_factory=list)  # sparse plans: per layer
    fits: list[LayerFit] = field(default_factory=list)  # SparseGPT: each layer's error
    resumed: list[str] = field(default_factory=list)  # blocks an interrupted run had written

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)


@serialized
def compile_checkpoint(
    src: str | Path,
    plan: Plan,
    dst: str | Path,
    *,
    example_inputs: ExampleInputs | None = None,
    calibration: Iterable[Any] | None = None,
    model_class: type | None = None,
    verify_bytes: int = VERIFY_BYTES,
    progress: bool = True,
    offload_dir: str | Path | None = None,
) -> CheckpointReport:
    """Prune the checkpoint at ``src`` (as ``save_pretrained`` writes it) as ``plan`` says and
    write the pruned checkpoint to ``dst`` (a new directory; an interrupted run with the same
    source, plan and calibration resumes). Peak memory is about one decoder layer, not the
    model.

    Structured plans with a weight criterion (l1, l2, fpgm, random) or, on the
    ``calibration`` batches, wanda, either refit with ``reconstruct=True``; and local sparse
    plans (unstructured, n:m, block) with l1/l2 or, on the ``calibration`` batches, wanda or
    (with ``reconstruct=True``) SparseGPT -- the calibration runs block by block in one
    forward, and gives the same weights as :func:`graphprune.compile` in memory.
    ``example_inputs`` default to 16 token ids (batch 1) for a causal LM; ``model_class``
    defaults to the config's ``architectures[0]``. ``offload_dir``: sparse wanda and SparseGPT
    run a forward per calibration batch with each block's input kept in a file there, not in
    memory (:mod:`graphprune.checkpoint.offload`): as many batches as the disk holds. ``src``
    is never modified."""
    watch = Stopwatch()
    source, target = Checkpoint.open(src, model_class), Path(dst)
    _check_request(plan, source, target)
    data = _reads_calibration(plan)
    offload = _offload_dir(offload_dir, plan)
    if data and calibration is None:
        what = "reconstruct=True fits the kept weights to" if plan.reconstruct else (
            "importance='wanda' weighs each weight by its input's norm on"
        )  # fmt: skip
        raise PlanError(
            f"{what} calibration data: pass calibration= (batches of token ids from the "
            "model's domain; --calibration FILE on the CLI)"
        )
    model = source.build_meta()
    source.check_against(model)
    plan.check_patterns(name for name, _ in model.named_modules())
    inputs = example_inputs if example_inputs is not None else _token_ids(source.config)
    batches = list(calibration) if calibration is not None else [inputs]
    identity = _identity(source, plan, model_class, batches if data else [])
    identity["offloaded"] = offload is not None  # a forward per batch: other rounding
    watch.lap("open")
    progress = progress and rank() == 0
    if plan.is_sparse:
        staging = on_rank_zero(lambda: staging_dir(target, identity))
        found = _sparse(source, model, plan, inputs, batches, staging, progress, offload)
        found.dst = str(target)
        watch.lap("prune and write")
    else:
        found, staging = _structured(
            source, model, plan, inputs, batches, identity, target, watch, progress
        )
    found.src = str(src)
    try:
        found.verified, checked = _verify_written(
            staging, source, model, plan, inputs, batches, verify_bytes
        )
    except InputError as exc:
        barrier()  # every rank done reading the staging directory before it moves
        aside = on_rank_zero(lambda: reject(staging, target))
        raise InputError(f"{exc} (the output was set aside in {aside})") from None
    barrier()
    on_rank_zero(lambda: publish(staging, target))
    watch.lap("verify")
    found.config, found.seconds = checked or found.config, watch.seconds
    return found


def _sparse(
    source: Checkpoint,
    model: nn.Module,
    plan: Plan,
    inputs: ExampleInputs,
    batches: list[Any],
    staging: Path,
    progress: bool,
    offload_dir: Path | None,
) -> CheckpointReport:
    """The sparse stage streamed block by block (in a process group: on this rank's share of
    the calibration batches; rank 0 writes)."""
    params, macs = count_params(model), observe_fake(model, _on_meta(inputs)).macs
    writer = ShardWriter(source, staging, writes=rank() == 0)

    def offload(stream: BlockStream, batches: list[Any], order: CallOrder) -> None:
        assert offload_dir is not None
        stream_offloaded(stream, batches, order, offload_dir, progress)

    with no_cache(model), sharing(batches, _reads_calibration(plan)) as share:
        outcome = stream_sparse(
            source, model, plan, share, writer, progress, offload if offload_dir else None
        )
    on_rank_zero(lambda: finish(source, staging, writer.weight_map, source.config))
    return CheckpointReport(
        "", "", params, params, macs, macs, {}, None, "", sparsity=outcome.layers,
        fits=outcome.fits, resumed=outcome.resumed,
    )  # fmt: skip


def _structured(
    source: Checkpoint,
    model: nn.Module,
    plan: Plan,
    inputs: ExampleInputs,
    batches: list[Any],
    identity: dict[str, Any],
    target: Path,
    watch: Stopwatch,
    progress: bool,
) -> tuple[CheckpointReport, Path]:
    """The structured stage on the meta model; the shards written sliced."""
    params_before = count_params(model)
    original_config = round_trip(source.config)
    original = source.build_meta() if plan.reconstruct else model  # the refit's reference
    with no_cache(model):
        outcome, setup = _prune_meta(model, plan, inputs, batches, source, watch)
        config = sync_config(model, original_config, None)
    watch.lap("config sync")
    _check_expressible(config, model)
    _check_config_accepted(model)
    slices = _slices(source, setup, outcome.resolution.kept)
    _check_slices(slices, source, model)
    staging = on_rank_zero(lambda: staging_dir(target, identity))
    refit = RefitOutcome()
    if plan.reconstruct:  # every rank runs the forward; rank 0 writes
        writer = ShardWriter(source, staging, writes=rank() == 0)
        with no_cache(model), no_cache(original), sharing(batches, True) as share:
            refit = stream_refit(
                source, original, model, plan, slices,
                kept_outputs(setup, outcome.resolution), share, writer, progress,
            )  # fmt: skip
        on_rank_zero(lambda: finish(source, staging, writer.weight_map, model.config))
        watch.lap("refit and write")
    else:

        def write() -> None:  # rank 0 alone (in a process group)
            weight_map = write_shards(source, slices, staging, _printer(progress))
            finish(source, staging, weight_map, model.config)

        on_rank_zero(write)
        watch.lap("write")
    kept = {
        f"group {g.id} ({g.name})": (len(outcome.resolution.kept[g.id]), g.size)
        for g in setup.dg.groups if g.id in outcome.resolution.changed
    }  # fmt: skip
    return CheckpointReport(
        str(source.path), str(target), params_before, count_params(model), setup.macs_before,
        outcome.ctx.macs or setup.macs_before, kept, config, "", fits=refit.fits,
        resumed=refit.resumed,
    ), staging  # fmt: skip


def _reads_calibration(plan: Plan) -> bool:
    """The plan runs the calibration batches through the model (a refit, SparseGPT, wanda)."""
    return plan.reconstruct or plan.importance == "wanda"


def _offload_dir(folder: str | Path | None, plan: Plan) -> Path | None:
    """The folder for offloaded activations (made if missing), or None."""
    if folder is None:
        return None
    if not (plan.is_sparse and _reads_calibration(plan)):
        raise PlanError(
            "offload_dir= holds the activations of a sparse plan's calibration forwards (wanda, "
            "or SparseGPT with reconstruct=True); this plan runs none from a checkpoint: drop it"
        )
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"offload_dir {path} cannot be made: {exc}") from None
    if not path.is_dir():
        raise InputError(f"offload_dir {path} is not a directory")
    return path


def _check_request(plan: Plan, source: Checkpoint, target: Path) -> None:
    if not isinstance(plan, Plan):
        raise InputError(f"plan must be a graphprune.Plan, not {type(plan).__name__}")
    if plan.sparsity is not None or plan.granularity == "layers":
        raise PlanError(
            "compile_checkpoint prunes channels or heads, or masks weights; layer plans and "
            "structured plans with sparsity= are not supported from a checkpoint yet (load "
            "the model and use graphprune.compile)"
        )
    if plan.is_sparse:
        _check_sparse(plan)
    elif plan.targets_latency:
        raise PlanError(
            "compile_checkpoint prunes channels to a ratio: latency targets measure the "
            "model in memory (load it and use graphprune.compile)"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target} exists: choose a new directory (it is never overwritten)")
    inside = target.resolve()
    if inside == source.path.resolve() or source.path.resolve() in inside.parents:
        raise InputError(
            f"{target} is inside the source checkpoint {source.path}, which is never modified: "
            "choose a destination outside it"
        )


def _check_sparse(plan: Plan) -> None:
    """A streamed sparse plan decides each layer from that layer alone."""
    if plan.scope == "global":
        raise PlanError(
            "scope='global' ranks every weight of the model at once; from a checkpoint each "
            "layer is decided alone: use scope='local'"
        )
    if plan.importance not in (*WEIGHT_CRITERIA, "wanda"):
        raise PlanError(
            f"importance={plan.importance!r}: a sparse plan from a checkpoint scores weights "
            f"with {', '.join(WEIGHT_CRITERIA)} or wanda"
            + (
                ""
                if plan.reconstruct
                else " (or add reconstruct=True for SparseGPT, which "
                "chooses its masks from the calibration data)"
            )
        )


def _identity(
    source: Checkpoint, plan: Plan, model_class: type | None, batches: list[Any]
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the source's files (names,
    sizes, modification times), the plan, the calibration data (sha256 of its tensors; the
    blocks written were pruned on it), the class and graphprune's version."""
    files = {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in [*sorted(set(source.files.values())), source.path / "config.json"]
    }
    return {
        "src": str(source.path.resolve()), "files": files, "plan": plan.to_dict(),
        "calibration": _digest(batches),
        "class": model_class.__qualname__ if model_class else "", "version": _version(),
    }  # fmt: skip


def _digest(batches: list[Any]) -> str:
    h = hashlib.sha256()
    for leaf in torch.utils._pytree.tree_leaves(batches):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode() + data)
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()[:16]


def _version() -> str:
    try:
        return metadata.version("graphprune")
    except metadata.PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


def _check_expressible(config: ConfigSync | None, model: nn.Module) -> None:
    """A checkpoint is read through its config: a width the config cannot hold (per-layer
    widths from a global ranking, say) would make an output nothing can load."""
    if config is not None and config.fields:
        raise PlanError(
            f"the config of {type(model).__name__} cannot express the pruned model ("
            + "; ".join(f"{k}: {why}" for k, why in config.fields.items())
            + "): use a uniform plan (scope='local', no per-layer overrides), or load the "
            "model and use graphprune.compile and graphprune.save"
        )


def _check_config_accepted(model: nn.Module) -> None:
    """The synced config passes its own library's validation (``save_pretrained`` and
    ``from_pretrained`` run it): checked before any weight is read, not at the end."""
    validate = getattr(getattr(model, "config", None), "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as error:  # the library's own check, whatever it raises
        why = " ".join(str(error).split())  # (one line)
        raise PlanError(
            f"the pruned config of {type(model).__name__} is refused by its library ({why}), "
            "so no from_pretrained could load the output: choose a plan whose widths it "
            "accepts (for attention heads, a count that divides hidden_size, or prune FFN "
            "channels), or load the model and use graphprune.compile and graphprune.save"
        ) from error


def _check_slices(slices: Slices, source: Checkpoint, model: nn.Module) -> None:
    """Every stored tensor, sliced, has the pruned meta model's shape (before writing)."""
    state = model.state_dict()
    wrong = [
        f"{n}: {slices.shape(n, shape)} vs {tuple(state[n].shape)}"
        for n, shape in source.shapes.items()
        if n in state and slices.shape(n, shape) != tuple(state[n].shape)
    ]
    if wrong:
        raise InputError(f"internal error: the slices disagree with the pruned model: {wrong[:3]}")


def _token_ids(config: Any) -> tuple[torch.Tensor]:
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise InputError("the config has no vocab_size: pass example_inputs=")
    return (torch.zeros((1, 16), dtype=torch.long),)


def _on_meta(inputs: ExampleInputs) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, inputs
    )


def _prune_meta(
    model: nn.Module,
    plan: Plan,
    inputs: ExampleInputs,
    batches: list[Any],
    source: Checkpoint,
    watch: Stopwatch,
) -> tuple[freeze_retry.Outcome, freeze_retry.Setup]:
    """The structured stage on the meta model, scored from the checkpoint's tensors (wanda:
    and the input norms of a streamed forward of ``batches``)."""
    meta_inputs = _on_meta(inputs)
    observed = observe_fake(model, meta_inputs)
    wanda = plan.importance == "wanda"
    setup = freeze_retry.setup(
        model, meta_inputs, observed, watch.lap, keep=False, forward=observe_fake,
        weights=CheckpointTensors(source, tensor_aliases(model)),
        norms_from=StreamedNorms(source, model, plan) if wanda else None,
    )  # fmt: skip
    with sharing(batches, wanda) as share:  # torch.distributed: this rank's share, summed
        outcome = freeze_retry.prune_channels(
            model, plan, setup, share if wanda else [meta_inputs], None, watch.lap,
            inplace=True, strict=False,
        )  # fmt: skip
    return outcome, setup


def _slices(source: Checkpoint, setup: freeze_retry.Setup, kept: dict[int, list[int]]) -> Slices:
    """The kept positions of every stored tensor's pruned dims (:func:`slice_plan`, a tied
    tensor found under whichever of its names the checkpoint stores)."""
    plan = slice_plan(setup.dg, kept)
    aliases = setup.captured.aliases
    found = {}
    for name in source.shapes:
        known = next((a for a in [name, *aliases.get(name, [])] if a in plan), None)
        if known is not None:
            found[name] = plan[known]
    return Slices(found)


def _printer(progress: bool) -> Any:
    def show(shard: str) -> None:
        if progress:
            print(f"  wrote {shard}", flush=True)

    return show


def _verify_written(
    dst: Path,
    source: Checkpoint,
    pruned: nn.Module,
    plan: Plan,
    inputs: ExampleInputs,
    batches: list[Any],
    verify_bytes: int,
) -> tuple[str, ConfigSync | None]:
    """Build the model from the written config on meta: every written tensor must have the
    shape the pruned model has. When the source fits in ``verify_bytes``, also compile it in
    memory as :func:`graphprune.compile` does and compare: ``from_pretrained(dst)`` must give
    the outputs of that model (then its config check, made on real outputs, is returned)."""
    written = Checkpoint.open(dst, source.model_class)
    written.check_against(written.build_meta())
    want = {k: tuple(v.shape) for k, v in pruned.state_dict().items() if k in written.shapes}
    if want != written.shapes:
        raise InputError(f"the written checkpoint {dst} does not hold the pruned shapes")
    itemsize = torch.empty(0, dtype=source.dtype).element_size()
    size = sum(int(np.prod(s)) for s in source.shapes.values()) * itemsize
    if size > verify_bytes:
        return "shapes: the model built from the written config has the pruned shapes", None
    model_class: Any = source.model_class
    original = model_class.from_pretrained(str(source.path), dtype=source.dtype).eval()
    reference = compile(original, plan, inputs, calibration=batches, inplace=True)
    loaded = model_class.from_pretrained(str(dst), dtype=source.dtype).eval()
    ids = torch.randint(0, int(source.config.vocab_size), (2, 12), generator=_seeded())
    expected, found = _logits(reference, ids), _logits(loaded, ids)
    gap = float((expected.double() - found.double()).abs().max())
    if gap > 1e-5:
        raise InputError(
            f"the written checkpoint {dst} computes other outputs than the same plan compiled "
            f"in memory (largest difference {gap:.3g})"
        )
    return (
        f"outputs: from_pretrained(dst) equals graphprune.compile in memory (max |diff| {gap:.2g})",
        report(reference).config,
    )


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), no_cache(model):
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]

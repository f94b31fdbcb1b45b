"""Save and load pruned models without pickling code.

The file holds the resolved plan (kept channel indices per group, dropped blocks, masked layers)
as JSON and the ``state_dict`` (with the masks, until finalized) as plain tensors, in one
``torch.save`` archive read back with ``weights_only=True``. Loading re-applies the same passes
to a freshly built, unpruned model, checks that its analysis matches the one that was pruned,
then loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.analysis import analyze_captured
from graphprune.capture import ExampleInputs, capture
from graphprune.errors import InputError
from graphprune.hf import no_cache, sync_config
from graphprune.io import write_atomic
from graphprune.kernels.sparse_modules import SPARSE_MODULES
from graphprune.passes.base import PassContext, PassManager
from graphprune.passes.drop_layers import DropLayers
from graphprune.passes.slice_channels import SliceChannels
from graphprune.passes.verify import make_verifier, output_shapes
from graphprune.report import RECORD
from graphprune.resolve import Resolution
from graphprune.sparsity.parametrize import register_placeholder_masks
from graphprune.structured import attributes_for


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s pruning record and weights to ``path`` (atomically)."""
    record = getattr(model, RECORD, None)
    if record is None:
        raise InputError(
            "this model was not produced by graphprune.compile; "
            "use torch.save(model.state_dict(), path) for an unpruned model"
        )
    sparse = [n for n, m in model.named_modules() if isinstance(m, SPARSE_MODULES)]
    if sparse:
        raise InputError(
            f"{sparse[0]} runs on a sparse kernel: save the model before graphprune.sparsify "
            "(sparse kernels are a deployment step; sparsify again after load, with "
            "force=sparsify_report(model).converted to skip re-measuring)"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"graphprune": json.dumps(record), "state_dict": state}
    write_atomic(Path(path), lambda tmp: torch.save(payload, tmp))


def load(model: nn.Module, path: str | Path, example_inputs: ExampleInputs) -> nn.Module:
    """Prune the freshly built, unpruned ``model`` as recorded in ``path`` and load its weights.

    ``model`` is rewritten in place (it is yours, built for this) and returned.
    """
    record, state = read_file(Path(path))
    apply_record(model, record, example_inputs)
    model.load_state_dict(state, strict=True)
    return model


SUPPORTED_FORMATS = (1, 2)  # 1: before pruning units (groups only); 2: with per-unit outcomes


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The record and state_dict of a file written by :func:`save`; a clear InputError for a
    missing, corrupt or foreign file, or a record from a newer graphprune."""
    if not path.is_file():
        raise InputError(f"{path}: no such file (write it with graphprune.save)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, zip/EOF errors, weights_only refusals
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path} is not a readable graphprune file ({type(exc).__name__}: {reason[:200]}); "
            "it may be truncated or written by something else: save it again with "
            "graphprune.save"
        ) from None
    if not isinstance(payload, dict) or "graphprune" not in payload or "state_dict" not in payload:
        raise InputError(
            f"{path} is not a file written by graphprune.save (a plain state_dict or model "
            "checkpoint loads with torch.load / model.load_state_dict)"
        )
    try:
        record = json.loads(payload["graphprune"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: its pruning record is not valid JSON ({exc})") from None
    check_format(record, str(path))
    return record, payload["state_dict"]


def check_format(record: dict[str, Any], where: str) -> None:
    """Refuse records this version cannot replay, saying which version wrote them."""
    for step in [*record.get("previous", []), record]:
        version = step.get("format", 1)
        if version not in SUPPORTED_FORMATS:
            raise InputError(
                f"{where}: pruning record format {version} is newer than this graphprune "
                f"reads ({', '.join(map(str, SUPPORTED_FORMATS))}); upgrade graphprune"
            )


def apply_record(model: nn.Module, record: dict[str, Any], example_inputs: ExampleInputs) -> None:
    """Replay the passes of a compile record (and of the compiles before it) on an unpruned
    model."""
    with no_cache(model):
        for earlier in record.get("previous", []):
            _apply_one(model, earlier, example_inputs)
        _apply_one(model, record, example_inputs)
    sync_config(model, None, example_inputs)  # HF: the config, as compile left it
    object.__setattr__(model, RECORD, copy.deepcopy(record))


def _apply_one(model: nn.Module, record: dict[str, Any], example_inputs: ExampleInputs) -> None:
    reference = output_shapes(model, example_inputs)
    if record["dropped"]:
        ctx = PassContext(model, example_inputs, None, None)
        DropLayers(list(record["dropped"]))(ctx)
    resolution = Resolution.from_dict(record["resolution"])
    if resolution.changed:
        captured = capture(model, example_inputs)
        dg = analyze_captured(captured)
        sizes = [g.size for g in dg.groups]
        if sizes != record["group_sizes"]:
            raise InputError(
                "the model given to load() is not the architecture that was pruned "
                f"(its channel groups {sizes[:8]}… differ from the saved "
                f"{record['group_sizes'][:8]}…); build it with the same factory"
            )
        attributes = resolution.attributes
        if record.get("format", 1) < 2:  # saved before attribute values were recorded
            attributes = attributes_for(model, example_inputs, captured, dg, resolution.kept)
        ctx = PassContext(model, example_inputs, captured, dg, resolution.kept, attributes)
        PassManager([SliceChannels()], verify=make_verifier(reference))(ctx)
    sparsity = record.get("sparsity") or {}
    if sparsity.get("layers") and not sparsity.get("baked"):
        register_placeholder_masks(model, list(sparsity["layers"]))  # filled by the state_dict

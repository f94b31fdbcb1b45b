"""Save and load pruned models without pickling code.

The file holds the resolved plan (kept channel indices per group, dropped blocks, masked layers)
as JSON and the ``state_dict`` (with the masks, until finalized) as plain tensors, in one
``torch.save`` archive read back with ``weights_only=True``, followed by a SHA-256 footer of
the archive: a file changed, truncated or extended after it was written is refused. Loading
re-applies the same passes to a freshly built, unpruned model, checks that its analysis matches
the one that was pruned, then loads the weights strictly.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path

import torch
from torch import nn

from graphprune.analysis import analyze_captured
from graphprune.analysis.provenance import attributes_read, trace_shapes
from graphprune.capture import ExampleInputs, capture, no_cache, serialized
from graphprune.errors import InputError
from graphprune.hf import is_pretrained, round_trip, sync_config
from graphprune.io import write_atomic
from graphprune.kernels.sparse_modules import SPARSE_MODULES
from graphprune.passes import structured_rewrite
from graphprune.passes.base import PassContext, PassManager
from graphprune.passes.drop_layers import DropLayers
from graphprune.passes.verify import make_verifier, output_shapes
from graphprune.record import CompileRecord, attach_record, record_of
from graphprune.sparsity.parametrize import register_placeholder_masks
from graphprune.stages.freeze_retry import attributes_for

FOOTER_MAGIC = b"GPSHA256"  # then the SHA-256 of everything before it
ZIP_END = b"PK\x05\x06"  # a zip archive's end-of-central-directory record (22 bytes + comment)


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s pruning record and weights to ``path`` (atomically)."""
    record = record_of(model)
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
    payload = {"graphprune": json.dumps(record.to_json()), "state_dict": state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    footer = FOOTER_MAGIC + hashlib.sha256(body).digest()

    def write(tmp: Path) -> None:
        tmp.write_bytes(body + footer)

    write_atomic(Path(path), write)


@serialized
def load(model: nn.Module, path: str | Path, example_inputs: ExampleInputs) -> nn.Module:
    """Prune the freshly built, unpruned ``model`` as recorded in ``path`` and load its weights.

    ``model`` is rewritten in place (it is yours, built for this) and returned.
    """
    record, state = read_file(Path(path))
    apply_record(model, record, example_inputs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys, size mismatches
        detail = " ".join(str(exc).split())[:400]
        raise InputError(
            f"{path}: its weights do not fit the model its record rebuilds ({detail}); "
            "build the model with the factory that was pruned, or save it again"
        ) from None
    return model


def read_file(path: Path) -> tuple[CompileRecord, dict[str, torch.Tensor]]:
    """The record and state_dict of a file written by :func:`save`; a clear InputError for a
    missing, corrupt or foreign file, or a record from a newer graphprune."""
    if not path.is_file():
        raise InputError(f"{path}: no such file (write it with graphprune.save)")
    body = _checked_body(path)
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
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
        data = json.loads(payload["graphprune"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: its pruning record is not valid JSON ({exc})") from None
    return CompileRecord.from_json(data, str(path)), payload["state_dict"]


def _checked_body(path: Path) -> bytes:
    """The archive inside ``path``, checked: with a footer, against its SHA-256; without one
    (files of earlier releases), it must end where its zip archive ends, so a damaged footer,
    a cut or an extension is refused either way."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    size = len(FOOTER_MAGIC) + hashlib.sha256().digest_size
    body, footer = data[:-size], data[-size:]
    if footer.startswith(FOOTER_MAGIC):
        if hashlib.sha256(body).digest() != footer[len(FOOTER_MAGIC) :]:
            raise InputError(_damaged(path, "its content does not match its saved checksum"))
        return body
    if ZIP_END in data and not _ends_as_zip(data):  # (no zip at all: torch.load says so)
        raise InputError(_damaged(path, "bytes follow the end of its archive"))
    return data


def _ends_as_zip(data: bytes) -> bool:
    """Some end-of-central-directory record ends exactly where ``data`` ends."""
    end = data.rfind(ZIP_END)
    while end >= 0:
        if end + 22 <= len(data):
            comment = int.from_bytes(data[end + 20 : end + 22], "little")
            if end + 22 + comment == len(data):
                return True
        end = data.rfind(ZIP_END, 0, end)
    return False


def _damaged(path: Path, why: str) -> str:
    return (
        f"{path}: {why} (the file was changed, truncated or extended after graphprune.save "
        "wrote it); save the model again"
    )


def apply_record(model: nn.Module, record: CompileRecord, example_inputs: ExampleInputs) -> None:
    """Replay the passes of a compile record (and of the compiles before it) on an unpruned
    model."""
    # HF: the config synced as compile did, against the unpruned one (the replay sets counts
    # a forward reads in the config itself, so the config after it is no base to measure on)
    original = round_trip(model.config) if is_pretrained(model) else None
    with no_cache(model):
        for step in record.steps():
            _apply_one(model, step, example_inputs)
    sync_config(model, original, example_inputs)
    attach_record(model, copy.deepcopy(record))


def _apply_one(model: nn.Module, record: CompileRecord, example_inputs: ExampleInputs) -> None:
    reference = output_shapes(model, example_inputs)
    if record.dropped:
        ctx = PassContext(model, example_inputs, None, None)
        DropLayers(list(record.dropped))(ctx)
    resolution = record.resolution
    if resolution.changed:
        captured = capture(model, example_inputs)
        dg = analyze_captured(captured)
        sizes = [g.size for g in dg.groups]
        if sizes != record.group_sizes:
            raise InputError(
                "the model given to load() is not the architecture that was pruned "
                f"(its channel groups {sizes[:8]}… differ from the saved "
                f"{record.group_sizes[:8]}…); build it with the same factory"
            )
        attributes = resolution.attributes
        if not record.stores_attributes:  # format 1: derive them as that release did
            attributes = attributes_for(model, example_inputs, captured, dg, resolution.kept)
        # what the forward reads: an unread head count follows the heads as in compile
        read = attributes_read(trace_shapes(model, example_inputs))
        ctx = PassContext(
            model, example_inputs, captured, dg, resolution.kept, attributes, read_attributes=read
        )
        PassManager(structured_rewrite(), verify=make_verifier(reference))(ctx)
    if record.sparsity.layers and not record.sparsity.baked:  # filled by the state_dict:
        register_placeholder_masks(model, list(record.sparsity.layers))

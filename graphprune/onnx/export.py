"""Export to ONNX with torch's dynamo exporter: one self-contained file, written atomically."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from graphprune.capture import ExampleInputs, normalize_inputs, run_eval, serialized
from graphprune.errors import GraphPruneError
from graphprune.kernels.sparse_modules import SPARSE_MODULES
from graphprune.onnx.sparse_storage import PackingReport, pack_sparse_weights
from graphprune.sparsity.parametrize import dense_copy, is_masked

PROTOBUF_LIMIT = 2 * 1024**3  # a single .onnx file cannot exceed 2 GB
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its messages


class ExportError(GraphPruneError):
    """torch.onnx.export or the ONNX checker failed; no file was written."""


@dataclass
class ExportedModel:
    path: Path
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    bytes: int
    opset: int
    external_data: bool
    packing: PackingReport | None = None  # sparse weights stored compactly (sparse_storage=)
    note: str = ""  # e.g. why the batch dimension is not dynamic after all


def input_names(model: nn.Module, example_inputs: ExampleInputs) -> list[str]:
    """The forward's parameter names for positional inputs, the keys for keyword inputs."""
    args, kwargs = normalize_inputs(example_inputs)
    if kwargs:
        return [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    names = [p.name for p in params[: len(args)]]
    names += [f"input_{i}" for i in range(len(names), len(args))]
    return [n for n, a in zip(names, args, strict=True) if isinstance(a, torch.Tensor)]


def output_names(model: nn.Module, example_inputs: ExampleInputs) -> list[str]:
    out = run_eval(model, example_inputs)  # eval: a BatchNorm in train mode would update stats
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict):
        return [str(k) for k, v in out.items() if isinstance(v, torch.Tensor)]
    return [f"output_{i}" for i, _ in enumerate(out)]


def _batch_of_two(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(2, *value.shape[1:]).clone()
    return value


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter prints progress and warns about optional torchvision ops: silence both."""
    # the root logger too: onnxruntime.quantization warns through it about per-channel axes
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@serialized
def export(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    external_data: bool | None = None,
    sparse_storage: str | None = None,
) -> ExportedModel:
    """Export ``model`` (in eval mode; its mode is restored) to ``path`` atomically.

    ``external_data``: None = only when the model exceeds the 2 GB protobuf limit, True/False to
    force. ``sparse_storage``: "bitmask" or "auto" stores mostly-zero weights compactly (see
    :mod:`graphprune.onnx.sparse_storage`). Masked or sparse-kernel models are exported as
    their dense equivalent (masks baked in). A failed export or check raises
    :class:`ExportError` and leaves no file behind.
    """
    path = Path(path)
    if is_masked(model) or any(isinstance(m, SPARSE_MODULES) for m in model.modules()):
        model = dense_copy(model)  # the exporter would trace w * mask
    args, kwargs = normalize_inputs(example_inputs)
    names_in = input_names(model, example_inputs)
    names_out = output_names(model, example_inputs)
    training = {m: m.training for m in model.modules()}
    model.eval()
    big = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > PROTOBUF_LIMIT
    use_external = big if external_data is None else external_data
    if sparse_storage is not None and use_external:
        raise ExportError(
            "sparse_storage needs a single-file model; this one exceeds 2 GB dense "
            "(pass external_data=False if it fits once packed)"
        )
    packing = None
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = workdir / path.name
        signature = _Signature(args, kwargs, names_in, names_out, opset, use_external)
        dynamic_batch, note = _first_exporter_that_works(model, signature, dynamic_batch, tmp)
        if sparse_storage is not None:
            proto = onnx.load(str(tmp))
            packing = pack_sparse_weights(proto, storage=sparse_storage)
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        checked = onnx.load(str(tmp), load_external_data=False)
        _check_opset(checked, opset)
        for produced in workdir.iterdir():  # the model, and its .data file if any
            os.replace(produced, path.parent / produced.name)
    except GraphPruneError:
        raise
    except Exception as exc:
        raise _export_error(model, exc) from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for m, t in training.items():
            m.train(t)
    opset_found = _opset(checked)
    size = path.stat().st_size + sum(
        f.stat().st_size for f in path.parent.glob(path.name + "*.data")
    )
    return ExportedModel(
        path, names_in, names_out, dynamic_batch, size, opset_found, use_external, packing, note
    )


Exporter = Callable[..., None]


@dataclass
class _Signature:
    """What every exporter is given besides the model, the batch mode and the file."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    names_in: list[str]
    names_out: list[str]
    opset: int | None
    external_data: bool


def _first_exporter_that_works(
    model: nn.Module, signature: _Signature, dynamic_batch: bool, tmp: Path
) -> tuple[bool, str]:
    """Try the exporters in order until one writes ``tmp``; the batch mode it exported with
    and a note naming those that failed (empty when the first worked)."""
    attempts = _exporters(dynamic_batch, bool(signature.kwargs))
    note = ""
    for k, (label, dynamic, exporter) in enumerate(attempts):
        try:
            exporter(
                model, signature.args, signature.kwargs, dynamic, signature.opset,
                signature.names_in, signature.names_out, tmp, signature.external_data,
            )  # fmt: skip
        except Exception as exc:
            if k == len(attempts) - 1:
                raise
            for produced in tmp.parent.iterdir():
                produced.unlink()
            note += f"{label} failed ({_first_line(exc)[:300]}); "
            continue
        return (dynamic, note + f"exported with {label}") if note else (dynamic_batch, "")
    raise AssertionError("unreachable: the last exporter raises")


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _check_opset(model: onnx.ModelProto, asked: int | None) -> None:
    """An opset the exporter could not produce is an error, never a silent substitute."""
    found = _opset(model)
    if asked is not None and found != asked:
        raise ExportError(
            f"opset={asked} was asked but torch.onnx wrote opset {found} (it cannot produce "
            f"{asked} for this model); pass opset=None for the exporter's choice"
        )


def _export_error(model: nn.Module, exc: Exception) -> ExportError:
    reason = _first_line(exc)
    hint = (
        " (an op without an ONNX conversion is the usual cause: see the chained exception)"
        if "Conversion" in type(exc).__name__
        else ""
    )
    return ExportError(
        f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: {reason}{hint}"
    )


def _exporters(dynamic_batch: bool, keyword: bool) -> list[tuple[str, bool, Exporter]]:
    """What to try, in order: torch's dynamo exporter; where it fails (an op it cannot
    convert, e.g. 5-D attention in timm Hiera), the TorchScript exporter (positional inputs
    only); then the dynamo exporter for the example's batch size only."""
    first = "the dynamo exporter" + (" (dynamic batch)" if dynamic_batch else "")
    attempts: list[tuple[str, bool, Exporter]] = [(first, dynamic_batch, _to_onnx)]
    if not keyword:
        attempts.append(("the TorchScript exporter", dynamic_batch, _to_onnx_torchscript))
    if dynamic_batch:
        attempts.append(("the dynamo exporter (fixed batch)", False, _to_onnx))
    return attempts


def _to_onnx_torchscript(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    opset: int | None,
    names_in: list[str],
    names_out: list[str],
    target: Path,
    external: bool,
) -> None:
    """torch's TorchScript exporter (positional inputs), batch axis dynamic if asked."""
    axes = {name: {0: "batch"} for name in [*names_in, *names_out]} if dynamic_batch else None
    with quiet():
        torch.onnx.export(
            model,
            args,
            str(target),
            dynamo=False,
            opset_version=opset or 18,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
        )
    if external:  # the TorchScript exporter writes one file; move weights out if asked
        proto = onnx.load(str(target))
        onnx.save(proto, str(target), save_as_external_data=True, location=target.name + ".data")


def _first_line(exc: BaseException) -> str:
    return _ANSI.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else ""


def _to_onnx(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    opset: int | None,
    names_in: list[str],
    names_out: list[str],
    target: Path,
    external: bool,
) -> None:
    """torch's dynamo exporter, optimised, saved to ``target`` (with external data if it
    does not fit in one protobuf)."""
    dynamic: Any = None
    if dynamic_batch:  # torch.export specialises a dim of size 1: trace with a batch of 2
        args = tuple(_batch_of_two(a) for a in args)
        kwargs = {k: _batch_of_two(v) for k, v in kwargs.items()}
        batch = torch.export.Dim("batch", min=1, max=4096)
        if kwargs:
            dynamic = {
                k: {0: batch} if isinstance(v, torch.Tensor) else None for k, v in kwargs.items()
            }
        else:
            dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    # trace attention with the math kernel: the CPU flash kernel's output strides make the
    # exporter's reshape decomposition emit an invalid view (timm BEiT); ONNX gets the same
    # math either way
    with quiet(), sdpa_kernel(SDPBackend.MATH):
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            opset_version=opset,
            input_names=names_in,
            output_names=names_out,
            dynamic_shapes=dynamic,
            external_data=external,
            optimize=True,
            verbose=False,
        )
        assert program is not None
        program.save(str(target), external_data=external)

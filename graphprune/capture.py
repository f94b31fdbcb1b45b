"""Capture an ``nn.Module`` to a torch.export graph (the aten IR, no decompositions).

The export IR keeps ``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``, ``aten.layer_norm``
and ``aten.scaled_dot_product_attention`` as single ops, so the analyzer needs no table of
module types. Capture never mutates the model: train/eval flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from torch import fx, nn

from graphprune.errors import CaptureError, InputError

Args = tuple[Any, ...]
Kwargs = dict[str, Any]
ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]

P = ParamSpec("P")
R = TypeVar("R")

_TORCH_DIR = str(Path(torch.__file__).parent)
_OWN_DIR = str(Path(__file__).parent)


@dataclass
class Captured:
    """A captured program and the facts about it that the analyzer needs."""

    program: torch.export.ExportedProgram
    state_fqn: dict[str, str]  # placeholder name -> parameter/buffer/constant FQN
    parameters: set[str]  # the FQNs above that are parameters (the rest are buffers)
    aliases: dict[str, list[str]]  # FQN -> every FQN sharing the same tensor (tied weights)
    user_inputs: list[str]  # placeholder names of the model's own inputs, in order

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph


@dataclass
class LabelledBatch:
    """A calibration batch with a target: the loss is ``loss_fn(model(inputs), target)``."""

    inputs: Any  # what example inputs may be: a tensor, a tuple/list or a dict
    target: Any


def normalize_inputs(example_inputs: ExampleInputs | LabelledBatch) -> tuple[Args, Kwargs]:
    """Turn a tensor, a tuple/list, or a dict of keyword inputs into ``(args, kwargs)``
    (a :class:`LabelledBatch` gives its inputs)."""
    if isinstance(example_inputs, LabelledBatch):
        return normalize_inputs(example_inputs.inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs), {}
    raise InputError(
        f"example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
        f"not {type(example_inputs).__name__}"
    )


def output_tensors(model: nn.Module, example_inputs: ExampleInputs) -> list[torch.Tensor]:
    """The tensors ``model`` returns on ``example_inputs`` (no grad): the output itself, or the
    tensors of a tuple/list or of a dict (``ModelOutput``), in order."""
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return [out]
    values = list(out.values()) if isinstance(out, Mapping) else list(out)
    return [t for t in values if isinstance(t, torch.Tensor)]


def owning_module(node: fx.Node) -> str:
    """FQN of the innermost module whose forward produced ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _type = list(stack.values())[-1]
    return str(path)


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and graphprune: the user's source line."""
    found: str | None = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith((_TORCH_DIR, _OWN_DIR)) or frame.filename.startswith("<"):
            continue
        found = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return found


def _hint_for(reason: str) -> str:
    lowered = reason.lower()
    if "data-dependent" in lowered or "data dependent" in lowered or "guardondata" in lowered:
        return (
            "the forward branches on tensor *values*; make the branch depend on shapes or module "
            "attributes, or express it with torch.cond"
        )
    if "unsupported" in lowered or "not supported" in lowered:
        return "replace the unsupported call, or wrap it in a custom op (torch.library.custom_op)"
    return (
        "check that `model(*args, **kwargs)` runs on the example inputs, and pass them as a "
        "tensor, a tuple of positional inputs or a dict of keyword inputs"
    )


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """FQN -> every FQN of the same parameter or buffer (tied weights share one tensor)."""
    by_tensor: dict[int, list[str]] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


@contextlib.contextmanager
def no_cache(model: nn.Module | None) -> Iterator[None]:
    """``config.use_cache=False`` while capturing or exporting: a KV cache is an output object
    torch.export cannot flatten, and pruning does not need it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    saved = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = saved


def without_cache(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn(model, ..., baseline=...)`` with both models' KV cache off (see no_cache)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0] if args else kwargs.get("model")
        with no_cache(model), no_cache(kwargs.get("baseline")):  # type: ignore[arg-type]
            return fn(*args, **kwargs)

    return wrapper


# graphprune's work on a model runs one call at a time per process: torch.export keeps global
# mode stacks that concurrent exports corrupt, and capture, the shape trace and calibration
# briefly set modes and attributes on the model they read. Reentrant: compile calls analyze.
_WORK_LOCK = threading.RLock()


def serialized(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` holding graphprune's process-wide lock (see ``_WORK_LOCK``): calls from
    several threads give the results they give alone, one after another."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _WORK_LOCK:
            return fn(*args, **kwargs)

    return wrapper


def own_thread(hook: Callable[P, R]) -> Callable[P, R | None]:
    """``hook`` for a module hook that only this thread's forwards fire: a forward another
    thread runs on the same model at the same time passes through untouched and unrecorded."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def scoped(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return hook(*args, **kwargs) if threading.get_ident() == owner else None

    return scoped


def shell_copy(model: nn.Module) -> nn.Module:
    """New module objects around the same parameters, buffers and tensor attributes (no tensor
    is copied). torch.export swaps a module's parameters for fake tensors while it traces, and
    capture sets eval mode: on a shell, a forward another thread runs on ``model`` meanwhile
    sees none of it. A model whose modules cannot be copied is used as it is."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        held = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        for value in held:
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
    try:
        return copy.deepcopy(model, memo)
    except Exception:
        return model


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, or an InputError saying which attribute cannot be copied."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # TypeError: cannot pickle '_thread.lock' object, ...
        holder = next(
            (
                f"{path or '<root>'}.{name}"
                for path, module in model.named_modules()
                for name, value in vars(module).items()
                if not name.startswith("_") and not _copyable(value)
            ),
            "an attribute",
        )
        raise InputError(
            f"the model cannot be copied ({type(exc).__name__}: {exc}; {holder} holds it): "
            "graphprune prunes a copy and tries rewrites on copies; keep locks, files and "
            "sessions out of the module (or set them after pruning)"
        ) from None


def _copyable(value: Any) -> bool:
    try:
        copy.deepcopy(value)
    except Exception:
        return False
    return True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, every module's own mode restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)


def run_eval(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """``model(*args, **kwargs)`` on the example inputs, in eval mode without grad."""
    args, kwargs = normalize_inputs(example_inputs)
    with eval_mode(model), torch.no_grad():
        return model(*args, **kwargs)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch logs a traceback at ERROR level for every op that fails while tracing; the
    failure reaches the caller as a CaptureError, so the log is only noise."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.export", "torch._export")


def _is_attribute(model: nn.Module, fqn: str) -> bool:
    owner_path, _, name = fqn.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        return False
    return isinstance(getattr(owner, name, None), torch.Tensor)


def _canonical_module_paths(graph: fx.Graph, model: nn.Module) -> None:
    """A module reachable by several paths (one ``ConvPosEnc`` shared by the blocks of timm
    CoaT) is called under whichever path the caller used; name it by its first path, the one
    ``named_modules()`` (and so every pass) uses."""
    canonical = {id(m): path for path, m in model.named_modules()}
    alias = {
        path: canonical[id(m)]
        for path, m in model.named_modules(remove_duplicate=False)
        if canonical[id(m)] != path
    }
    if not alias:
        return
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (alias.get(path, path), kind) for key, (path, kind) in stack.items()
            }


def capture(model: nn.Module, example_inputs: ExampleInputs) -> Captured:
    """Export ``model`` in eval mode with ``torch.export.export(strict=False)``.

    Raises :class:`CaptureError` with the original reason, the user's source line when the
    traceback has one, and a hint.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"expected an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    with no_cache(model):
        shell = shell_copy(model)
    try:
        # no_grad: a forward's own no_grad regions (rotary tables) then need no
        # wrap_with_set_grad_enabled sub-graphs; HF: a KV cache cannot be flattened
        with eval_mode(shell), torch.no_grad(), no_cache(shell), _quiet_torch_logs():
            program = torch.export.export(shell, args, kwargs, strict=False)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        raise CaptureError(reason, source_line=_user_frame(exc), hint=_hint_for(str(exc))) from exc

    signature = program.graph_signature
    state_fqn: dict[str, str] = {}
    state_fqn.update(signature.inputs_to_parameters)
    state_fqn.update(signature.inputs_to_buffers)
    # tensor constants that are attributes of a module are state too; those the forward makes
    # (``lifted_tensor_0``) are not the model's to slice: they stay plain graph inputs
    state_fqn.update(
        {
            name: fqn
            for name, fqn in signature.inputs_to_lifted_tensor_constants.items()
            if _is_attribute(model, fqn)
        }
    )
    _canonical_module_paths(program.graph, model)
    return Captured(
        program=program,
        state_fqn=state_fqn,
        parameters=set(signature.inputs_to_parameters.values()),
        aliases=tensor_aliases(model),
        user_inputs=list(signature.user_inputs),
    )

"""Calibration activations offloaded to disk: sparse one-shot plans from a checkpoint with as
much calibration data as the disk holds.

The default streamed forward stacks the calibration batches into one forward, so one layer's
activations over *all* batches are in memory at once (at most 512 MiB). With ``offload_dir``
each batch runs its own forward instead -- the model's own loop (its masks, its rotary
embeddings, per-layer attention kinds) in a thread of its own -- and every forward pauses at
each *pause point*: a decoder block (``model.layers.<i>``), or a layer of the rest the plan
masks (the head). A paused forward's block input is written to a file in ``offload_dir`` and
its memory released (its storage resized to nothing; restored from the file when it goes
on), so memory holds one batch's activations, the block and one layer's statistics.

When every forward has paused at block ``P`` it is loaded, and

* SparseGPT prunes its layers in forward order. The layers that read one tensor (q, k and v;
  gate and up) are a *stage* with one Hessian: for each batch, ``P`` is run again from that
  batch's saved input (with its recorded arguments: the block's own mask and position
  embeddings) up to the stage, whose input is added to the Hessian; then the stage's layers
  are pruned and the next stage is reached the same way, through the layers pruned so far;
* wanda sums each layer's input norms as the forwards go on through ``P`` (unpruned).

Then the forwards go on through ``P``, one at a time, to the next pause point; ``P`` is
finished (wanda: masked from its norms), written and dropped. The Hessians and norms are
summed per batch, as in memory, but each batch's activations come from its own forward
rather than from a slice of the stacked one: one batch gives what :func:`graphprune.compile`
gives bit for bit; several agree up to float rounding (the kernels see other shapes).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from graphprune.capture import run_eval
from graphprune.checkpoint.scratch import activation_folder
from graphprune.checkpoint.stream import REST, BlockStream
from graphprune.checkpoint.write import block_of
from graphprune.errors import GraphPruneError, InputError
from graphprune.memory import release_freed_memory
from graphprune.oneshot.calibration import CallOrder, add_square_sum
from graphprune.oneshot.distributed import same_everywhere
from graphprune.oneshot.reconstruct import (
    in_forward_order,
    layer_hessian,
    sparsegpt_from,
    sparsegpt_layers,
)
from graphprune.progress import track

_END = "\0end"  # a forward's last arrival: it returned
Tuple = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]  # a call: module, args, kwargs


class _Stop(BaseException):
    """Ends a paused forward (the run failed elsewhere). BaseException: a model's ``except
    Exception`` must not swallow it."""


class _Reached(BaseException):
    """Stops a replay of a block at the stage it was run for."""


@dataclass
class _Spilled:
    """A released storage and the file that holds its bytes."""

    tensor: Tensor  # a tensor on the storage (the storage is reached through it)
    path: Path
    nbytes: int

    @classmethod
    def spill(cls, tensor: Tensor, path: Path) -> _Spilled:
        """Write ``tensor``'s storage to ``path`` and release it (every view of it)."""
        storage = tensor.untyped_storage()
        # through a shared mapping of the file (numpy would pin the storage: not resizable)
        mapped = torch.from_file(str(path), shared=True, size=storage.nbytes(), dtype=torch.uint8)
        mapped.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        del mapped
        spilled = cls(tensor, path, storage.nbytes())
        storage.resize_(0)
        return spilled

    def data(self) -> Tensor:
        """The file's bytes, read into memory (not left mapped)."""
        mapped = torch.from_file(str(self.path), shared=False, size=self.nbytes, dtype=torch.uint8)
        return mapped.clone()

    def restore(self) -> None:
        """Put the bytes back into the released storage."""
        storage = self.tensor.untyped_storage()
        storage.resize_(self.nbytes)
        torch.empty(0, dtype=torch.uint8).set_(storage).copy_(self.data())


def _view_on(data: Tensor, like: Tensor) -> Tensor:
    """``like``'s view (dtype, offset, shape, strides) on the bytes ``data``."""
    storage = data.untyped_storage()
    offset, shape, stride = int(like.storage_offset()), tuple(like.shape), tuple(like.stride())
    return torch.empty(0, dtype=like.dtype).set_(storage, offset, shape, stride)


@dataclass
class _Forward:
    """One batch's forward in its thread, and where it is paused."""

    index: int
    batch: Any
    go: threading.Event = field(default_factory=threading.Event)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden: Tensor | None = None  # the block input (released while paused, unless protected)
    spilled: list[_Spilled] = field(default_factory=list)  # [0]: the hidden's, when released
    # earlier block inputs: the model's loop may keep one alive (LLaMA's inputs_embeds is
    # the first block's input): released again at every pause while they live
    earlier: list[weakref.ref[Tensor]] = field(default_factory=list)


class PausedForwards:
    """Every calibration batch's forward, each in its own thread, run one at a time and all
    paused at the same pause point (see the module docstring)."""

    def __init__(self, model: nn.Module, batches: list[Any], points: set[str], folder: Path):
        self.model, self.folder = model, folder
        self.forwards = [_Forward(i, batch) for i, batch in enumerate(batches)]
        self.arrivals: queue.Queue[tuple[int, str, BaseException | None]] = queue.Queue()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        # the user's tensors are never released (one of them may be a first block's input)
        self.inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves(batches) if isinstance(t, Tensor)
        }  # fmt: skip
        modules = dict(model.named_modules())
        self.handles = [
            modules[name].register_forward_pre_hook(
                lambda module, args, kwargs, n=name: self._pause(n, args, kwargs),
                with_kwargs=True,
            )
            for name in sorted(points)
        ]  # fmt: skip
        self.local = threading.local()  # .forward: the _Forward of a worker thread

    def _protected(self) -> set[int]:
        """Storages never released: the user's batches and the model's own tensors."""
        own = (t.untyped_storage().data_ptr() for t in [*self.model.parameters(),
               *self.model.buffers()] if not t.is_meta)  # fmt: skip
        return self.inputs.union(own)

    def _pause(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        forward: _Forward | None = getattr(self.local, "forward", None)
        if forward is None:  # a replay in the coordinating thread: no pause
            return
        hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        if not isinstance(hidden, Tensor):
            raise InputError(
                f"{name} is called without its hidden states as the first argument or "
                "hidden_states=: its input cannot be offloaded (drop offload_dir=)"
            )
        forward.args, forward.kwargs, forward.hidden = args, kwargs, hidden
        forward.spilled = self._spill(forward, hidden)
        release_freed_memory()  # this thread's arena keeps its freed activations otherwise
        self.arrivals.put((forward.index, name, None))
        forward.go.wait()
        forward.go.clear()
        # nothing of this pause outlives it (a forward's last block input, kept, would hold
        # a hidden state per batch in memory)
        spilled, forward.spilled, forward.args, forward.kwargs, forward.hidden = (
            forward.spilled, [], (), {}, None
        )  # fmt: skip
        if self.stopping.is_set():
            raise _Stop
        for part in spilled:
            part.restore()

    def _spill(self, forward: _Forward, hidden: Tensor) -> list[_Spilled]:
        """Release the block input and the earlier ones still alive, each storage once."""
        protected, done = self._protected(), set[int]()
        alive = [hidden, *(t for ref in forward.earlier if (t := ref()) is not None)]
        spilled: list[_Spilled] = []
        for k, tensor in enumerate(alive):
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in protected | done:
                continue
            done.add(storage.data_ptr())
            path = self.folder / f"batch-{forward.index}-{k}.bin"
            spilled.append(_Spilled.spill(tensor, path))
        forward.earlier = [weakref.ref(t) for t in alive]
        return spilled

    def _run(self, forward: _Forward) -> None:
        self.local.forward = forward
        try:
            run_eval(self.model, forward.batch)
        except _Stop:
            return
        except BaseException as exc:  # handed to the coordinating thread, which raises it
            self.arrivals.put((forward.index, _END, exc))
            return
        self.arrivals.put((forward.index, _END, None))

    def _wait(self, forward: _Forward) -> str:
        """Where ``forward`` paused next (its error raised here)."""
        while True:
            try:
                index, name, error = self.arrivals.get(timeout=0.05)
            except queue.Empty:
                if not self.threads[forward.index].is_alive() and self.arrivals.empty():
                    raise GraphPruneError("a calibration forward ended without a result") from None
                continue
            assert index == forward.index, (index, forward.index)  # one runs at a time
            if error is not None:
                raise error
            return name

    def start(self) -> str:
        """Run every forward to its first pause point; the point they all reached."""
        reached = []
        for forward in self.forwards:
            thread = threading.Thread(
                target=self._run, args=(forward,), name=f"graphprune-calibration-{forward.index}",
                daemon=True,
            )  # fmt: skip
            thread.start()
            self.threads.append(thread)  # (started: close joins it)
            reached.append(self._wait(forward))
        return self._same(reached)

    def advance(self) -> str:
        """Let every forward go on, one at a time, to its next pause point (or its end)."""
        reached = []
        for forward in self.forwards:
            forward.go.set()
            reached.append(self._wait(forward))
        return self._same(reached)

    @staticmethod
    def _same(reached: list[str]) -> str:
        if len(set(reached)) != 1:
            raise InputError(
                "the calibration batches' forwards reach different blocks "
                f"({sorted(set(reached))[:3]}): offloading needs one path through the model "
                "for every batch (drop offload_dir=)"
            )
        return reached[0]

    def replay(self, module: nn.Module) -> Iterator[Tuple]:
        """Per forward: ``module`` (where they are paused) called again on a copy of its saved
        input, with the arguments it was called with, in this thread."""
        for forward in self.forwards:
            hidden = forward.hidden
            assert hidden is not None
            args, kwargs = forward.args, dict(forward.kwargs)
            released = forward.spilled and forward.spilled[0].tensor is hidden
            copy = _view_on(forward.spilled[0].data(), hidden) if released else hidden
            if args and args[0] is hidden:
                args = (copy, *args[1:])
            else:
                kwargs["hidden_states"] = copy
            yield module, args, kwargs

    def close(self) -> None:
        """End every forward still paused (the run failed) and remove the hooks."""
        self.stopping.set()
        try:
            for forward in self.forwards:
                forward.go.set()
            for thread in self.threads:
                thread.join()
        finally:
            for handle in self.handles:
                handle.remove()


def stream_offloaded(
    stream: BlockStream,
    batches: list[Any],
    order: CallOrder,
    offload_dir: Path,
    progress: bool,
) -> None:
    """SparseGPT (or wanda, for a stream of unpruned forwards) on ``stream``'s layers with
    each batch's forward paused at every block, its activations in ``offload_dir`` (see the
    module docstring); every block is finished (written) once every forward has passed it."""
    model, wanda = stream.model, stream.unpruned
    modules = dict(model.named_modules(remove_duplicate=False))
    todo, fits = sparsegpt_layers(model, [n for n in stream.layers if not _done(stream, n)], order)
    if wanda:
        twice = sorted(n for n in stream.layers if order.calls.get(n, 0) > 1)
        if twice:
            raise InputError(
                f"wanda reads each layer's input once a forward: {twice[:3]} are called more "
                "than once (load the model and use graphprune.compile)"
            )
    same_everywhere(todo if not wanda else [], "the layers SparseGPT prunes, in forward order")
    fits = [] if wanda else fits  # (wanda reports no fits)
    blocks = [b for b in stream.blocks if b != REST]
    points = set(blocks) | (set() if wanda else {n for n in todo if block_of(n) == REST})
    stream.steps = iter(track(blocks, _title(wanda), progress))
    pruned: set[str] = set()
    with activation_folder(offload_dir) as folder:
        forwards = PausedForwards(model, batches, points, folder)
        try:
            with _rest_loaded(stream, modules) as drop_rest, _norms(stream, modules, wanda):
                point = forwards.start()
                drop_rest()
                while point != _END:
                    block = block_of(point)
                    stream.load(block, within="" if block else point + ".")
                    for name in [] if wanda else [n for n in todo if _inside(n, point)]:
                        if name not in pruned:  # (a stage's later layers are done with it)
                            found = _prune_stage(stream, forwards, modules, point, name, todo)
                            fits += found
                            pruned.update(f.module for f in found)
                    after = forwards.advance()
                    drop_rest()
                    if block:
                        stream.finish(block)
                    point = after
        finally:
            forwards.close()
    missed = [] if wanda else [n for n in todo if n not in pruned]
    if missed:  # never guessed: the stacked forward refuses the same
        raise InputError(
            f"the calibration forwards did not reach {missed[:3]}: SparseGPT cannot prune "
            "them from their inputs (load the model and use graphprune.compile)"
        )
    for _ in stream.steps:  # drain the bar
        pass
    stream.outcome.fits = in_forward_order(fits, order.order)


def _title(wanda: bool) -> str:
    return "wanda (offloaded)" if wanda else "SparseGPT (offloaded)"


def _done(stream: BlockStream, layer: str) -> bool:
    return block_of(layer) in stream.done


def _inside(name: str, point: str) -> bool:
    return name == point or name.startswith(point + ".")


@contextlib.contextmanager
def _rest_loaded(
    stream: BlockStream, modules: dict[str, nn.Module]
) -> Iterator[Callable[[], None]]:
    """The rest's leaf modules loaded when a forward calls them (every forward calls them:
    kept until all have); yields what drops those the plan does not mask (the embeddings once
    every forward has passed them)."""
    stream.load(REST, eager_only=True)
    leaves = stream._rest_leaves()
    handles = [
        modules[n].register_forward_pre_hook(lambda *_, n=n: stream.load(REST, within=n + "."))
        for n in leaves
    ]  # fmt: skip

    def drop() -> None:
        for name in leaves:
            if name not in stream.kept_after_call:
                stream._drop(REST, within=name + ".")

    try:
        yield drop
    finally:
        for handle in handles:
            handle.remove()
        drop()


@contextlib.contextmanager
def _norms(stream: BlockStream, modules: dict[str, nn.Module], wanda: bool) -> Iterator[None]:
    """Wanda: each masked layer's input norms summed as the forwards pass (batch order)."""
    handles = [
        modules[name].register_forward_pre_hook(
            lambda module, args, n=name: add_square_sum(stream.square_sums, n, module,
                                                        args[0].detach())
        )
        for name in (stream.layers if wanda else [])
    ]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _prune_stage(
    stream: BlockStream,
    forwards: PausedForwards,
    modules: dict[str, nn.Module],
    point: str,
    first: str,
    todo: list[str],
) -> list[Any]:
    """SparseGPT on ``first`` and the layers after it that read the very same tensor, with one
    Hessian of that input over every batch (each replayed from its saved block input)."""
    stage, inputs = _stage_inputs(forwards, modules, point, first, todo)
    found = layer_hessian(modules[first], inputs)
    fits = []
    plan = stream.plan
    for name in stage:
        module = modules[name]
        mask = stream._plain_mask(name, module)
        nm = (plan.nm[0], plan.nm[1])
        kept, fit = sparsegpt_from(module, name, found, mask, stream._adaptive(), nm)
        stream.masks[name] = kept
        fits.append(fit)
    return fits


def _stage_inputs(
    forwards: PausedForwards,
    modules: dict[str, nn.Module],
    point: str,
    first: str,
    todo: list[str],
) -> tuple[list[str], Iterator[Tensor]]:
    """The stage that starts at layer ``first`` -- it and the Linears right after it in
    ``todo`` called on the very same, unchanged tensor, found in the first batch's replay --
    and its input per batch (each replay stops at ``first``)."""
    if first == point:  # a layer of the rest: its input is the saved one
        return [first], (args[0] if args else kwargs["hidden_states"]
                         for _, args, kwargs in forwards.replay(modules[point]))  # fmt: skip
    following = todo[todo.index(first) :]
    linear = isinstance(modules[first], nn.Linear)
    runs = forwards.replay(modules[point])
    stage: list[str] = []
    seen: list[tuple[Tensor, int, Tensor]] = []  # first's input, its version, a copy

    def find(name: str, args: tuple[Any, ...]) -> None:
        x = args[0]
        if not seen:
            if name != first:  # a later layer before it: first is not reached
                raise _Reached
            seen.append((x, x._version, x.detach().clone()))  # (later ops may change x)
            stage.append(name)
            return
        same = x is seen[0][0] and x._version == seen[0][1]
        next_one = len(stage) < len(following) and name == following[len(stage)]
        if not (same and next_one and linear and isinstance(modules[name], nn.Linear)):
            raise _Reached
        stage.append(name)

    def stop(name: str, args: tuple[Any, ...]) -> None:
        seen.append((args[0], 0, args[0].detach()))
        raise _Reached

    def run(call: Tuple, names: list[str], hook: Callable[[str, tuple[Any, ...]], None]) -> Tensor:
        seen.clear()
        module, args, kwargs = call
        with _layer_hooks(modules, names, hook), contextlib.suppress(_Reached), torch.no_grad():
            type(module).forward(module, *args, **kwargs)
        if not seen:
            raise InputError(f"{first} is not reached when {point} runs again on its input")
        return seen.pop()[2]

    first_inputs = [run(next(runs), following, find)]  # the first batch's: finds the stage

    def inputs() -> Iterator[Tensor]:
        yield first_inputs.pop()  # (not held while the other batches replay)
        for call in runs:
            yield run(call, [first], stop)

    return list(stage), inputs()


@contextlib.contextmanager
def _layer_hooks(
    modules: dict[str, nn.Module], names: list[str], pre: Callable[[str, tuple[Any, ...]], None]
) -> Iterator[None]:
    handles = [
        modules[n].register_forward_pre_hook(lambda module, args, n=n: pre(n, args)) for n in names
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["PausedForwards", "stream_offloaded"]

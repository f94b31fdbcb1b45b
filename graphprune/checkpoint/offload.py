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
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.capture import run_eval
from graphprune.checkpoint.stream import REST, BlockStream
from graphprune.checkpoint.write import block_of
from graphprune.errors import GraphPruneError, InputError
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
class _Saved:
    """A paused forward's block input, in a file: its storage's bytes and the view on it."""

    path: Path
    nbytes: int
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def spill(cls, hidden: Tensor, path: Path) -> _Saved:
        """Write ``hidden``'s storage to ``path`` and release it (every view of it)."""
        storage = hidden.untyped_storage()
        # through a shared mapping of the file (numpy would pin the storage: not resizable)
        mapped = torch.from_file(str(path), shared=True, size=storage.nbytes(), dtype=torch.uint8)
        mapped.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        del mapped
        saved = cls(path, storage.nbytes(), hidden.dtype, int(hidden.storage_offset()),
                    tuple(hidden.shape), tuple(hidden.stride()))  # fmt: skip
        storage.resize_(0)
        return saved

    def _bytes(self) -> Tensor:
        """The file's bytes, read into memory (not left mapped)."""
        mapped = torch.from_file(str(self.path), shared=False, size=self.nbytes, dtype=torch.uint8)
        return mapped.clone()

    def restore(self, hidden: Tensor) -> None:
        """Put the bytes back into ``hidden``'s released storage."""
        storage = hidden.untyped_storage()
        storage.resize_(self.nbytes)
        torch.empty(0, dtype=torch.uint8).set_(storage).copy_(self._bytes())

    def load(self) -> Tensor:
        """A copy of the saved tensor (for a replay; the forward's own stays released)."""
        data = self._bytes().untyped_storage()
        return torch.empty(0, dtype=self.dtype).set_(data, self.offset, self.shape, self.stride)


@dataclass
class _Forward:
    """One batch's forward in its thread, and where it is paused."""

    index: int
    batch: Any
    go: threading.Event = field(default_factory=threading.Event)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    saved: _Saved | None = None
    hidden: Tensor | None = None  # the released block input (restored when it goes on)


class PausedForwards:
    """Every calibration batch's forward, each in its own thread, run one at a time and all
    paused at the same pause point (see the module docstring)."""

    def __init__(self, model: nn.Module, batches: list[Any], points: set[str], folder: Path):
        self.model, self.folder = model, folder
        self.forwards = [_Forward(i, batch) for i, batch in enumerate(batches)]
        self.arrivals: queue.Queue[tuple[int, str, BaseException | None]] = queue.Queue()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        modules = dict(model.named_modules())
        self.handles = [
            modules[name].register_forward_pre_hook(
                lambda module, args, kwargs, n=name: self._pause(n, args, kwargs),
                with_kwargs=True,
            )
            for name in sorted(points)
        ]  # fmt: skip
        self.local = threading.local()  # .forward: the _Forward of a worker thread

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
        path = self.folder / f"batch-{forward.index}.bin"
        forward.args, forward.kwargs, forward.hidden = args, kwargs, hidden
        forward.saved = _Saved.spill(hidden, path)
        self.arrivals.put((forward.index, name, None))
        forward.go.wait()
        forward.go.clear()
        if self.stopping.is_set():
            raise _Stop
        forward.saved.restore(hidden)
        forward.saved = None

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
            self.threads.append(thread)
            thread.start()
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
            assert forward.saved is not None
            args, kwargs = forward.args, dict(forward.kwargs)
            copy = forward.saved.load()
            if args and args[0] is forward.hidden:
                args = (copy, *args[1:])
            else:
                kwargs["hidden_states"] = copy
            yield module, args, kwargs

    def close(self) -> None:
        """End every forward still paused (the run failed) and remove the hooks."""
        self.stopping.set()
        for forward in self.forwards:
            forward.go.set()
        for thread in self.threads:
            thread.join()
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
    points = {b for b in stream.blocks if b != REST}
    points |= set() if wanda else {n for n in todo if block_of(n) == REST}
    folder = Path(tempfile.mkdtemp(prefix="graphprune-activations-", dir=offload_dir))
    forwards = PausedForwards(model, batches, points, folder)
    stream.steps = iter(track([b for b in points if b in stream.blocks], _title(wanda), progress))
    try:
        with _rest_loaded(stream, modules) as drop_rest, _norms(stream, modules, wanda):
            point = forwards.start()
            drop_rest()
            while point != _END:
                block = block_of(point)
                stream.load(block, within="" if block else point + ".")
                for name in [] if wanda else [n for n in todo if _inside(n, point)]:
                    if name not in stream.masks:  # (a stage's later layers are done with it)
                        fits += _prune_stage(stream, forwards, modules, point, name, todo)
                after = forwards.advance()
                drop_rest()
                if block:
                    stream.finish(block)
                point = after
    finally:
        forwards.close()
        shutil.rmtree(folder, ignore_errors=True)
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
    """The stage that starts at layer ``first`` (the Linears after it in ``todo`` called on
    the very same tensor, found in the first batch's replay) and its input per batch."""
    if first == point:  # a layer of the rest: its input is the saved one
        return [first], (args[0] if args else kwargs["hidden_states"]
                         for _, args, kwargs in forwards.replay(modules[point]))  # fmt: skip
    following = todo[todo.index(first) :]
    stage: list[str] = []
    seen: list[Tensor] = []

    def pre(name: str, args: tuple[Any, ...]) -> None:
        x = args[0]
        if not seen:
            seen.append(x)
            stage.append(name)
        elif (
            x is seen[0] and len(stage) < len(following) and name == following[len(stage)]
            and isinstance(modules[name], nn.Linear) and isinstance(modules[first], nn.Linear)
        ):  # fmt: skip
            stage.append(name)
        else:
            raise _Reached
        if not collecting_stage[0]:
            raise _Reached

    collecting_stage = [True]
    runs = forwards.replay(modules[point])

    def run_to_stage(call: Tuple) -> Tensor:
        seen.clear()
        with _layer_hooks(modules, following if collecting_stage[0] else [first], pre):
            module, args, kwargs = call
            with contextlib.suppress(_Reached), torch.no_grad():
                type(module).forward(module, *args, **kwargs)
        if not seen:
            raise InputError(f"{first} is not reached when {point} runs again on its input")
        return seen[0].detach()

    first_input = run_to_stage(next(runs))
    collecting_stage[0] = False
    found = list(stage)

    def inputs() -> Iterator[Tensor]:
        yield first_input
        for call in runs:
            stage.clear()
            yield run_to_stage(call)

    return found, inputs()


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

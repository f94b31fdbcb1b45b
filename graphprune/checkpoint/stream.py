"""Sparse plans from a checkpoint, one block of weights in memory at a time.

The model stays on the meta device except for what is being used. Its non-persistent buffers
(rotary frequencies) are made as ``from_pretrained`` makes them (the model's
``_init_weights``). Each numbered block (``model.layers.<i>``: one output shard) is loaded
from the source's shards when it is reached; when it is done its masked layers are zeroed,
it is written to its output shard and dropped. The rest (embeddings, final norm, head) is
loaded before the forward (a Linear/Conv of it when it is called) and written last.

* Weight criteria (l1, l2): no forward; block after block.
* Wanda (``importance="wanda"``): one forward of the stacked calibration batches on the
  unpruned weights, as :func:`graphprune.compile` scores them; each block is loaded when the
  forward reaches it and, when it returns (its output computed unpruned), masked from its
  layers' input norms, written and dropped. The norms are summed as in memory
  (:func:`~graphprune.oneshot.calibration.input_square_sums`): the same masks, bit for bit.
* ``reconstruct=True`` (SparseGPT): one forward of the stacked calibration batches; each
  block is loaded when the forward reaches it and each of its layers pruned in a pre-hook
  before it runs, on the activations of the model as pruned so far. That is the code path of
  :func:`graphprune.compile` in memory (:func:`~graphprune.oneshot.reconstruct.sparsegpt`),
  so both give the same weights, bit for bit.
* With an ``offload`` (:mod:`graphprune.checkpoint.offload`), wanda and SparseGPT run a
  forward per batch instead, paused at every block with its input in a file.

An interrupted run resumes: a block whose shard is complete (manifest and sha256) is loaded
from that shard -- its weights as pruned -- and not pruned again, so the activations after it
are those of the first run (wanda, whose forward runs on the unpruned weights, loads it from
the source for the forward and keeps its shard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from graphprune.capture import tensor_aliases
from graphprune.checkpoint.source import Checkpoint, CheckpointTensors, _safe_open
from graphprune.checkpoint.write import ShardWriter, block_of
from graphprune.errors import InputError
from graphprune.memory import release_freed_memory
from graphprune.modules import weight_of
from graphprune.oneshot.calibration import (
    CallOrder,
    call_order,
    input_square_sums,
    rows_unsupported,
)
from graphprune.oneshot.distributed import all_sum, barrier, same_everywhere
from graphprune.oneshot.reconstruct import LayerFit, sparsegpt
from graphprune.planning.masks import (
    layer_mask,
    maskable_layers,
    unfit,
    wanda_scores,
    weight_scores,
)
from graphprune.planning.plan import Plan
from graphprune.progress import track
from graphprune.report import LayerSparsity

REST = ""  # the block of every tensor outside a numbered one


@dataclass
class SparseOutcome:
    """What the streamed sparse stage did, in report form."""

    layers: list[LayerSparsity] = field(default_factory=list)
    fits: list[LayerFit] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # blocks taken from an interrupted run


def stream_sparse(
    source: Checkpoint,
    model: nn.Module,
    plan: Plan,
    batches: list[Any],
    writer: ShardWriter,
    progress: bool,
    offload: Callable[[BlockStream, list[Any], CallOrder], None] | None = None,
) -> SparseOutcome:
    """Mask the meta ``model``'s layers as the sparse ``plan`` says, block by block, writing
    each block's shard with ``writer`` (see the module docstring). ``offload(stream,
    batches, order)`` runs the calibration forward instead (activations offloaded to disk:
    :mod:`graphprune.checkpoint.offload`)."""
    layers, skipped = maskable_layers(model, plan)
    for name in list(layers):
        why = unfit(plan, tuple(weight_of(layers[name]).shape))
        if why:
            skipped[name] = why
            del layers[name]
    wanda = plan.importance == "wanda" and not plan.reconstruct
    forward = plan.reconstruct or wanda  # the calibration data runs through the model
    order = fake_call_order(model, list(layers), batches[0]) if forward else None
    stream = BlockStream(source, model, plan, writer, layers)
    barrier()  # torch.distributed: every rank has read which blocks are done before any writes
    same_everywhere(sorted(stream.done), "the blocks an interrupted run wrote")
    stream.outcome.layers += [LayerSparsity(n, "dense", [], 0.0, w) for n, w in skipped.items()]
    real_buffers(model)
    if forward and offload is not None:
        assert order is not None
        offload(stream, batches, order)
    elif plan.reconstruct:
        assert order is not None
        stream.sparsegpt(batches, order, progress)
    elif wanda:
        assert order is not None
        stream.wanda(batches, order, progress)
    stream.finish_all()
    return stream.outcome


class StreamedNorms:
    """Wanda's input norms for a structured plan from a checkpoint (a ``NormSource``): on
    first use one forward of the stacked calibration batches runs through the meta model, each
    block loaded from the shards when the forward reaches it and dropped when it returns
    (nothing is written), measuring every Linear/Conv called once a forward; later asks are
    answered from that pass. The sums are those :func:`graphprune.compile` makes in memory
    (:func:`~graphprune.oneshot.calibration.input_square_sums`), so the scores are the same.
    The model is left on the meta device, its non-persistent buffers too."""

    def __init__(self, source: Checkpoint, model: nn.Module, plan: Plan) -> None:
        self.source, self.model, self.plan = source, model, plan
        self.norms: dict[str, Tensor] | None = None
        self.twice: set[str] = set()  # layers called more than once a forward: not measured

    def __call__(self, layers: list[str], batches: list[Any]) -> dict[str, Tensor]:
        if self.norms is None:
            self.norms = self._measure(batches)
        twice = sorted(self.twice.intersection(layers))
        if twice:
            raise InputError(
                f"wanda from a checkpoint reads each layer's input in one forward: {twice[:3]} "
                "are called more than once a forward (load the model and use graphprune.compile)"
            )
        return {name: self.norms[name] for name in layers if name in self.norms}

    def _measure(self, batches: list[Any]) -> dict[str, Tensor]:
        model = self.model
        candidates = [n for n, m in model.named_modules() if n and not rows_unsupported(m)]
        order = fake_call_order(model, candidates, batches[0])
        self.twice = {n for n, calls in order.calls.items() if calls > 1}
        once = [n for n in order.order if n not in self.twice]
        sums: dict[str, Tensor] = {}
        with tables_kept(model):
            real_buffers(model)
            stream = BlockStream(self.source, model, self.plan, None, {})
            with stream._hooks():
                input_square_sums(model, once, batches, sums, order=order, one_forward=True)
        same_everywhere(sorted(sums), "the layers the forward reached")
        for name in sorted(sums):
            all_sum(sums[name])
        return {name: total.sqrt() for name, total in sums.items()}


@contextlib.contextmanager
def tables_kept(model: nn.Module) -> Iterator[None]:
    """Every module's parameter and buffer tables put back as they were after a stream (meta,
    tied weights one object: a stream loads and drops each owner's own)."""
    tables = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for module, parameters, buffers in tables:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)


def fake_call_order(model: nn.Module, names: list[str], batch: Any) -> CallOrder:
    """The layers' call order from a forward of the meta model on shapes alone."""
    meta = torch.utils._pytree.tree_map_only(Tensor, lambda t: t.to("meta"), batch)
    with FakeTensorMode(allow_non_fake_inputs=True):
        return call_order(model, names, meta)


def real_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (in no checkpoint) made on the CPU by the model's own
    ``_init_weights``, as ``from_pretrained`` makes them; one left unset is an error."""
    init = getattr(model, "_init_weights", None)
    for name, module in model.named_modules():
        meta = {
            leaf: buffer for leaf in module._non_persistent_buffers_set
            if (buffer := module._buffers.get(leaf)) is not None and buffer.is_meta
        }  # fmt: skip
        if not meta:
            continue
        made = []  # made from zeros and from ones: a buffer init does not set differs
        for fill in (torch.zeros, torch.ones):
            for leaf, buffer in meta.items():
                module._buffers[leaf] = fill(buffer.shape, dtype=buffer.dtype)
            if init is not None:
                init(module)
            made.append({leaf: module._buffers[leaf] for leaf in meta})
        for leaf in meta:
            if not torch.equal(made[0][leaf], made[1][leaf]):
                raise InputError(
                    f"buffer {name}.{leaf} is not stored in the checkpoint and the model's "
                    "_init_weights does not compute it: this model cannot be streamed (load "
                    "it and use graphprune.compile)"
                )


class BlockStream:
    """The meta model's tensors loaded from the checkpoint (or from a complete output shard)
    block by block, masked, written and dropped."""

    def __init__(
        self,
        source: Checkpoint,
        model: nn.Module,
        plan: Plan,
        writer: ShardWriter | None,
        layers: dict[str, nn.Module],
        *,
        stored: Mapping[str, Tensor] | None = None,
        made: Callable[[str], list[Any]] | None = None,
        keep: Iterable[str] = (),
    ) -> None:
        """``stored``: each tensor by FQN as the stream loads it (default: as the source holds
        it); ``made``: what a written tensor is made from, by name (the manifest's resume
        check; default: its shape, masked or as stored); ``keep``: leaf modules of the rest
        kept loaded after their call, as the masked ``layers`` are (written last)."""
        self.source, self.model, self.plan, self.writer = source, model, plan, writer
        self.stored = stored if stored is not None else CheckpointTensors(
            source, tensor_aliases(model)
        )  # fmt: skip
        self.made_of = made
        self.layers = layers  # the maskable layers, by FQN
        self.kept_after_call = set(layers) | set(keep)
        self.files: dict[str, list[str]] = {}  # block -> its output shards (the rest: several)
        for file, names in writer.plan.items() if writer is not None else []:
            self.files.setdefault(block_of(names[0]), []).append(file)
        # the blocks in the order written (read only: in the checkpoint's order)
        in_source = dict.fromkeys(map(block_of, source.shapes))
        self.blocks = list(self.files) if writer is not None else list(in_source)
        self.masks: dict[str, Tensor] = {}  # chosen by SparseGPT as it goes
        # wanda: sum(x_j^2) of each layer's inputs, and its forward runs on unpruned weights
        self.square_sums: dict[str, Tensor] = {}
        self.unpruned = plan.importance == "wanda" and not plan.reconstruct
        self.steps: Iterator[str] = iter(())  # the progress bar, a step per block finished
        self.outcome = SparseOutcome()
        self.done = {
            b for b in self.blocks
            if writer is not None and all(writer.complete(f, self._made(f)) for f in self.files[b])
        }  # fmt: skip
        self.finished: set[str] = set()  # blocks written (or kept) and dropped
        self.outcome.resumed = sorted(b for b in self.done if b != REST)

    def _made(self, file: str) -> dict[str, list[Any]]:
        """What a shard is made from: each tensor's shape, masked or as stored."""
        assert self.writer is not None
        names = self.writer.plan[file]
        if self.made_of is not None:
            return {n: self.made_of(n) for n in names}
        layers = {f"{n}.weight" for n in self.layers}
        return {n: [*self.source.shapes[n], "masked" if n in layers else "stored"] for n in names}

    def _tensors(self, block: str) -> Iterator[tuple[str, nn.Module, str, bool]]:
        """(FQN, owner, attribute, is_parameter) of every stored tensor of ``block``."""
        for prefix, module in self.model.named_modules(remove_duplicate=False):
            for leaf, value in module._parameters.items():
                fqn = f"{prefix}.{leaf}" if prefix else leaf
                if value is not None and block_of(fqn) == block:
                    yield fqn, module, leaf, True
            for leaf, value in module._buffers.items():
                fqn = f"{prefix}.{leaf}" if prefix else leaf
                persistent = leaf not in module._non_persistent_buffers_set
                if value is not None and persistent and block_of(fqn) == block:
                    yield fqn, module, leaf, False

    def load(self, block: str, within: str = "", eager_only: bool = False) -> None:
        """Read ``block``'s tensors still on meta (those under ``within`` only; with
        ``eager_only``, those a leaf module of the rest does not own: a leaf is read when it is
        called). A block done in an interrupted run is read from its output shard."""
        if block in self.finished:
            raise InputError(
                f"{block} is called again after it was pruned and written: a block the forward "
                "calls more than once cannot be streamed (load the model and use "
                "graphprune.compile)"
            )
        with contextlib.ExitStack() as stack:
            done = {}  # tensor name -> the complete output shard that holds it
            writer = self.writer
            if writer is not None and block in self.done and not self.unpruned:
                for file in self.files[block]:
                    opened = stack.enter_context(_safe_open(writer.staging / file))
                    done.update(dict.fromkeys(writer.plan[file], opened))
            for fqn, owner, leaf, is_param in self._tensors(block):
                current = owner._parameters[leaf] if is_param else owner._buffers[leaf]
                if current is None or current.device.type != "meta":
                    continue
                if not fqn.startswith(within) or (eager_only and not list(owner.children())):
                    continue
                value = done[fqn].get_tensor(fqn) if fqn in done else self.stored[fqn]
                value = value.to(current.dtype)  # as from_pretrained casts (fp32 norms in bf16)
                if is_param:
                    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                else:
                    owner._buffers[leaf] = value

    def finish(self, block: str) -> None:
        """Zero the block's masked layers (those SparseGPT did not prune: their plain mask),
        write its shard (unless an interrupted run did) and drop its tensors (read only: drop
        them)."""
        if self.writer is None:
            self._drop(block)
            if block != REST:
                self.finished.add(block)
            return
        for name, module in self.layers.items():
            if block_of(name) != block:
                continue
            weight = weight_of(module)
            mask = self.masks.get(name)
            if block in self.done:  # as written: the zeros are the mask
                mask = (self._written(f"{name}.weight") if self.unpruned else weight) != 0
            elif mask is None:
                mask = self._plain_mask(name, module)
                with torch.no_grad():
                    weight.mul_(mask)
            sparsity = 1.0 - float(mask.float().mean())
            pattern = self.plan.granularity
            self.outcome.layers.append(LayerSparsity(name, pattern, list(mask.shape), sparsity))
            self.masks.pop(name, None)
        if block not in self.done:
            state = {fqn: owner._parameters[leaf] if p else owner._buffers[leaf]
                     for fqn, owner, leaf, p in self._tensors(block)}  # fmt: skip
            for file in self.files[block]:
                tensors = {}
                for name in self.writer.plan[file]:
                    value = state.get(name)
                    value = self.stored[name] if value is None or value.is_meta else value
                    kind = self.source.stored_dtype(name) or value.dtype  # written as stored
                    tensors[name] = value.detach().to(kind).contiguous()
                self.writer.write(file, tensors, self._made(file))
                del tensors
        self._drop(block)
        if block != REST:
            self.finished.add(block)
            next(self.steps, None)

    def finish_all(self) -> None:
        """Load and finish every block not finished yet (those the forward did not reach,
        too), the rest last."""
        for block in self.blocks:
            if block != REST and block not in self.finished:
                self.load(block)
                self.finish(block)
        self.load(REST)
        self.finish(REST)

    def drop_loaded(self) -> None:
        """Put every loaded tensor back on the meta device (a read-only stream's end)."""
        for block in self.blocks:
            self._drop(block)

    def _written(self, fqn: str) -> Tensor:
        """A tensor as an interrupted run wrote it (its block's complete output shard)."""
        assert self.writer is not None
        file = next(f for f, names in self.writer.plan.items() if fqn in names)
        with _safe_open(self.writer.staging / file) as opened:
            written: Tensor = opened.get_tensor(fqn)
        return written

    def _plain_mask(self, name: str, module: nn.Module) -> Tensor:
        """The plan's mask of one layer from its weight (a weight criterion) or, for wanda,
        its weight and input norms (a layer the forward did not call: its weight alone)."""
        weight = weight_of(module)
        if self.unpruned:
            sums = self.square_sums.get(name)
            same_everywhere([name] if sums is not None else [], "the layers the forward reached")
            if sums is not None:
                all_sum(sums)  # over the ranks' shares of the batches (torch.distributed)
            scores = wanda_scores(module, weight, None if sums is None else sums.sqrt())
        else:
            scores = weight_scores(weight, str(self.plan.importance))
        found = layer_mask(name, module, self.plan, scores)
        assert not isinstance(found, str), found  # unfit layers were set aside before
        return found.mask

    def _drop(self, block: str, within: str = "") -> None:
        """Put the block's loaded tensors (those under ``within``) back on the meta device; a
        whole block's pages are handed back to the operating system (an arena keeps them
        otherwise: graphprune.memory)."""
        for fqn, owner, leaf, is_param in self._tensors(block):
            if not fqn.startswith(within):
                continue
            value = owner._parameters[leaf] if is_param else owner._buffers[leaf]
            if value is None or value.is_meta:
                continue
            meta = torch.empty_like(value, device="meta")
            if is_param:
                owner._parameters[leaf] = nn.Parameter(meta, requires_grad=False)
            else:
                owner._buffers[leaf] = meta
        if not within:
            release_freed_memory()

    def sparsegpt(self, batches: list[Any], order: CallOrder, progress: bool) -> None:
        """SparseGPT in one forward of the stacked batches, the blocks loaded and finished by
        hooks as the forward reaches and leaves them."""
        todo = {n: m for n, m in self.layers.items() if block_of(n) not in self.done}
        with self._hooks():
            _, fits = sparsegpt(
                self.model, _LazyMasks(todo, self._plain_mask), batches,
                adaptive=self._adaptive(), nm=(self.plan.nm[0], self.plan.nm[1]),
                progress=progress, order=order, one_forward=True, pruned=self.masks,
            )  # fmt: skip
        self.outcome.fits = fits

    def wanda(self, batches: list[Any], order: CallOrder, progress: bool) -> None:
        """Input norms in one forward of the stacked batches on the unpruned weights, the
        blocks loaded and finished (masked from the norms) by hooks as the forward goes."""
        twice = sorted(n for n in self.layers if order.calls.get(n, 0) > 1)
        if twice:  # found before anything is written
            raise InputError(
                f"wanda from a checkpoint reads each layer's input in one forward: {twice[:3]} "
                "are called more than once a forward (load the model and use graphprune.compile)"
            )
        self.steps = iter(track([b for b in self.blocks if b != REST], "wanda", progress))
        with self._hooks():
            input_square_sums(
                self.model, list(self.layers), batches, self.square_sums, order=order,
                one_forward=True,
            )  # fmt: skip
        for _ in self.steps:  # drain the bar
            pass

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        """Each block loaded when the forward enters it and finished when it returns; each
        leaf module of the rest loaded when it is called (and dropped after, unless it is a
        layer the plan masks: its weights are written last)."""
        modules = dict(self.model.named_modules(remove_duplicate=False))
        handles = []
        for block in self.blocks:
            if block != REST:
                module = modules[block]
                handles.append(module.register_forward_pre_hook(lambda *_, b=block: self.load(b)))
                handles.append(module.register_forward_hook(lambda *_, b=block: self.finish(b)))
        for name in self._rest_leaves():
            module = modules[name]
            handles.append(module.register_forward_pre_hook(
                lambda *_, n=name: self.load(REST, within=n + ".")))  # fmt: skip
            if name not in self.kept_after_call:
                handles.append(module.register_forward_hook(
                    lambda *_, n=name: self._drop(REST, within=n + ".")))  # fmt: skip
        self.load(REST, eager_only=True)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _rest_leaves(self) -> list[str]:
        """Leaf modules that own tensors of the rest (embeddings, norms, the head)."""
        owners = {fqn.rsplit(".", 1)[0] for fqn, owner, _, _ in self._tensors(REST)
                  if not list(owner.children()) and "." in fqn}  # fmt: skip
        return sorted(owners)

    def _adaptive(self) -> str | None:
        g = self.plan.granularity
        return g if g != "block" else None


class _LazyMasks(Mapping[str, Tensor]):
    """The plan's masks by layer, each computed when it is read (after its block loaded)."""

    def __init__(self, layers: dict[str, nn.Module], compute: Any) -> None:
        self.layers, self.compute = layers, compute

    def __getitem__(self, name: str) -> Tensor:
        mask: Tensor = self.compute(name, self.layers[name])
        return mask

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


__all__ = [
    "REST",
    "BlockStream",
    "SparseOutcome",
    "StreamedNorms",
    "fake_call_order",
    "real_buffers",
    "stream_sparse",
    "tables_kept",
]

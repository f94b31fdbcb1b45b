"""Where the integers of a forward come from: module attributes and tensor shapes.

torch.export bakes every size into the graph as a plain int: ``x.view(B, N, self.num_heads,
C // self.num_heads)`` becomes ``view(x, [2, 50, 4, 16])``. After pruning, the eager forward
computes those ints again -- from the pruned tensors' shapes and from module attributes -- and
they must equal what the kept channels need. This module recovers *how* each int is computed,
with one eager forward in which

1. every int attribute of every module (the root included; ints inside tuples, lists and
   ``torch.Size`` too) is a :class:`TracedInt` whose expression is that attribute,
2. every shape read (``x.shape``, ``x.size()``, ``x.size(d)``, ``x.numel()``) returns
   TracedInts whose expression is "dimension ``d`` of read tensor ``k``" (a product for
   ``numel``), and
3. arithmetic on TracedInts (``+ - * // %``, ``max``/``min`` pick one) builds the expression,

while a :class:`~torch.overrides.TorchFunctionMode` records the ints every torch call gets,
keyed by the calling source line, the function and its occurrence at that line -- the same
line, op and order the export graph's nodes have. Each read tensor is identified afterwards by
its value among the export graph's node outputs (:func:`link_read_tensors`), so a dimension
symbol becomes "dimension ``d`` of node ``n``", whose size after pruning the analysis knows.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from graphprune.analysis.registry import source_line
from graphprune.capture import (
    Captured,
    eval_mode,
    normalize_inputs,
    own_thread,
    owning_module,
    shell_copy,
)

AttrKey = tuple[str, str, int]  # (module path, attribute name, index in a tuple/list or -1)
DimKey = tuple[int, int]  # (read tensor number, dimension)


# -- expressions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expr:
    """An integer expression over attribute and tensor-dimension symbols."""

    op: str  # "attr", "dim", "const", or a binary operator: "+", "-", "*", "//", "%"
    args: tuple[Any, ...]

    def evaluate(self, attr: Callable[[AttrKey], int], dim: Callable[[DimKey], int]) -> int:
        if self.op == "const":
            return int(self.args[0])
        if self.op == "attr":
            return attr(self.args[0])
        if self.op == "dim":
            return dim(self.args[0])
        a, b = (x.evaluate(attr, dim) for x in self.args)
        return int(_OPS[self.op](a, b))

    def attrs(self) -> set[AttrKey]:
        if self.op == "attr":
            return {self.args[0]}
        if self.op in ("const", "dim"):
            return set()
        return set().union(*(x.attrs() for x in self.args))

    def dims(self) -> set[DimKey]:
        if self.op == "dim":
            return {self.args[0]}
        if self.op in ("const", "attr"):
            return set()
        return set().union(*(x.dims() for x in self.args))

    def describe(self, tensor: Callable[[int], str] = lambda k: f"<tensor {k}>") -> str:
        """Readable form; ``tensor(k)`` names read tensor ``k``."""
        if self.op == "const":
            return str(self.args[0])
        if self.op == "attr":
            path, name, index = self.args[0]
            owner = f"{path}." if path else "self."
            return f"{owner}{name}" + (f"[{index}]" if index >= 0 else "")
        if self.op == "dim":
            return f"{tensor(self.args[0][0])}.shape[{self.args[0][1]}]"
        a, b = self.args
        return f"({a.describe(tensor)} {self.op} {b.describe(tensor)})"


_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "//": lambda a, b: a // b if b else 0,
    "%": lambda a, b: a % b if b else 0,
}


def const(value: int) -> Expr:
    return Expr("const", (int(value),))


def expr_of(value: Any) -> Expr:
    return value.expr if isinstance(value, TracedInt) else const(int(value))


class TracedInt(int):
    """An int that carries the expression it was computed by."""

    expr: Expr

    def __new__(cls, value: int, expr: Expr) -> TracedInt:
        obj = int.__new__(cls, value)
        obj.expr = expr
        return obj

    def _binary(self, op: str, other: Any, swap: bool = False) -> Any:
        if isinstance(other, bool) or not isinstance(other, int):
            fn = _OPS[op]
            return fn(other, int(self)) if swap else fn(int(self), other)  # floats: untraced
        a, b = (expr_of(other), self.expr) if swap else (self.expr, expr_of(other))
        x, y = (int(other), int(self)) if swap else (int(self), int(other))
        if op in ("//", "%") and y == 0:
            raise ZeroDivisionError("integer division or modulo by zero")
        return TracedInt(_OPS[op](x, y), Expr(op, (a, b)))

    def __add__(self, o: Any) -> Any:
        return self._binary("+", o)

    def __radd__(self, o: Any) -> Any:
        return self._binary("+", o, swap=True)

    def __sub__(self, o: Any) -> Any:
        return self._binary("-", o)

    def __rsub__(self, o: Any) -> Any:
        return self._binary("-", o, swap=True)

    def __mul__(self, o: Any) -> Any:
        return self._binary("*", o)

    def __rmul__(self, o: Any) -> Any:
        return self._binary("*", o, swap=True)

    def __floordiv__(self, o: Any) -> Any:
        return self._binary("//", o)

    def __rfloordiv__(self, o: Any) -> Any:
        return self._binary("//", o, swap=True)

    def __mod__(self, o: Any) -> Any:
        return self._binary("%", o)

    def __rmod__(self, o: Any) -> Any:
        return self._binary("%", o, swap=True)

    def __neg__(self) -> Any:
        return TracedInt(-int(self), Expr("-", (const(0), self.expr)))

    def __pos__(self) -> Any:
        return self

    def __abs__(self) -> Any:
        return self if self >= 0 else -self

    def __repr__(self) -> str:
        return f"{int(self)}"


# -- the recorded forward ------------------------------------------------------------------------
@dataclass(frozen=True)
class IntUse:
    """The ints one torch call received at ``line`` (``file:lineno``)."""

    line: str
    module: str  # path of the innermost module whose forward made the call ("" = root)
    func: str  # the torch function's name ("view", "split", "__getitem__", ...)
    occurrence: int  # how many calls of ``func`` at ``line`` came before this one
    values: tuple[int, ...]  # every int argument, flattened in call order
    exprs: tuple[Expr, ...]  # how each was computed (``const`` for a literal)

    @property
    def traced(self) -> bool:
        return any(e.op != "const" for e in self.exprs)


@dataclass
class ReadTensor:
    """A tensor whose shape the forward read, identified by its value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fingerprint: tuple[float, float]
    line: str  # where it was made (the call that returned it), or ""
    module: str = ""  # the module whose forward made it
    fqn: str = ""  # a parameter/buffer of the model (identified by identity)
    user_input: int = -1  # position among the model's flattened inputs


@dataclass
class ShapeTrace:
    """What one traced forward saw (see the module docstring)."""

    uses: list[IntUse] = field(default_factory=list)
    attributes: dict[AttrKey, int] = field(default_factory=dict)  # original values
    tensors: list[ReadTensor] = field(default_factory=list)
    error: str = ""  # why the forward could not be traced (then nothing is known)

    def uses_at(self, line: str) -> list[IntUse]:
        return [u for u in self.uses if u.line == line]


# frames between a user's call and the mode: torch's dispatch, and the Python wrappers of
# torch.nn.functional / torch.functional (export's stack traces name their caller too)
_DISPATCH_FILES = (
    "torch/overrides.py",
    "torch/_tensor.py",
    "torch/utils/_device.py",
    "torch/nn/functional.py",
    "torch/functional.py",
    "graphprune/analysis/provenance.py",  # the call recorder running a functional's body
)


def _caller_line() -> str:
    """The line that called the torch op (skipping torch's own __torch_function__ dispatch)."""
    frame = sys._getframe(2)  # 0: here, 1: __torch_function__, 2: the caller of the torch op
    while frame.f_back is not None and frame.f_code.co_filename.endswith(_DISPATCH_FILES):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _ints(value: Any) -> list[int]:
    """Every int argument in call order (bools excluded), traced or not; slices included."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, slice):
        return _ints([value.start, value.stop, value.step])
    if isinstance(value, list | tuple):  # torch.Size too
        return [x for v in value for x in _ints(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _ints(v)]
    return []


def fingerprint(t: torch.Tensor) -> tuple[float, float]:
    """A cheap value signature: sum and sum of |x| in float64."""
    with torch.no_grad():
        flat = t.detach().reshape(-1).double()
        if not flat.is_floating_point() or flat.numel() == 0:
            return (float(flat.numel()), 0.0)
        return (float(flat.nan_to_num().sum()), float(flat.nan_to_num().abs().sum()))


_SHAPE_GETTER = torch.Tensor.shape.__get__  # type: ignore[attr-defined]


CallKey = tuple[str, str, str, int]  # (line, module, torch function, occurrence)


class _CallKeys:
    """Each call's key: its line, the innermost running module (``modules``, kept by forward
    hooks), the torch function, and how many calls of it that line and module made before --
    the order the export graph's nodes have too."""

    def __init__(self, modules: list[str]) -> None:
        self._modules = modules
        self._count: dict[tuple[str, str, str], int] = defaultdict(int)

    def next(self, line: str, name: str) -> CallKey:
        key = (line, self._modules[-1] if self._modules else "", name)
        self._count[key] += 1
        return (*key, self._count[key] - 1)


class _Recorder(TorchFunctionMode):
    def __init__(self, known: dict[int, tuple[str, int]], modules: list[str]) -> None:
        super().__init__()
        self.trace = ShapeTrace()
        self._modules = modules  # the module stack, innermost last (kept by forward hooks)
        self._known = known  # id(tensor) -> (fqn, user input position) of parameters/inputs
        # id(tensor) -> (the tensor, the line and module that made it)
        self._made: dict[int, tuple[weakref.ref[torch.Tensor], str, str]] = {}
        self._read: dict[int, int] = {}  # id(tensor) -> read tensor number (kept alive below)
        self._alive: list[torch.Tensor] = []
        self._keys = _CallKeys(modules)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        line = _caller_line()
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func == _SHAPE_GETTER or name in ("size", "numel"):
            return self._shape(args[0], out, args[1:] + tuple(kwargs.values()), name == "numel")
        name = getattr(func, "__name__", str(func))
        ints = _ints((args, kwargs))  # (the shape reads above returned before this)
        if ints:
            values = tuple(int(v) for v in ints)
            exprs = tuple(expr_of(v) for v in ints)
            self.trace.uses.append(IntUse(*self._keys.next(line, name), values, exprs))
        module = self._modules[-1] if self._modules else ""
        for t in _tensors(out):
            if self._made_at(t) is None:
                self._made[id(t)] = (weakref.ref(t), line, module)
        return out

    def _made_at(self, t: torch.Tensor) -> tuple[str, str] | None:
        found = self._made.get(id(t))
        return (found[1], found[2]) if found is not None and found[0]() is t else None

    def _shape(
        self, tensor: torch.Tensor, out: Any, dims: tuple[Any, ...], numel: bool = False
    ) -> Any:
        number = self._read.get(id(tensor))
        if number is None:
            number = len(self.trace.tensors)
            fqn, position = self._known.get(id(tensor), ("", -1))
            line, module = self._made_at(tensor) or ("", "")
            self.trace.tensors.append(
                ReadTensor(
                    tuple(tensor.shape),
                    tensor.dtype,
                    fingerprint(tensor),
                    line,
                    module,
                    fqn,
                    position,
                )
            )
            self._read[id(tensor)] = number
            self._alive.append(tensor)
        if numel:  # the product of every dimension
            product = const(1)
            for d in range(tensor.ndim):
                product = Expr("*", (product, Expr("dim", ((number, d),))))
            return TracedInt(int(out), product)
        if isinstance(out, torch.Size):
            return torch.Size(
                [TracedInt(s, Expr("dim", ((number, d),))) for d, s in enumerate(out)]
            )
        if isinstance(out, int) and dims:
            d = int(dims[0]) % max(tensor.ndim, 1)
            return TracedInt(out, Expr("dim", ((number, d),)))
        return out


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def _traceable(value: Any) -> bool:
    return type(value) is int and value > 1


def holders(model: nn.Module, objects: bool = True) -> dict[str, Any]:
    """Path -> every module, and (``objects``) every plain object a module holds as an
    attribute -- a Hugging Face config, say -- once, under the first path that reaches it
    (``"model.config"``)."""
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        found[path] = module
        seen.add(id(module))
    if objects:
        for path, module in list(found.items()):
            for name, value in vars(module).items():
                if name.startswith("_") or id(value) in seen or not _plain_object(value):
                    continue
                seen.add(id(value))
                found[f"{path}.{name}" if path else name] = value
    return found


def _plain_object(value: Any) -> bool:
    return (
        hasattr(value, "__dict__")
        and not isinstance(value, nn.Module | torch.Tensor | type)
        and not callable(value)
        and not inspect.ismodule(value)
    )


def resolve_holder(model: nn.Module, path: str) -> Any:
    """The module or object at ``path`` (see :func:`holders`)."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        parent, _, name = path.rpartition(".")
        return getattr(model.get_submodule(parent) if parent else model, name)


def int_attributes(model: nn.Module, objects: bool = True) -> dict[AttrKey, int]:
    """Every int attribute > 1 of every module (and held object), and ints > 1 inside
    tuple/list/Size attributes."""
    found: dict[AttrKey, int] = {}
    for path, holder in holders(model, objects).items():
        for name, value in vars(holder).items():
            if name.startswith("_"):
                continue
            if _traceable(value):
                found[(path, name, -1)] = value
            elif (
                isinstance(value, tuple | list)
                and any(_traceable(v) for v in value)
                and all(type(v) is int for v in value)
            ):
                found.update({(path, name, i): v for i, v in enumerate(value) if v > 1})
    return found


def _swap_attributes(model: nn.Module, keys: dict[AttrKey, int]) -> list[Any]:
    """Put TracedInts in place of the attributes ``keys``, returning the originals."""
    originals = []
    names = sorted({(p, n) for p, n, _ in keys})
    for path, name in names:
        holder = resolve_holder(model, path)
        value = vars(holder)[name]
        originals.append((holder, name, value))
        if isinstance(value, int):
            new: Any = TracedInt(value, Expr("attr", ((path, name, -1),)))
        else:
            items = [
                TracedInt(v, Expr("attr", ((path, name, i),))) if (path, name, i) in keys else v
                for i, v in enumerate(value)
            ]
            new = type(value)(items) if not isinstance(value, list) else items
        holder.__dict__[name] = new
    return originals


def trace_shapes(model: nn.Module, example_inputs: Any) -> ShapeTrace:
    """Run ``model`` once (eval, no grad) with traced attributes and shape reads; see the
    module docstring. The model is left exactly as it was. A forward that cannot run with
    traced ints (code that insists on ``type(x) is int``) is traced again with the modules'
    own attributes only; if that fails too, the trace has ``error`` set. The run swaps
    attributes and modes on a shell copy (:func:`graphprune.capture.shell_copy`), so a forward
    another thread runs on ``model`` meanwhile is untouched."""
    model = shell_copy(model)
    trace = _trace(model, example_inputs, objects=True)
    return trace if not trace.error else _trace(model, example_inputs, objects=False)


def _trace(model: nn.Module, example_inputs: Any, objects: bool) -> ShapeTrace:
    attributes = int_attributes(model, objects)
    args, kwargs = normalize_inputs(example_inputs)
    known: dict[int, tuple[str, int]] = {}
    for fqn, t in [*model.named_parameters(), *model.named_buffers()]:
        known[id(t)] = (fqn, -1)
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    for position, t in enumerate(flat):
        if isinstance(t, torch.Tensor):
            known[id(t)] = ("", position)
    originals = _swap_attributes(model, attributes)
    try:
        with module_stack(model) as stack, eval_mode(model), torch.no_grad():
            recorder = _Recorder(known, stack)
            with recorder:
                model(*args, **kwargs)
    except Exception as exc:  # a forward that rejects int subclasses: report, don't guess
        trace = ShapeTrace(error=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
        trace.attributes = attributes
        return trace
    finally:
        for holder, name, value in originals:
            holder.__dict__[name] = value
    recorder.trace.attributes = attributes
    return recorder.trace


# torch.nn.functional compositions whose body the export graph shows op by op: the call
# recorder runs their body under the mode, so the view sizes inside are recorded too
_EXPANDED = frozenset({"multi_head_attention_forward"})
_expanding = threading.local()
_functional_check = vars(torch.nn.functional)["has_torch_function"]


def _has_torch_function(args: Any) -> bool:
    """torch.nn.functional's dispatch check, answering False in a thread expanding a call
    (the mode is already handling it)."""
    return False if getattr(_expanding, "on", False) else bool(_functional_check(args))


class _CallRecorder(TorchFunctionMode):
    """The ints every torch call gets, keyed like :class:`IntUse` (nothing is traced or
    swapped: the forward runs exactly as it would)."""

    def __init__(self, modules: list[str]) -> None:
        super().__init__()
        self.calls: dict[CallKey, tuple[int, ...]] = {}
        self._keys = _CallKeys(modules)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _EXPANDED and getattr(func, "__module__", "") == "torch.nn.functional":
            return self._expand(func, args, kwargs)
        line = _caller_line()
        out = func(*args, **kwargs)
        if func == _SHAPE_GETTER or name in ("size", "numel"):
            return out  # shape reads: not uses (as in the shape trace)
        ints = _ints((args, kwargs))
        if ints:
            self.calls[self._keys.next(line, name)] = tuple(int(v) for v in ints)
        return out

    def _expand(self, func: Any, args: Any, kwargs: Any) -> Any:
        """Run ``func``'s body with this mode on (its own dispatch check answers False)."""
        functional = vars(torch.nn.functional)  # (harmless if left: it defers when not on)
        saved, was_on = functional["has_torch_function"], getattr(_expanding, "on", False)
        functional["has_torch_function"] = _has_torch_function
        _expanding.on = True
        try:
            with self:
                return func(*args, **kwargs)
        finally:
            _expanding.on = was_on
            if not was_on:
                functional["has_torch_function"] = saved


def as_uses(calls: dict[CallKey, tuple[int, ...]]) -> list[IntUse]:
    """Recorded calls as the shape trace's uses (every int a literal), in call order."""
    return [
        IntUse(line, module, func, occurrence, values, tuple(const(v) for v in values))
        for (line, module, func, occurrence), values in calls.items()
    ]


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[list[str]]:
    """While inside, the paths of the modules whose forward is running in this thread,
    innermost last (kept by global forward hooks)."""
    paths = {id(m): p for p, m in model.named_modules()}
    stack: list[str] = []

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(paths.get(id(module), stack[-1] if stack else ""))

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(own_thread(enter)),
        torch.nn.modules.module.register_module_forward_hook(own_thread(leave)),
    ]
    try:
        yield stack
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def recorded_calls(model: nn.Module) -> Iterator[dict[CallKey, tuple[int, ...]]]:
    """While inside, the ints of every torch call a forward of ``model`` (in this thread)
    makes, keyed by (line, module path, function, occurrence) as the shape trace keys its
    uses; the dict is filled as the forward runs."""
    with module_stack(model) as stack, _CallRecorder(stack) as recorder:
        yield recorder.calls


def _close(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(abs(x - y) <= 1e-6 * (abs(x) + abs(y)) + 1e-9 for x, y in zip(a, b, strict=True))


def attributes_read(trace: ShapeTrace) -> set[tuple[str, str]] | None:
    """The (module path, attribute) pairs the traced forward's torch calls read (None: the
    trace failed, so what the forward reads is unknown)."""
    if trace.error:
        return None
    return {
        (path, name) for use in trace.uses for expr in use.exprs for path, name, _ in expr.attrs()
    }


def link_read_tensors(
    trace: ShapeTrace, captured: Captured, model: nn.Module, example_inputs: Any
) -> dict[int, str]:
    """Read tensor number -> export graph node holding the same tensor.

    Parameters and model inputs are known by identity; every other read tensor is found by
    value among the node outputs of one run of the exported graph (same shape and dtype, the
    same sum and sum of |x|; among equals, the node made at the same source line first).
    Unmatched tensors are left out: relations through them stay unknown.
    """
    found: dict[int, str] = {}
    placeholders = [n for n in captured.graph.nodes if n.op == "placeholder"]
    by_fqn = {fqn: name for name, fqn in captured.state_fqn.items()}
    wanted: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = defaultdict(list)
    for k, t in enumerate(trace.tensors):
        if t.fqn and t.fqn in by_fqn:
            found[k] = by_fqn[t.fqn]
        elif 0 <= t.user_input < len(captured.user_inputs):
            found[k] = captured.user_inputs[t.user_input]
        else:
            wanted[(t.shape, t.dtype)].append(k)
    if not wanted:
        return found
    args, kwargs = normalize_inputs(example_inputs)
    flat_inputs, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    state.update(captured.program.constants)
    inputs = iter(flat_inputs)
    constants = captured.program.graph_signature.inputs_to_lifted_tensor_constants
    values = []
    for node in placeholders:
        fqn = captured.state_fqn.get(node.name)
        if fqn is not None:
            values.append(state[fqn])
        elif node.name in constants:  # a tensor the forward makes, lifted by export
            values.append(captured.program.constants[constants[node.name]])
        else:
            values.append(next(inputs))
    candidates: dict[int, list[tuple[str, str, str]]] = defaultdict(list)

    class _Watcher(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                for k in wanted.get((tuple(result.shape), result.dtype), []):
                    if _close(fingerprint(result), trace.tensors[k].fingerprint):
                        candidates[k].append((n.name, source_line(n), owning_module(n)))
            return result

    with torch.no_grad():
        _Watcher(captured.program.graph_module).run(*values)
    for k, found_nodes in candidates.items():
        t = trace.tensors[k]
        if len(found_nodes) > 1:  # equal values (zeros, say): the one made where it was made
            found_nodes = [
                c for c in found_nodes if c[1].startswith(t.line + ":") and c[2] == t.module
            ]
        if len(found_nodes) == 1:  # still ambiguous: unknown (relations through it are not used)
            found[k] = found_nodes[0][0]
    return found

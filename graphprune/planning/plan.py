"""Plan: what the user wants removed. Plain data, validated, JSON/YAML round-trippable."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml as _yaml

from graphprune.errors import GraphPruneError
from graphprune.io import write_text_atomic

SCOPES = ("local", "global")
STRUCTURED = ("channels", "heads", "layers")
SPARSE = ("unstructured", "n:m", "block")  # masks on weights: storage, not dense speed
GRANULARITIES = STRUCTURED + SPARSE
IMPORTANCES = ("l1", "l2", "bn_scale", "random", "taylor", "fisher", "hessian", "fpgm", "wanda")
LATENCY_RUNTIMES = ("onnxruntime", "openvino")  # :data:`graphprune.onnx.runtimes.RUNTIMES`
# what a channel plan does to the attention inner width (see Plan.attention)
ATTENTION = ("auto", "head_dim", "heads", "keep")
# whether a model built from a config (transformers) keeps widths its config can state
CONFIG_MODES = ("expressible", "free")
NONFINITE = ("error", "rank")  # what to do with NaN/inf scores the weights do not explain
SPARSE_IMPORTANCES = ("l1", "l2", "random", "taylor", "fisher", "hessian", "wanda")


class PlanError(GraphPruneError, ValueError):
    """A plan that cannot be applied as written."""


@dataclass
class Plan:
    """What to remove.

    ratio: fraction of channels (or heads, or residual blocks) removed, in [0, 1).
    target_macs: instead of ``ratio``, the fraction of MACs to keep, in (0, 1].
    target_latency: instead, the fraction of the original's measured onnxruntime latency to
        keep, in (0, 1) (batch from the example inputs, ``latency_threads`` threads); or
        ``target_latency_ms``, an absolute budget on this machine; measured in
        ``latency_runtime`` ("onnxruntime", or "openvino" where installed: plan for the runtime
        you deploy on, their kernels differ). Channels only: per-layer
        widths are allocated from measured latency tables, then the compiled model is measured
        and corrected (see :mod:`graphprune.stages.latency`).
    scope: "local" (the same ratio in every group) or "global" (channels ranked across groups by
        normalised importance, at most ``max_ratio`` of any group removed).
    importance: "l1", "l2", "bn_scale", "random", "taylor", "fisher"/"hessian", "fpgm",
        "wanda" (|W|·||x|| from the calibration batches), or a callable
        ``(group, tensors, grads) -> scores`` (not serialisable).
    granularity: structured -- "channels" (every channel group; the attention inner width as
        ``attention`` says), "heads" (attention heads; kv heads for GQA) or "layers" (whole
        residual blocks -> identity); or sparse masks on the weights of Linear/Conv layers --
        "unstructured" (``ratio`` of the weights zeroed), "n:m" (``nm=[n, m]``: n of every m
        consecutive weights along the input dim kept; 2:4 by default) or "block" (``ratio`` of
        the ``block=[rows, cols]`` tiles of the (out, in) weight zeroed). Sparse plans keep the
        dense MACs: they buy storage, and speed only through sparse kernels (``sparsify``).
    attention: what a channel plan does to the attention inner width (q, k, v and the output
        projection's input), so that the residual width takes it with it as in the published
        width-pruned models: "auto" (the default) prunes head_dim by the plan's ratio where
        nothing depends on its size, and whole heads (kv heads under GQA) where something does
        -- the default scale 1/sqrt(head_dim), a rotary table, a config (there only where the
        hidden size is pruned too; see :func:`graphprune.planning.resolve.attention_kinds`);
        "head_dim" or "heads" forces one; "keep" leaves the attention inner width whole.
    config: for a model built from a config (transformers): "expressible" (the default) keeps
        the widths one config field holds equal wherever that field sizes them (a request
        for per-layer widths -- ``overrides``, ``scope="global"``, a latency target -- is
        evened out, and the report says so), and keeps whole what a field that cannot change
        sizes (a base model's output width), so that ``save_pretrained``/``from_pretrained``
        rebuilds the result; "free" allows any widths (saved with ``graphprune.save``).
    sparsity: a sparse plan applied after this structured one, e.g.
        ``Plan(ratio=0.5, sparsity=Plan(granularity="n:m", include=["*.mlp.*"]))``.
    include: FQN globs of the layers a sparse plan masks (default: every Linear/Conv).
    ignore: FQN globs of modules whose output channels are kept (sparse plans: not masked).
    overrides: FQN glob -> ratio for the layers (pruning units) those modules produce.
    round_to: each layer's kept width is a multiple of this; a layer narrower than it is left
        whole. "auto" (the default) = this CPU's SIMD block (16 with AVX-512, 8 with AVX2),
        which keeps every conv in onnxruntime's blocked NCHWc layout (see README, "Measured
        speed-up"); a grouped conv keeps whole blocks per conv group. 1 = exact counts. Head
        counts are never rounded.
    min_channels: never keep fewer channels than this in a layer.
    reconstruct: after choosing what to remove, update the kept weights so each affected layer
        reproduces its original output on the calibration batches (one-shot, no training):
        structured plans refit every layer whose inputs were pruned by ridge least squares
        (bias compensation included) and re-estimate BatchNorm statistics; sparse plans run
        SparseGPT (unstructured and n:m masks chosen by its OBS saliency). Applies to a nested
        ``sparsity`` plan too. See :mod:`graphprune.oneshot.reconstruct`.
    nonfinite: what to do with NaN/inf importance scores that the weights do not explain (a
        criterion or gradients that overflowed): "error" (the default: refuse, naming the
        groups) or "rank" (NaN and +inf kept first, -inf removed first, with a warning).
        Scores made NaN by NaN weights are always ranked so, with a warning.
    """

    ratio: float | None = None
    target_macs: float | None = None
    target_latency: float | None = None
    target_latency_ms: float | None = None
    latency_threads: int = 2
    latency_runtime: str = "onnxruntime"
    scope: str = "local"
    importance: str | Callable[..., Any] = "l2"
    granularity: str = "channels"
    ignore: list[str] = field(default_factory=list)
    overrides: dict[str, float] = field(default_factory=dict)
    round_to: int | str = "auto"
    min_channels: int = 1
    max_ratio: float = 0.9
    seed: int = 0
    nm: list[int] = field(default_factory=lambda: [2, 4])
    block: list[int] = field(default_factory=lambda: [4, 4])
    include: list[str] = field(default_factory=list)
    sparsity: Plan | None = None
    reconstruct: bool = False
    nonfinite: str = "error"
    attention: str = "auto"
    config: str = "expressible"

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        self._check_types()
        if isinstance(self.sparsity, dict):  # from JSON
            self.sparsity = Plan.from_dict(self.sparsity)
        self.nm, self.block = list(self.nm), list(self.block)
        if self.reconstruct and self.granularity == "layers":
            raise PlanError(
                "reconstruct=True refits layers whose inputs lose channels (or weights); "
                "granularity='layers' removes whole blocks: use channels/heads or a sparse plan"
            )
        if self.granularity in SPARSE:
            self._validate_sparse()
            return
        if self.sparsity is not None and self.sparsity.granularity not in SPARSE:
            raise PlanError(
                f"sparsity= takes a sparse plan (granularity one of {SPARSE}), not "
                f"{self.sparsity.granularity!r}"
            )
        if self.include:
            raise PlanError("include= selects the layers of a sparse plan; use ignore= here")
        targets = [self.ratio, self.target_macs, self.target_latency, self.target_latency_ms]
        if sum(t is not None for t in targets) != 1:
            raise PlanError(
                "give exactly one of ratio= (fraction removed), target_macs= (fraction of MACs "
                "kept), target_latency= (fraction of measured latency kept) or "
                "target_latency_ms="
            )
        if self.target_latency is not None or self.target_latency_ms is not None:
            self._validate_latency()
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise PlanError(f"ratio={self.ratio} is outside [0, 1): it is the fraction removed")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise PlanError(
                f"target_macs={self.target_macs} is outside (0, 1]: it is the fraction of MACs kept"
            )
        if self.scope not in SCOPES:
            raise PlanError(f"scope={self.scope!r}; use one of {SCOPES}")
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"granularity={self.granularity!r}; use one of {GRANULARITIES}")
        if self.attention not in ATTENTION:
            raise PlanError(f"attention={self.attention!r}; use one of {ATTENTION}")
        if self.config not in CONFIG_MODES:
            raise PlanError(f"config={self.config!r}; use one of {CONFIG_MODES}")
        if not callable(self.importance) and self.importance not in IMPORTANCES:
            raise PlanError(
                f"unknown importance {self.importance!r}; use one of "
                f"{', '.join(IMPORTANCES)} or a callable"
            )
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise PlanError(f"round_to={self.round_to!r}; use an int >= 1 or 'auto'")
        if self.min_channels < 1:
            raise PlanError("min_channels must be >= 1")
        if not 0.0 < self.max_ratio <= 1.0:
            raise PlanError(f"max_ratio={self.max_ratio} is outside (0, 1]")
        for pattern, value in self.overrides.items():
            if not 0.0 <= value < 1.0:
                raise PlanError(f"override {pattern!r}: ratio {value} is outside [0, 1)")

    def _check_types(self) -> None:
        """Every field of the type it is read as, before any value is used (a string where a
        list of globs belongs is one glob, never split into characters)."""
        for name in ("ignore", "include"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name, (check, accepted) in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not check(value):
                raise PlanError(
                    f"Plan {name}={value!r} ({type(value).__name__}): expected {accepted}"
                )

    def _validate_latency(self) -> None:
        if self.target_latency is not None and not 0.0 < self.target_latency < 1.0:
            raise PlanError(
                f"target_latency={self.target_latency} is outside (0, 1): it is the fraction of "
                "the original's measured latency kept"
            )
        if self.target_latency_ms is not None and not self.target_latency_ms > 0:
            raise PlanError(f"target_latency_ms={self.target_latency_ms} must be > 0")
        if self.granularity != "channels":
            raise PlanError(
                f"latency targets allocate channel widths; granularity={self.granularity!r} "
                "is not supported with them (use ratio= or target_macs=)"
            )
        if self.latency_threads < 1:
            raise PlanError("latency_threads must be >= 1")
        if self.latency_runtime not in LATENCY_RUNTIMES:
            raise PlanError(
                f"latency_runtime={self.latency_runtime!r}; use one of {LATENCY_RUNTIMES}"
            )

    @property
    def targets_latency(self) -> bool:
        return self.target_latency is not None or self.target_latency_ms is not None

    def _validate_sparse(self) -> None:
        g = self.granularity
        if self.sparsity is not None:
            raise PlanError("a sparse plan cannot nest another: give one sparse plan")
        if self.target_latency is not None or self.target_latency_ms is not None:
            raise PlanError(
                f"latency targets do not apply to granularity={g!r}: masks keep the dense "
                "latency; give ratio="
            )
        if self.target_macs is not None:
            raise PlanError(
                f"target_macs does not apply to granularity={g!r}: zeroed weights keep the "
                "dense MACs (they buy storage, and speed only through sparse kernels); "
                "give ratio= (the fraction of weights zeroed)"
            )
        if g == "n:m":
            n, m = self.nm if len(self.nm) == 2 else (0, 0)
            if not 0 < n < m:
                raise PlanError(f"nm={self.nm}: give [n, m] with 0 < n < m, e.g. [2, 4]")
            implied = 1.0 - n / m
            if self.ratio is not None and abs(self.ratio - implied) > 1e-9:
                raise PlanError(f"nm={self.nm} zeroes {implied:g} of the weights; drop ratio=")
            self.ratio = implied
        elif self.ratio is None or not 0.0 <= self.ratio < 1.0:
            raise PlanError(
                f"granularity={g!r} needs ratio= in [0, 1): the fraction of "
                f"{'weights' if g == 'unstructured' else 'blocks'} zeroed"
            )
        if g == "block" and (len(self.block) != 2 or min(self.block) < 1):
            raise PlanError(f"block={self.block}: give [rows, cols] >= 1, e.g. [4, 4]")
        if callable(self.importance) or self.importance not in SPARSE_IMPORTANCES:
            raise PlanError(
                f"importance={self.importance!r} does not score single weights; use one of "
                f"{', '.join(SPARSE_IMPORTANCES)}"
            )
        if self.scope not in SCOPES:
            raise PlanError(f"scope={self.scope!r}; use one of {SCOPES}")
        if self.scope == "global" and self.ratio > self.max_ratio:
            raise PlanError(
                f"scope='global' with ratio={self.ratio} needs max_ratio >= ratio (the most "
                f"any one layer may lose; now {self.max_ratio}): pass max_ratio=0.99"
            )
        if g == "n:m" and self.scope == "global":
            raise PlanError("n:m is a per-group pattern: use scope='local'")
        if self.overrides and self.scope == "global":
            raise PlanError("overrides= set per-layer ratios: use scope='local' with them")
        for pattern, value in self.overrides.items():
            if g == "n:m" or not 0.0 <= value < 1.0:
                raise PlanError(f"override {pattern!r}: ratio {value} is not valid for {g!r}")

    @property
    def is_sparse(self) -> bool:
        return self.granularity in SPARSE

    @property
    def sparse_plan(self) -> Plan | None:
        """The sparse part of this plan: itself, its ``sparsity``, or None."""
        return self if self.is_sparse else self.sparsity

    @property
    def channel_multiple(self) -> int:
        """``round_to`` as a number ("auto" resolved for this CPU)."""
        return simd_block() if self.round_to == "auto" else int(self.round_to)

    def check_patterns(self, modules: Iterable[str]) -> None:
        """Every ``ignore``/``overrides``/``include`` glob, the nested sparsity plan's too, must
        match a module (catches typos)."""
        names = list(modules)
        if self.sparsity is not None:
            self.sparsity.check_patterns(names)
        for pattern in [*self.ignore, *self.overrides, *self.include]:
            if ", " in pattern and all(part in names for part in pattern.split(", ")):
                continue  # a unit's exact name (several layers), as Pruner steps write them
            if not any(fnmatchcase(n, pattern) for n in names):
                close = [
                    n
                    for n in names
                    if pattern.split("*")[0]
                    and n.startswith(pattern.split("*")[0].rsplit(".", 1)[0])
                ][:3]
                hint = f"; modules nearby: {', '.join(close)}" if close else ""
                raise PlanError(f"pattern {pattern!r} matches no module of the model{hint}")

    def check_heads(self, heads: int, where: str, ratio: float | None = None) -> None:
        """A heads ratio must remove a whole number of heads."""
        ratio = self.ratio if ratio is None else ratio
        if ratio is None:
            return
        removed = ratio * heads
        if abs(removed - round(removed)) > 1e-6:
            valid = ", ".join(f"{k / heads:g}" for k in range(heads))
            raise PlanError(
                f"ratio={ratio} removes {removed:g} of the {heads} heads of "
                f"{where}; use a ratio that removes whole heads: {valid}"
            )

    def ratio_for(self, modules: Iterable[str], unit: str | None = None) -> float:
        """The ratio for a unit whose layers are ``modules`` (overrides first; an override
        keyed by the unit's exact name, as :class:`graphprune.Pruner` writes them, wins)."""
        if unit is not None and unit in self.overrides:
            return self.overrides[unit]
        names = list(modules)
        for pattern, value in self.overrides.items():
            if any(fnmatchcase(n, pattern) for n in names):
                return value
        return self.ratio if self.ratio is not None else 0.0

    def ignores(self, modules: Iterable[str]) -> bool:
        return any(fnmatchcase(n, p) for n in modules for p in self.ignore)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if callable(self.importance):
            raise PlanError(
                "a plan with a callable importance cannot be serialised; use a named criterion"
            )
        return asdict(self)  # a nested sparsity plan becomes a nested dict

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan is a mapping of keys to values, not {type(data).__name__}")
        if not all(isinstance(k, str) for k in data):
            raise PlanError(f"plan keys are names; got {sorted(map(repr, data))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"unknown plan keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"a plan's JSON does not parse ({exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write JSON (or YAML for .yaml/.yml) atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            write_text_atomic(path, _yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """A plan from a JSON or YAML (.yaml/.yml) file; every problem is a PlanError that
        names the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: cannot read the plan ({exc})") from None
        return cls.from_text(text, yaml=path.suffix in (".yaml", ".yml"), where=str(path))

    @classmethod
    def from_text(cls, text: str, *, yaml: bool = False, where: str = "plan") -> Plan:
        """A plan from JSON (or YAML) text."""
        try:
            data = _yaml.safe_load(text) if yaml else json.loads(text)
        except (json.JSONDecodeError, _yaml.YAMLError) as exc:
            kind = "YAML" if yaml else "JSON"
            reason = " ".join(str(exc).split())
            raise PlanError(f"{where}: not valid {kind} ({reason})") from None
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a plan is a mapping of keys to values")
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from None


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _globs(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def _ratios(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _number(r) for k, r in value.items()
    )


def _pair(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(map(_integer, value))


# field -> (check, what the message says is accepted)
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "ratio": (lambda v: v is None or _number(v), "a number in [0, 1) or None"),
    "target_macs": (lambda v: v is None or _number(v), "a number in (0, 1] or None"),
    "target_latency": (lambda v: v is None or _number(v), "a number in (0, 1) or None"),
    "target_latency_ms": (lambda v: v is None or _number(v), "a number of milliseconds or None"),
    "latency_threads": (_integer, "an int >= 1"),
    "latency_runtime": (lambda v: isinstance(v, str), f"one of {LATENCY_RUNTIMES}"),
    "scope": (lambda v: isinstance(v, str), f"one of {SCOPES}"),
    "importance": (lambda v: isinstance(v, str) or callable(v), "a criterion name or a callable"),
    "granularity": (lambda v: isinstance(v, str), f"one of {GRANULARITIES}"),
    "ignore": (_globs, "a list of module-name globs"),
    "include": (_globs, "a list of module-name globs"),
    "overrides": (
        _ratios,
        "a mapping of module-name glob -> ratio",
    ),
    "round_to": (lambda v: _integer(v) or v == "auto", "an int >= 1 or 'auto'"),
    "min_channels": (_integer, "an int >= 1"),
    "max_ratio": (_number, "a number in (0, 1]"),
    "seed": (_integer, "an int"),
    "nm": (_pair, "[n, m], two ints"),
    "block": (_pair, "[rows, cols], two ints"),
    "sparsity": (
        lambda v: v is None or isinstance(v, Plan | dict), "a sparse Plan (or its mapping) or None"
    ),
    "reconstruct": (lambda v: isinstance(v, bool), "True or False"),
    "nonfinite": (lambda v: v in NONFINITE, f"one of {NONFINITE}"),
    "attention": (lambda v: isinstance(v, str), f"one of {ATTENTION}"),
    "config": (lambda v: isinstance(v, str), f"one of {CONFIG_MODES}"),
}


def simd_block() -> int:
    """Channels per SIMD register of fp32 on this CPU: onnxruntime's NCHWc block size."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return 16 if "AVX512" in capability else 8 if "AVX2" in capability else 4


def keep_count(size: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """Channels kept of ``size`` when removing ``ratio`` of them.

    The kept count is rounded *up* to a multiple of ``round_to`` (never above ``size``; a size
    smaller than ``round_to`` is kept whole rather than rounded to nothing) and is at least
    ``min_channels``.
    """
    if ratio <= 0.0 or (round_to > 1 and size < round_to):
        return size
    keep = size - math.floor(ratio * size + 1e-9)
    if round_to > 1:
        keep = min(size, math.ceil(keep / round_to) * round_to)
    return max(min(size, min_channels), keep)
